"""Packing examples into fixed-length rows without leaking: segment ids and restarting positions.

`pack_examples` turns tokenized `Example`s into one int32 array of shape ``(N, 5, seq_len)``
whose five planes are `FIELDS`:

* ``inputs`` / ``targets``: token ``j`` of an example is the input at one slot and token
  ``j + 1`` the target there, so an example of ``n`` tokens takes ``n - 1`` slots;
* ``weights``: 1 where the target counts in the loss (the example's weights, shifted);
* ``segment_ids``: 1, 2, ... for the examples sharing a row, 0 for padding. Attention must stay
  inside a segment (`rslora_jax.models.attention`: ``segment_ids=``): a packed row computes
  exactly what the examples compute one per row;
* ``positions``: 0, 1, ... restarting at every example (RoPE positions).

Long examples: a ``text`` example (``Example.windowed``) longer than a row is cut into windows of
``seq_len`` slots that share one token (every token after the first is a target exactly once);
any other example is truncated to its first ``seq_len + 1`` tokens, and one whose counted tokens
(its answer) all fall past the cut is dropped and reported (`PackStats.dropped`): it would train
on nothing.

Rows are filled best-fit by decreasing length (``pack=True``), or one example per row
(``pack=False``).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from rslora_jax.data.tokens import Example

__all__ = ["FIELDS", "PackStats", "fields", "pack_examples", "window_examples"]

#: The planes of a packed array, in order (axis 1).
FIELDS: tuple[str, ...] = ("inputs", "targets", "weights", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class PackStats:
    """What `pack_examples` did.

    Attributes:
        examples: examples given.
        pieces: pieces placed in rows (windows of long texts count one each).
        truncated: examples cut at ``seq_len + 1`` tokens that kept part of their answer.
        dropped: examples whose answer was cut off entirely (or that had no target at all):
            left out.
        dropped_sources: the sources of the first dropped examples (up to 5).
        rows: rows made.
        slots: input slots holding a token (not padding).
        counted: targets the loss counts.
        seq_len: slots per row.
    """

    examples: int
    pieces: int
    truncated: int
    dropped: int
    dropped_sources: tuple[str, ...]
    rows: int
    slots: int
    counted: int
    seq_len: int

    @property
    def fill(self) -> float:
        """Fraction of the rows' slots that hold tokens."""
        return 0.0 if not self.rows else self.slots / (self.rows * self.seq_len)

    def describe(self) -> str:
        """One line for a run's log.

        Example:
          >>> PackStats(4, 4, 1, 1, ("f:3",), 2, 30, 12, 16).describe()
          '4 examples -> 2 rows (94% filled, 12 counted targets); 1 truncated; 1 dropped (answer cut off entirely by seq_len: f:3)'
        """
        line = (
            f"{self.examples} examples -> {self.rows} rows ({100 * self.fill:.0f}% filled, "
            f"{self.counted} counted targets)"
        )
        if self.truncated:
            line += f"; {self.truncated} truncated"
        if self.dropped:
            shown = ", ".join(self.dropped_sources)
            more = ", ..." if self.dropped > len(self.dropped_sources) else ""
            line += f"; {self.dropped} dropped (answer cut off entirely by seq_len: {shown}{more})"
        return line


