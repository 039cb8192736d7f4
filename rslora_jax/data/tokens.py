"""Tokenizing: the tokenizer loader, records -> token ids with answer masks (`tokenize_records`),
and the plain stream packing of documents (`tokenize_and_pack`).

An `Example` is a token sequence ``ids`` with a 0/1 ``weights`` vector of the same length:
``weights[i] == 1`` when token ``i`` is a target the loss counts. Which tokens count:

* ``text``: every token (and the end-of-sequence token appended after the document);
* ``completion``: the completion's tokens and the end-of-sequence token after them; the prompt
  (joined to the completion with a newline unless there is whitespace at the seam, as
  `rslora_jax.data.records.join_pair`) is encoded separately, so the boundary is exact;
* ``chat`` (and Alpaca rows, which are chats): the tokens of the assistant turns as the chat
  template renders them, end-of-turn marker included (`rslora_jax.data.templates`); a token
  counts when its characters overlap an answer. System and user turns do not count.

With ``train_on_prompt=True`` every token counts. ``tokenizers``/``transformers`` are imported
inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rslora_jax.data.records import DataError, Record, join_pair
from rslora_jax.data.templates import render_chat

__all__ = [
    "BUILTIN_TOKENIZER_DIR",
    "Example",
    "load_tokenizer",
    "tokenize_and_pack",
    "tokenize_records",
]

#: Directory of the built-in byte-level BPE tokenizer (2048 tokens; ``<s> </s> <unk> <pad>``).
BUILTIN_TOKENIZER_DIR: Path = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized training example.

    Attributes:
        ids: int32 token ids, shape ``(n,)``.
        weights: uint8, shape ``(n,)``: 1 where the token is a target the loss counts (the
            first token is never a target: nothing predicts it).
        source: the record's location (``file:line``).
        windowed: a long example is cut into several windows (plain text) rather than
            truncated (instruction data, where the beginning is the prompt).
    """

    ids: np.ndarray
    weights: np.ndarray
    source: str
    windowed: bool = False


def load_tokenizer(name_or_path: str | Path | None = None, **kwargs: Any) -> Any:
    """Loads a ``transformers`` tokenizer from local files; the built-in one by default.

    The one tokenizer loader of the package (``rslora_jax.hf.load_tokenizer`` is this function).
    It never downloads (``local_files_only=True``) and never runs code shipped with a model
    (``trust_remote_code=False``); asking for either is an error.

    Args:
        name_or_path: A tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``, ...)
            or a name already in the local Hugging Face cache; None for the built-in tokenizer
            :data:`BUILTIN_TOKENIZER_DIR`.
        **kwargs: Passed to ``transformers.AutoTokenizer.from_pretrained``.

    Returns:
        The tokenizer.

    Raises:
        ValueError: ``local_files_only=False`` or ``trust_remote_code=True`` was passed.

    Example:
        >>> tokenizer = load_tokenizer()
        >>> len(tokenizer), tokenizer.eos_token
        (2048, '</s>')
    """
    for key, forced in (("local_files_only", True), ("trust_remote_code", False)):
        if kwargs.get(key, forced) is not forced:
            raise ValueError(
                f"load_tokenizer: {key}={kwargs[key]!r} is not allowed; tokenizers load from "
                "local files only and never run remote code"
            )
        kwargs[key] = forced
    from transformers import AutoTokenizer

    if name_or_path is None:
        name_or_path = BUILTIN_TOKENIZER_DIR
    return AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)[
        "input_ids"
    ]


