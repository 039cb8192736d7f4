"""Text data for fine-tuning: offline corpora, file loading, token packing and batching.

Everything here is plain Python and NumPy: no JAX device work happens in this module, and
``tokenizers``/``transformers`` are imported lazily, so ``import rslora_jax.data`` stays light.

Data flows one way::

    load_texts(paths)  or  stdlib_finetune_documents()       -> list[str] documents
    tokenize_and_pack(documents, tokenizer, seq_len)           -> (N, seq_len + 1) int32
    split_sequences(packed, eval_fraction)                     -> train rows, held-out rows
    batch_iterator(train, batch_size, seed=..., start_step=t)  -> (batch, seq_len + 1) int32 ...

A row ``w`` of the packed array is one training example: ``inputs = w[:-1]``,
``targets = w[1:]``.

Built-in offline corpora (no network, any CPython >= 3.10):

* :func:`stdlib_docs_text` -- the English help topics shipped with CPython in
  ``pydoc_data.topics`` (0.46 to 0.51 million characters on CPython 3.10 to 3.13). Used to
  pretrain the tiny built-in base model and to train the built-in tokenizer
  (``rslora_jax/assets/tokenizer``, built by ``scripts/build_tokenizer.py``).
* :func:`stdlib_finetune_text` -- the source code of the fixed list :data:`FINETUNE_MODULES` of
  pure-Python standard-library modules (0.60 to 0.65 million characters on 3.10 to 3.13):
  Python code and docstrings, a different distribution from the prose above, so that
  fine-tuning has something to learn.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BUILTIN_TOKENIZER_DIR",
    "FINETUNE_MODULES",
    "batch_iterator",
    "load_texts",
    "load_tokenizer",
    "split_sequences",
    "split_text",
    "stdlib_docs_documents",
    "stdlib_docs_text",
    "stdlib_finetune_documents",
    "stdlib_finetune_text",
    "tokenize_and_pack",
]

#: Directory of the built-in byte-level BPE tokenizer (2048 tokens; ``<s> </s> <unk> <pad>``).
BUILTIN_TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "assets" / "tokenizer"

#: Standard-library modules whose source forms the default fine-tuning corpus, sorted.
#:
#: Chosen to be pure Python (a ``.py`` source file, not a C extension and not a module that
#: CPython 3.11+ freezes into the interpreter), present in CPython 3.10 to 3.13 with no
#: deprecation or removal scheduled, and mostly algorithmic code with docstrings. Together
#: 609,217 characters on CPython 3.11.7 (600k on 3.10.13, 627k on 3.12.1, 654k on 3.13.0).
#: The text is identical on every run with the same Python installation; it differs between
#: Python versions.
FINETUNE_MODULES: tuple[str, ...] = (
    "bisect",
    "calendar",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "fnmatch",
    "fractions",
    "functools",
    "graphlib",
    "heapq",
    "json",
    "json.decoder",
    "json.encoder",
    "json.scanner",
    "numbers",
    "pprint",
    "queue",
    "random",
    "sched",
    "shlex",
    "statistics",
    "string",
    "textwrap",
)


# --------------------------------------------------------------------------------------------
# Built-in offline corpora
# --------------------------------------------------------------------------------------------


def stdlib_docs_documents() -> list[str]:
    """Return CPython's help topics (``pydoc_data.topics.topics``) in sorted key order.

    Returns:
        One string per help topic (79 topics on CPython 3.11), each ending in a newline.

    Example:
        >>> docs = stdlib_docs_documents()
        >>> docs[0].startswith('The "assert" statement')
        True
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_docs_text() -> str:
    """Return the pretraining corpus: CPython's help topics joined in sorted key order.

    The topics are joined with a newline, so consecutive topics are separated by a blank line.
    The text is English prose with code examples (the language reference chapters behind
    ``help("if")`` etc.), 465,048 characters on CPython 3.11.7, available offline on every CPython.

    Returns:
        The joined text.

    Example:
        >>> text = stdlib_docs_text()
        >>> len(text) > 100_000 and "assert" in text
        True
    """
    return "\n".join(stdlib_docs_documents())


