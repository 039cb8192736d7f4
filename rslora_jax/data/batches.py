"""Held-out splits and batches: `split_text`, `split_sequences`, `split_examples`, and the
resumable, per-process `batch_iterator`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["batch_iterator", "split_examples", "split_sequences", "split_text"]

T = TypeVar("T")


def _check_fraction(eval_fraction: float) -> float:
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)):
        raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
    if not 0.0 < float(eval_fraction) < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    return float(eval_fraction)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_nonnegative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def split_text(text: str, eval_fraction: float = 0.05) -> tuple[str, str]:
    """Split a text into a training part and a held-out tail of about ``eval_fraction``.

    The cut is placed at the start of a line: at ``len(text) - ceil(eval_fraction * len(text))``
    moved back to just after the previous newline (if the first part would otherwise be empty,
    the exact character position is used). ``train + held_out == text``.

    Args:
        text: The text to split.
        eval_fraction: Approximate fraction of characters to hold out, in (0, 1).

    Returns:
        ``(train, held_out)``, both non-empty.

    Raises:
        ValueError: If ``eval_fraction`` is not in (0, 1) or ``text`` has fewer than 2 characters.

    Example:
        >>> split_text("line one\\nline two\\nline three\\n", eval_fraction=0.3)
        ('line one\\nline two\\n', 'line three\\n')
    """
    fraction = _check_fraction(eval_fraction)
    if not isinstance(text, str) or len(text) < 2:
        raise ValueError(f"text must be a str of at least 2 characters, got {text!r:.60}")
    cut = len(text) - max(1, math.ceil(fraction * len(text)))
    cut = max(cut, 1)
    line_start = text.rfind("\n", 0, cut) + 1
    if line_start > 0:
        cut = line_start
    return text[:cut], text[cut:]


def split_sequences(
    tokens: np.ndarray, eval_fraction: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Split packed sequences into training rows and the held-out last rows.

    The last ``ceil(eval_fraction * N)`` rows are held out. Because
    `rslora_jax.data.tokenize_and_pack` keeps document order, the held-out rows are the tail of
    the corpus, never seen in training.

    Args:
        tokens: Packed sequences of shape ``(N, ...)``, ``N >= 2``.
        eval_fraction: Fraction of rows to hold out, in (0, 1).

    Returns:
        ``(train, held_out)``: views of the first ``N - k`` and the last ``k >= 1`` rows.

    Raises:
        ValueError: If ``tokens`` is not at least 2-D with at least 2 rows, or
            ``eval_fraction`` is not in (0, 1).

    Example:
        >>> train, held_out = split_sequences(np.arange(40).reshape(10, 4), eval_fraction=0.2)
        >>> train.shape, held_out.shape
        ((8, 4), (2, 4))
    """
    fraction = _check_fraction(eval_fraction)
    tokens = np.asarray(tokens)
    if tokens.ndim < 2 or tokens.shape[0] < 2:
        raise ValueError(
            f"tokens must have shape (num_sequences >= 2, seq_len + 1), got {tokens.shape}; "
            "use more data or a shorter seq_len to hold out an evaluation slice"
        )
    n = tokens.shape[0]
    n_eval = min(max(1, math.ceil(fraction * n)), n - 1)
    return tokens[: n - n_eval], tokens[n - n_eval :]


def split_examples(items: Sequence[T], eval_fraction: float = 0.05) -> tuple[list[T], list[T]]:
    """Split examples (or records) into training ones and the held-out last ones.

    The last ``ceil(eval_fraction * n)`` items (at least 1, at most ``n - 1``) are held out,
    before packing, so no held-out example shares a row with a training one.

    Raises:
        ValueError: If there are fewer than 2 items or ``eval_fraction`` is not in (0, 1).

    Example:
        >>> split_examples(list("abcdefghij"), 0.2)
        (['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'], ['i', 'j'])
    """
    fraction = _check_fraction(eval_fraction)
    items = list(items)
    if len(items) < 2:
        raise ValueError(
            f"{len(items)} example: at least 2 are needed (training and held-out); add data"
        )
    n_eval = min(max(1, math.ceil(fraction * len(items))), len(items) - 1)
    return items[: len(items) - n_eval], items[len(items) - n_eval :]