def _encode_spans(
    tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[list[int], np.ndarray]]:
    """Token ids of each text and, per token, whether its characters overlap a span."""
    if not texts:
        return []
    try:
        enc = tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_offsets_mapping=True,
            verbose=False,
        )
        offsets = enc["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return [_encode_pieces(tokenizer, t, s) for t, s in zip(texts, spans)]
    out = []
    for ids, offs, text_spans in zip(enc["input_ids"], offsets, spans):
        starts = np.asarray([o[0] for o in offs], np.int64).reshape(-1)
        ends = np.asarray([o[1] for o in offs], np.int64).reshape(-1)
        mask = np.zeros(len(ids), np.uint8)
        for a, b in text_spans:
            mask |= ((starts < b) & (ends > a)).astype(np.uint8)
        out.append((list(ids), mask))
    return out


def _encode_pieces(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], np.ndarray]:
    """Fallback without offsets (slow tokenizers): encode the pieces between span edges."""
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids: list[int] = []
    mask: list[int] = []
    for a, b in itertools.pairwise(cuts):
        inside = any(s <= a and b <= e for s, e in spans)
        piece = _encode(tokenizer, [text[a:b]])[0]
        ids += piece
        mask += [int(inside)] * len(piece)
    return ids, np.asarray(mask, np.uint8)


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    chat_template: str | None = None,
    train_on_prompt: bool = False,
    add_eos: bool = True,
) -> list[Example]:
    """Tokenizes records into `Example`s whose weights mark the tokens the loss counts.

    See the module docstring for which tokens count. Encoding uses no special tokens of the
    tokenizer's own (``add_special_tokens=False``): the chat template writes the ones it wants.

    Args:
        records: from `rslora_jax.data.load_records` (or built in code).
        tokenizer: a ``transformers`` tokenizer (with ``eos_token_id`` when `add_eos`).
        chat_template: a Jinja template for chat rows; None: the tokenizer's own, or
            `rslora_jax.data.DEFAULT_CHAT_TEMPLATE` when it has none.
        train_on_prompt: count every token, prompts included.
        add_eos: append the end-of-sequence token after ``text`` and ``completion`` records
            (chat rows end as their template says).

    Returns:
        One example per record, in order.

    Raises:
        DataError: naming the record's ``file:line`` and field, for a completion or an answer
            that is empty after tokenization, a chat template that fails to render, or a
            tokenizer without an end-of-sequence token when `add_eos`; ValueError for a token
            id outside int32.

    Example:
        >>> from rslora_jax.data.records import Record
        >>> tok = load_tokenizer()
        >>> (ex,) = tokenize_records([Record("f:1", "completion", prompt="2+2=", completion="4")],
        ...                          tok)
        >>> tok.decode(ex.ids), ex.weights.tolist()
        ('2+2=\\n4</s>', [0, 0, 0, 0, 0, 1, 1])
    """
    records = list(records)
    eos_id = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    if add_eos and eos_id is None and any(r.format in ("text", "completion") for r in records):
        raise DataError(
            "the tokenizer has no eos_token_id, which ends every text and completion; set one "
            "in its tokenizer_config.json"
        )
    eos = [eos_id] if eos_id is not None else []
    out: list[Example | None] = [None] * len(records)
    by_kind: dict[str, list[int]] = {"text": [], "completion": [], "chat": []}
    for i, record in enumerate(records):
        if record.format not in by_kind:
            raise DataError(f"{record.source}: unknown record format {record.format!r}")
        by_kind[record.format].append(i)

    texts = _encode(tokenizer, [records[i].text or "" for i in by_kind["text"]])
    for i, ids in zip(by_kind["text"], texts):
        full = [*ids, *eos]
        out[i] = Example(_ids(full), np.ones(len(full), np.uint8), records[i].source, True)

    comp = [records[i] for i in by_kind["completion"]]
    prompts = [_prompt_part(r.prompt or "", r.completion or "") for r in comp]
    p_ids = _encode(tokenizer, prompts)
    c_ids = _encode(tokenizer, [r.completion or "" for r in comp])
    for i, record, p, c in zip(by_kind["completion"], comp, p_ids, c_ids):
        if not c:
            raise DataError(
                f"{record.source}: field 'completion' is empty after tokenization: nothing to learn"
            )
        full = [*p, *c, *eos]
        weights = np.ones(len(full), np.uint8)
        if not train_on_prompt:
            weights[: len(p)] = 0
        out[i] = Example(_ids(full), weights, record.source)

    rendered = [
        render_chat(
            tokenizer,
            records[i].messages or (),
            chat_template,
            where=records[i].source,
            locate_answers=not train_on_prompt,
        )
        for i in by_kind["chat"]
    ]
    encoded = _encode_spans(tokenizer, [t for t, _ in rendered], [s for _, s in rendered])
    for i, (ids, mask) in zip(by_kind["chat"], encoded):
        if not ids:
            raise DataError(f"{records[i].source}: the conversation renders as no tokens")
        if train_on_prompt:
            mask = np.ones(len(ids), np.uint8)
        elif not mask[1:].any():
            raise DataError(
                f"{records[i].source}: messages: the assistant turns are empty after "
                "tokenization: nothing to learn"
            )
        out[i] = Example(_ids(ids), mask, records[i].source)
    return [ex for ex in out if ex is not None]