def _module_source(name: str) -> str:
    """Source text of a standard-library module, or its docstrings if the source is missing."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"standard-library module {name!r} was not found on this Python")
    source = None
    get_source = getattr(spec.loader, "get_source", None)
    if get_source is not None:
        try:
            source = get_source(name)
        except ImportError:
            source = None
    if source:
        return source
    # Installations that ship bytecode only (for example the embeddable Windows zip) have no
    # source, but the bytecode keeps the docstrings (unless Python runs with -OO).
    docs = _module_docstrings(name)
    if not docs.strip():
        raise RuntimeError(
            f"neither the source nor the docstrings of standard-library module {name!r} are "
            "available on this Python installation (bytecode-only install run with -OO?)"
        )
    return docs


def _module_docstrings(name: str) -> str:
    """The module docstring plus the docstrings of the objects it defines, in sorted order."""
    import inspect

    module = importlib.import_module(name)
    parts = []
    if module.__doc__:
        parts.append(inspect.cleandoc(module.__doc__))
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if getattr(obj, "__module__", None) != name or not getattr(obj, "__doc__", None):
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        parts.append(f"{attr}:\n{inspect.cleandoc(obj.__doc__)}")
    return "\n\n".join(parts) + "\n" if parts else ""


def stdlib_finetune_documents() -> list[str]:
    """Return the default fine-tuning corpus: one document per module in ``FINETUNE_MODULES``.

    Each document is the module's source file as shipped with this Python (read through the
    import system's loader, so zipped standard libraries work too; a bytecode-only install falls
    back to the module's docstrings). The modules are never imported when their source exists.

    Returns:
        One string per module, in the order of :data:`FINETUNE_MODULES`.

    Raises:
        RuntimeError: If a module has neither source nor docstrings on this installation.

    Example:
        >>> docs = stdlib_finetune_documents()
        >>> len(docs) == len(FINETUNE_MODULES)
        True
    """
    return [_module_source(name) for name in FINETUNE_MODULES]


def stdlib_finetune_text() -> str:
    """Return the default fine-tuning corpus as one string (modules joined by a blank line).

    Python source code with docstrings from the pure-Python modules in :data:`FINETUNE_MODULES`
    (about 0.61 million characters on CPython 3.11); deterministic for a given Python
    installation and different in kind from :func:`stdlib_docs_text` (code rather than prose).

    Returns:
        The joined text.

    Example:
        >>> text = stdlib_finetune_text()
        >>> "def bisect_right" in text
        True
    """
    return "\n\n".join(stdlib_finetune_documents())


# --------------------------------------------------------------------------------------------
# Held-out splits
# --------------------------------------------------------------------------------------------


def _check_fraction(eval_fraction: float) -> float:
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)):
        raise ValueError(f"eval_fraction must be a number in (0, 1), got {eval_fraction!r}")
    if not 0.0 < float(eval_fraction) < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    return float(eval_fraction)


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

    The last ``ceil(eval_fraction * N)`` rows are held out. Because :func:`tokenize_and_pack`
    keeps document order, the held-out rows are the tail of the corpus (for the built-in
    fine-tuning corpus: the last modules of :data:`FINETUNE_MODULES`), never seen in training.

    Args:
        tokens: Packed sequences of shape ``(N, seq_len + 1)``, ``N >= 2``.
        eval_fraction: Fraction of rows to hold out, in (0, 1).

    Returns:
        ``(train, held_out)``: views of the first ``N - k`` and the last ``k >= 1`` rows.

    Raises:
        ValueError: If ``tokens`` is not 2-D with at least 2 rows, or ``eval_fraction`` is not
            in (0, 1).

    Example:
        >>> train, held_out = split_sequences(np.arange(40).reshape(10, 4), eval_fraction=0.2)
        >>> train.shape, held_out.shape
        ((8, 4), (2, 4))
    """
    fraction = _check_fraction(eval_fraction)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 2:
        raise ValueError(
            f"tokens must have shape (num_sequences >= 2, seq_len + 1), got {tokens.shape}; "
            "use more data or a shorter seq_len to hold out an evaluation slice"
        )
    n = tokens.shape[0]
    n_eval = min(max(1, math.ceil(fraction * n)), n - 1)
    return tokens[: n - n_eval], tokens[n - n_eval :]


# --------------------------------------------------------------------------------------------
# Loading files
# --------------------------------------------------------------------------------------------

_PAIR_FIELDS = (("prompt", "completion"), ("instruction", "output"))


def _join_pair(first: str, second: str) -> str:
    """Join two parts with a newline unless one side already has whitespace at the seam."""
    if not first or not second or first[-1].isspace() or second[0].isspace():
        return first + second
    return first + "\n" + second


def _record_text(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field in record:
        keys: tuple[str, ...] = (text_field,)
    else:
        keys = ()
        for pair in _PAIR_FIELDS:
            if all(key in record for key in pair):
                keys = pair
                break
        if not keys:
            found = ", ".join(repr(key) for key in record) or "none"
            raise ValueError(
                f"{where}: missing field {text_field!r} (found keys: {found}); expected "
                f"{text_field!r}, or 'prompt' and 'completion', or 'instruction' and 'output'"
            )
    for key in keys:
        if not isinstance(record[key], str):
            raise ValueError(
                f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}"
            )
    if len(keys) == 1:
        return record[keys[0]]
    parts = [record[keys[0]]]
    if keys[0] == "instruction" and record.get("input") is not None:
        extra = record["input"]
        if not isinstance(extra, str):
            raise ValueError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        if extra.strip():
            parts.append(extra)
    parts.append(record[keys[1]])
    text = parts[0]
    for part in parts[1:]:
        text = _join_pair(text, part)
    return text


def _read_text(path: Path, shown: str) -> str:
    if not path.exists():
        raise ValueError(f"data file {shown} does not exist")
    if not path.is_file():
        raise ValueError(f"data file {shown} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"data file {shown} cannot be read: {err}") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{shown}:{line}: not valid UTF-8 (byte {err.start}: {err.reason})"
        ) from err