def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)


def batch_iterator(
    tokens: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """Yield shuffled training batches forever, reproducibly and resumably.

    The rows are visited as one endless stream: epoch ``e`` is a permutation of all ``N`` rows
    drawn from ``numpy.random.SeedSequence([seed, e])``, and the epochs follow each other.
    Global batch ``t`` is stream positions ``[t * batch_size, (t + 1) * batch_size)``. A batch
    may therefore span two epochs (and, when ``batch_size > N``, hold a row more than once);
    every row is seen once per epoch and no row is dropped. Batch ``t`` depends only on
    ``(seed, t)`` (and the data), so a run resumed with ``start_step=t`` sees exactly the batches
    an uninterrupted run would.

    With ``process_count > 1``, process ``p`` yields rows ``[p * b, (p + 1) * b)`` of each global
    batch, ``b = batch_size // process_count``: concatenating the processes' batches in process
    order gives the global batch, which is what ``jax.make_array_from_process_local_data``
    assembles.

    Args:
        tokens: Rows, shape ``(N, ...)`` (token windows ``(N, seq_len + 1)``, or packed rows
            ``(N, 5, seq_len)`` from `rslora_jax.data.pack_examples`), integer dtype.
        batch_size: Global batch size (all processes together).
        seed: Non-negative shuffling seed.
        start_step: Index of the first batch to yield.
        process_index: This process's index, in ``[0, process_count)``.
        process_count: Number of processes sharing each global batch; must divide
            ``batch_size``.

    Yields:
        int32 arrays of shape ``(batch_size // process_count, ...)``, for steps
        ``start_step, start_step + 1, ...``.

    Raises:
        ValueError: If ``tokens`` is not a non-empty integer array with at least 2 axes, an
            integer argument is out of range, or ``batch_size`` is not divisible by
            ``process_count``. Raised when the function is called, not at the first ``next``.

    Example:
        >>> rows = np.arange(12, dtype=np.int32).reshape(6, 2)
        >>> batches = batch_iterator(rows, 4, seed=0)
        >>> first, second = next(batches), next(batches)
        >>> resumed = next(batch_iterator(rows, 4, seed=0, start_step=1))
        >>> bool((resumed == second).all()), first.shape
        (True, (4, 2))
    """
    tokens = np.asarray(tokens)
    if tokens.ndim < 2 or tokens.shape[0] < 1 or (tokens.ndim == 2 and tokens.shape[1] < 2):
        raise ValueError(
            f"tokens must have shape (num_sequences >= 1, seq_len + 1 >= 2) or (num_rows >= 1, "
            f"planes, seq_len), got {tokens.shape}"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    batch_size = _check_positive_int("batch_size", batch_size)
    seed = _check_nonnegative_int("seed", seed)
    start_step = _check_nonnegative_int("start_step", start_step)
    process_count = _check_positive_int("process_count", process_count)
    process_index = _check_nonnegative_int("process_index", process_index)
    if process_index >= process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by process_count={process_count} so "
            "that each process gets an equal slice of the global batch"
        )
    return _batches(tokens, batch_size, seed, start_step, process_index, process_count)


def _batches(
    tokens: np.ndarray,
    batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
) -> Iterator[np.ndarray]:
    n = tokens.shape[0]
    local = batch_size // process_count
    cache: dict[int, np.ndarray] = {}

    def permutation(epoch: int) -> np.ndarray:
        if epoch not in cache:
            if len(cache) > 2:
                cache.pop(min(cache))
            cache[epoch] = _epoch_permutation(seed, epoch, n)
        return cache[epoch]

    step = start_step
    while True:
        position = step * batch_size + process_index * local
        index = np.empty(local, dtype=np.int64)
        filled = 0
        while filled < local:
            epoch, offset = divmod(position + filled, n)
            take = min(n - offset, local - filled)
            index[filled : filled + take] = permutation(epoch)[offset : offset + take]
            filled += take
        yield tokens[index].astype(np.int32)
        step += 1