def _prompt_part(prompt: str, completion: str) -> str:
    """The prompt with the seam `join_pair` puts between it and the completion."""
    return join_pair(prompt, completion)[: len(join_pair(prompt, completion)) - len(completion)]


def _ids(ids: Sequence[int]) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    info = np.iinfo(np.int32)
    if arr.size and (arr.min() < 0 or arr.max() > info.max):
        raise ValueError(
            f"token ids must lie in [0, {info.max}], got range [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int32)


def tokenize_and_pack(
    texts: Sequence[str], tokenizer: Any, seq_len: int, *, add_eos: bool = True
) -> np.ndarray:
    """Tokenize documents, concatenate them and cut the stream into training windows.

    The plain language-model layout (used by `examples/rank_sweep.py`; the fine-tuning command
    packs with `rslora_jax.data.pack_examples` instead, which keeps documents apart). Each
    document is encoded without special tokens (``add_special_tokens=False``) and, when
    ``add_eos``, followed by ``tokenizer.eos_token_id``, so an end-of-sequence token separates
    consecutive documents (and ends the last). The stream ``t`` of ``T`` tokens is cut into
    ``N = (T - 1) // seq_len`` windows ``t[i * seq_len : i * seq_len + seq_len + 1]``:
    consecutive windows share one token, so every token after the first is a target exactly
    once. The ``(T - 1) % seq_len`` tokens at the end that do not fill a window are dropped.

    Args:
        texts: Documents, in order (a list, not a single str).
        tokenizer: A ``transformers`` tokenizer (anything that, called as
            ``tokenizer(list_of_str, add_special_tokens=False, return_attention_mask=False,
            verbose=False)``, returns a mapping with ``"input_ids"``, and has ``eos_token_id``).
        seq_len: Model context length; each row holds ``seq_len + 1`` tokens.
        add_eos: Append the end-of-sequence token after every document.

    Returns:
        int32 array of shape ``(N, seq_len + 1)``; ``inputs = rows[:, :-1]``,
        ``targets = rows[:, 1:]``.

    Raises:
        ValueError: If ``texts`` is a str or empty, ``seq_len`` is not a positive int, ``add_eos``
            is set but the tokenizer has no end-of-sequence token, a token id does not fit int32,
            or there are fewer than ``seq_len + 1`` tokens in total.

    Example:
        >>> tokenizer = load_tokenizer()
        >>> rows = tokenize_and_pack(["Hello, world!", "bye"], tokenizer, seq_len=4)
        >>> rows.shape, rows.dtype
        ((2, 5), dtype('int32'))
        >>> tokenizer.decode(np.concatenate([rows[0], rows[1, 1:]]))
        'Hello, world!</s>'
    """
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a list of documents, got a single str")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one document")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{index}] must be a str, got {type(text).__name__}")
    seq_len = _check_positive_int("seq_len", seq_len)
    eos_id = None
    if add_eos:
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise ValueError(
                "add_eos=True but the tokenizer has no eos_token_id; set tokenizer.eos_token or "
                "pass add_eos=False"
            )
    pieces = []
    for ids in _encode(tokenizer, texts):
        pieces.append(np.asarray(ids, dtype=np.int64).reshape(-1))
        if eos_id is not None:
            pieces.append(np.asarray([eos_id], dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int64)
    stream = _ids(stream)
    window = seq_len + 1
    if stream.size < window:
        raise ValueError(
            f"the data has {stream.size} tokens ({len(texts)} documents"
            f"{', eos included' if add_eos else ''}) but one sequence of seq_len={seq_len} "
            f"needs {window} tokens; add data or lower seq_len"
        )
    num = (stream.size - 1) // seq_len
    starts = np.arange(num)[:, None] * seq_len + np.arange(window)[None, :]
    return stream[starts].astype(np.int32)