def load_texts(paths: Sequence[str | Path], *, text_field: str = "text") -> list[str]:
    """Load documents from plain-text and JSON Lines files.

    * ``.jsonl`` files (suffix compared case-insensitively): one JSON object per line; blank
      lines are skipped. Each object gives one document: its ``text_field`` value if the key is
      present; otherwise ``prompt`` + ``completion``, or ``instruction`` (+ optional ``input``)
      + ``output``. Two parts are joined with a newline unless there is already whitespace at
      the seam (``"Q:"`` + ``" A"`` stays ``"Q: A"``). The loss later covers the whole document:
      prompts are not masked.
    * ``.json`` files are rejected (convert them to JSON Lines).
    * Any other file is plain UTF-8 text and the **whole file is one document** (it is not split
      on blank lines, so code and long prose keep their structure; packing concatenates
      documents anyway).

    Files are read as UTF-8 (a leading byte-order mark is dropped). Documents with no
    non-whitespace character are dropped.

    Args:
        paths: Files to read, in order. Document order is preserved.
        text_field: Key holding the text in JSONL objects.

    Returns:
        The documents, in file order and line order.

    Raises:
        ValueError: Naming the file (and ``file:line`` for JSONL) when a file is missing, is not
            a regular file, cannot be read, is not UTF-8, has a line that is not a JSON object,
            lacks the text field, or holds a non-string value; and when no document has any
            non-whitespace text at all.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.jsonl").write_text('{"prompt": "2+2=", "completion": " 4"}\\n')
        >>> _ = (folder / "b.txt").write_text("Plain text.\\n\\nStill the same document.\\n")
        >>> load_texts([folder / "a.jsonl", folder / "b.txt"])
        ['2+2= 4', 'Plain text.\\n\\nStill the same document.\\n']
    """
    if isinstance(paths, (str, bytes, Path)):
        raise ValueError(f"paths must be a list of file paths, got a single path {paths!r}")
    paths = list(paths)
    if not paths:
        raise ValueError("paths is empty: give at least one data file")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty str, got {text_field!r}")
    documents: list[str] = []
    for item in paths:
        if not isinstance(item, (str, Path)):
            raise ValueError(f"paths must hold str or Path entries, got {item!r}")
        path = Path(item).expanduser()
        shown = str(item)
        suffix = path.suffix.lower()
        if suffix == ".json":
            raise ValueError(
                f"data file {shown}: .json is not supported; use JSON Lines (.jsonl, one object "
                "per line) or plain text"
            )
        text = _read_text(path, shown)
        if suffix != ".jsonl":
            if text.strip():
                documents.append(text)
            continue
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{shown}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{where}: invalid JSON at column {err.colno}: {err.msg}"
                ) from err
            document = _record_text(record, text_field, where)
            if document.strip():
                documents.append(document)
    if not documents:
        names = ", ".join(str(item) for item in paths)
        raise ValueError(f"no non-whitespace text found in the data files: {names}")
    return documents


# --------------------------------------------------------------------------------------------
# Tokenizing and packing
# --------------------------------------------------------------------------------------------


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


def _check_nonnegative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def tokenize_and_pack(
    texts: Sequence[str], tokenizer: Any, seq_len: int, *, add_eos: bool = True
) -> np.ndarray:
    """Tokenize documents, concatenate them and cut the stream into training windows.

    Each document is encoded without special tokens (``add_special_tokens=False``) and, when
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
    encoded = tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    pieces = []
    for ids in encoded:
        pieces.append(np.asarray(ids, dtype=np.int64).reshape(-1))
        if eos_id is not None:
            pieces.append(np.asarray([eos_id], dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int64)
    info = np.iinfo(np.int32)
    if stream.size and (stream.min() < 0 or stream.max() > info.max):
        raise ValueError(
            f"token ids must lie in [0, {info.max}], got range [{stream.min()}, {stream.max()}]"
        )
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


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


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
        tokens: Packed sequences, shape ``(N, seq_len + 1)``, integer dtype.
        batch_size: Global batch size (all processes together).
        seed: Non-negative shuffling seed.
        start_step: Index of the first batch to yield.
        process_index: This process's index, in ``[0, process_count)``.
        process_count: Number of processes sharing each global batch; must divide
            ``batch_size``.

    Yields:
        int32 arrays of shape ``(batch_size // process_count, seq_len + 1)``, for steps
        ``start_step, start_step + 1, ...``.

    Raises:
        ValueError: If ``tokens`` is not a non-empty 2-D integer array, an integer argument is
            out of range, or ``batch_size`` is not divisible by ``process_count``. Raised when
            the function is called, not at the first ``next``.

    Example:
        >>> rows = np.arange(12, dtype=np.int32).reshape(6, 2)
        >>> batches = batch_iterator(rows, 4, seed=0)
        >>> first, second = next(batches), next(batches)
        >>> resumed = next(batch_iterator(rows, 4, seed=0, start_step=1))
        >>> bool((resumed == second).all()), first.shape
        (True, (4, 2))
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(
            f"tokens must have shape (num_sequences >= 1, seq_len + 1 >= 2), got {tokens.shape}"
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