def window_examples(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Cuts each long ``windowed`` example (plain text) into windows of ``seq_len + 1`` tokens.

    Consecutive windows share one token, so every token after the first is a target exactly
    once; the last window holds what is left (at least 2 tokens). Other examples are returned
    as they are (`pack_examples` truncates them). Windowing before a held-out split keeps the
    split between windows (a long document's tail can be held out).

    Example:
        >>> (ex,) = [Example(np.arange(7), np.ones(7, np.uint8), "doc", windowed=True)]
        >>> [w.ids.tolist() for w in window_examples([ex], seq_len=3)]
        [[0, 1, 2, 3], [3, 4, 5, 6]]
    """
    out = []
    for ex in examples:
        n = ex.ids.size
        if not ex.windowed or n <= seq_len + 1:
            out.append(ex)
            continue
        for k in range(0, n - 1, seq_len):
            piece = slice(k, min(k + seq_len + 1, n))
            out.append(dataclasses.replace(ex, ids=ex.ids[piece], weights=ex.weights[piece]))
    return out


def _pieces(
    examples: Sequence[Example], seq_len: int
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], int, list[str]]:
    pieces = []
    truncated = 0
    dropped: list[str] = []
    for ex in examples:
        ids = np.asarray(ex.ids, np.int32)
        w = np.asarray(ex.weights, np.int32)
        x, y, t = ids[:-1], ids[1:], w[1:]
        if x.size == 0 or not t.any():
            dropped.append(ex.source)
            continue
        if ex.windowed:
            for k in range(0, x.size, seq_len):
                if t[k : k + seq_len].any():
                    pieces.append((x[k : k + seq_len], y[k : k + seq_len], t[k : k + seq_len]))
            continue
        if x.size > seq_len:
            if not t[:seq_len].any():
                dropped.append(ex.source)
                continue
            if t[seq_len:].any():
                truncated += 1
            x, y, t = x[:seq_len], y[:seq_len], t[:seq_len]
        pieces.append((x, y, t))
    return pieces, truncated, dropped


def _assign(lengths: list[int], seq_len: int, pack: bool) -> list[list[int]]:
    """Rows as lists of piece indices: best fit by decreasing length, or one per row."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def pack_examples(
    examples: Sequence[Example], seq_len: int, *, pack: bool = True
) -> tuple[np.ndarray, PackStats]:
    """Packs examples into rows of ``seq_len`` slots (see the module docstring).

    Args:
        examples: tokenized examples (`rslora_jax.data.tokenize_records`).
        seq_len: slots per row (the model's sequence length).
        pack: several examples per row (True) or one per row, padded (False).

    Returns:
        ``(rows, stats)``: int32 ``(N, 5, seq_len)`` (planes `FIELDS`) and a `PackStats`.

    Raises:
        ValueError: if `seq_len` is not a positive int, or no example has a target to learn.

    Example:
        >>> ex = [Example(np.array([5, 6, 7]), np.array([0, 1, 1]), "a"),
        ...       Example(np.array([8, 9]), np.array([0, 1]), "b")]
        >>> rows, stats = pack_examples(ex, seq_len=4)
        >>> rows[0].tolist()  # inputs, targets, weights, segment ids, positions
        [[5, 6, 8, 0], [6, 7, 9, 0], [1, 1, 1, 0], [1, 1, 2, 0], [0, 1, 0, 0]]
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    examples = list(examples)
    pieces, truncated, dropped = _pieces(examples, int(seq_len))
    if not pieces:
        raise ValueError(
            f"none of the {len(examples)} examples has a target to learn within seq_len="
            f"{seq_len} (answers cut off entirely: {', '.join(dropped[:5])}); raise seq_len"
        )
    assignment = _assign([p[0].size for p in pieces], int(seq_len), pack)
    out = np.zeros((len(assignment), len(FIELDS), int(seq_len)), np.int32)
    for r, members in enumerate(assignment):
        at = 0
        for segment, i in enumerate(members, start=1):
            x, y, t = pieces[i]
            n = x.size
            out[r, 0, at : at + n] = x
            out[r, 1, at : at + n] = y
            out[r, 2, at : at + n] = t
            out[r, 3, at : at + n] = segment
            out[r, 4, at : at + n] = np.arange(n)
            at += n
    stats = PackStats(
        examples=len(examples),
        pieces=len(pieces),
        truncated=truncated,
        dropped=len(dropped),
        dropped_sources=tuple(dropped[:5]),
        rows=len(assignment),
        slots=int((out[:, 3] > 0).sum()),
        counted=int(out[:, 2].sum()),
        seq_len=int(seq_len),
    )
    return out, stats


def fields(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The planes of packed rows (``(..., 5, seq_len)``) by name.

    Example:
      >>> sorted(fields(np.zeros((2, 5, 3), np.int32)))
      ['inputs', 'positions', 'segment_ids', 'targets', 'weights']
    """
    return {name: rows[..., i, :] for i, name in enumerate(FIELDS)}
