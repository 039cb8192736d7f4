"""Reading training data files: `load_records` (every format, for training) and `load_texts`
(plain documents, the older API).

A *record* is one training example as a file gives it, in one of four formats:

=============  ==========================================================  =====================
format         fields                                                      what the loss covers
=============  ==========================================================  =====================
``text``       ``text`` (or ``--text-field``); a plain-text file is one    every token
               record
``completion`` ``prompt`` + ``completion`` (strings)                       the completion
``alpaca``     ``instruction`` (+ optional ``input``) + ``output``          the output
``chat``       ``messages``: ``[{"role": "system"|"user"|"assistant",      the assistant turns
               "content": str}, ...]`` (OpenAI / Hugging Face chat rows);
               also ``prompt`` + ``completion`` given as message lists
=============  ==========================================================  =====================

(`rslora_jax.data.tokens` applies the rule; ``train_on_prompt=True`` counts every token.) The
format of a row is the first that fits in the order chat, completion, alpaca, text, unless a
format is forced. Every problem is reported as a `DataError` naming ``file:line`` and the field.

Files: ``.jsonl`` (one JSON object per line; blank lines skipped), ``.json`` (a JSON array of
objects; errors name the line where the object starts), ``.parquet`` (needs ``pyarrow``:
``pip install 'rslora-jax[parquet]'``; errors name the row), and anything else is plain UTF-8
text, the whole file one ``text`` record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FORMATS",
    "ROLES",
    "DataError",
    "Record",
    "load_records",
    "load_texts",
    "record_from_json",
]

#: The record formats, in the order a row's format is detected.
FORMATS: tuple[str, ...] = ("chat", "completion", "alpaca", "text")
#: The roles of chat messages.
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class DataError(ValueError):
    """A problem with the training data; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One training example as read from a file.

    Attributes:
        source: where it came from, ``file:line`` (``file:row N`` for Parquet,
            ``builtin:instruct#i`` for the built-in set): every later error names it.
        format: one of `FORMATS`.
        text: the text of a ``text`` record.
        prompt: the prompt of a ``completion`` record.
        completion: the completion of a ``completion`` record.
        messages: the turns of a ``chat`` record, ``((role, content), ...)``.
    """

    source: str
    format: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def as_text(self) -> str:
        """The record as one plain text (prompt and answer joined), for `load_texts`."""
        if self.format == "text":
            return self.text or ""
        if self.format == "completion":
            return join_pair(self.prompt or "", self.completion or "")
        raise DataError(f"{self.source}: a chat row has no plain-text form; use load_records")


def join_pair(first: str, second: str) -> str:
    """Joins two parts with a newline unless one side already has whitespace at the seam.

    Example:
        >>> join_pair("Q:", " A"), join_pair("Q:", "A")
        ('Q: A', 'Q:\\nA')
    """
    if not first or not second or first[-1].isspace() or second[0].isspace():
        return first + second
    return first + "\n" + second


def _string(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str, field: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: field {field!r} must be a non-empty list of {{'role', 'content'}} "
            f"objects, got {type(value).__name__ if value != [] else 'an empty list'}"
        )
    turns = []
    for i, turn in enumerate(value):
        at = f"{where}: {field}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content', got {turn!r:.60}")
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(f"{at}.role: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = turn.get("content")
        if content is None or (isinstance(content, str) and not content.strip()):
            raise DataError(f"{at}.content: the {role} turn has no content")
        if not isinstance(content, str):
            raise DataError(
                f"{at}.content must be a string, got {type(content).__name__} (multi-part "
                "content is not supported: join the text parts)"
            )
        turns.append((role, content))
    return tuple(turns)


def _chat(turns: tuple[tuple[str, str], ...], where: str, field: str) -> Record:
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: field {field!r} has no assistant turn: nothing to learn")
    return Record(where, "chat", messages=turns)


def _detect(record: dict, text_field: str) -> str | None:
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if text_field in record:
        return "text"
    return None


def record_from_json(
    record: Any, where: str, *, text_field: str = "text", format: str = "auto"
) -> Record:
    """One row (a parsed JSON object) as a `Record`.

    Args:
        record: the row.
        where: its location, ``file:line``; every error starts with it.
        text_field: the key of ``text`` rows.
        format: ``"auto"`` (detect, in the order of `FORMATS`) or one of `FORMATS`.

    Returns:
        The record. An Alpaca row becomes a ``chat`` record (user: the instruction, plus a blank
        line and the input when there is one; assistant: the output), so that it goes through
        the chat template like any conversation.

    Raises:
        DataError: naming `where` and the field, for a row that is not an object, lacks the
            format's fields, holds a value of the wrong type, a chat turn with an unknown role
            or no content, or a conversation without an assistant turn.

    Example:
        >>> record_from_json({"prompt": "2+2=", "completion": "4"}, "f.jsonl:1").format
        'completion'
        >>> record_from_json({"instruction": "Add.", "input": "2, 2", "output": "4"}, "f:2").messages
        (('user', 'Add.\\n\\n2, 2'), ('assistant', '4'))
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kind = _detect(record, text_field) if format == "auto" else format
    if kind is None:
        found = ", ".join(repr(key) for key in record) or "none"
        raise DataError(
            f"{where}: missing field {text_field!r} (found keys: {found}); expected "
            f"{text_field!r}, 'messages', 'prompt' and 'completion', or 'instruction' and "
            "'output'"
        )
    needed = {
        "chat": ("messages",),
        "completion": ("prompt", "completion"),
        "alpaca": ("instruction", "output"),
        "text": (text_field,),
    }.get(kind)
    if needed is None:
        raise DataError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    missing = [key for key in needed if key not in record]
    if missing:
        found = ", ".join(repr(key) for key in record) or "none"
        raise DataError(
            f"{where}: missing field {missing[0]!r} of the {kind} format (found: {found})"
        )
    if kind == "chat":
        return _chat(_messages(record["messages"], where, "messages"), where, "messages")
    if kind == "text":
        return Record(where, "text", text=_string(record, text_field, where))
    if kind == "completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational
            turns = _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
            return _chat(turns, where, "completion")
        return Record(
            where,
            "completion",
            prompt=_string(record, "prompt", where),
            completion=_string(record, "completion", where),
        )
    instruction = _string(record, "instruction", where)
    output = _string(record, "output", where)
    user = instruction
    if record.get("input") is not None:
        extra = _string(record, "input", where)
        if extra.strip():
            user = f"{instruction}\n\n{extra}"
    if not user.strip():
        raise DataError(f"{where}.instruction: the instruction is empty")
    if not output.strip():
        raise DataError(f"{where}.output: the output is empty")
    return Record(where, "chat", messages=(("user", user), ("assistant", output)))


# --------------------------------------------------------------------------------------------
# Files


def read_text(path: Path, shown: str) -> str:
    """A file's text as UTF-8 (a byte-order mark dropped); errors name the file and line."""
    if not path.exists():
        raise DataError(f"data file {shown} does not exist")
    if not path.is_file():
        raise DataError(f"data file {shown} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"data file {shown} cannot be read: {err}") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{shown}:{line}: not valid UTF-8 (byte {err.start}: {err.reason})"
        ) from err


def _jsonl_rows(text: str, shown: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{shown}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON at column {err.colno}: {err.msg}") from err


def _json_array_rows(text: str, shown: str) -> Iterator[tuple[str, Any]]:
    """The objects of a JSON array, each with the line where it starts."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, what: str) -> DataError:
        line = text.count("\n", 0, i) + 1
        return DataError(f"{shown}:{line}: {what}")

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise fail(i, "a .json data file must hold a JSON array of objects (or use .jsonl)")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise fail(err.pos, f"invalid JSON ({err.msg})") from err
        yield f"{shown}:{text.count(chr(10), 0, i) + 1}", value
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                raise fail(skip(i + 1), "extra data after the JSON array")
            return
        raise fail(i, "expected ',' or ']' in the JSON array")


def _parquet_rows(path: Path, shown: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"data file {shown}: reading Parquet needs pyarrow (pip install pyarrow, or "
            "pip install 'rslora-jax[parquet]'); or convert it to JSON Lines"
        ) from None
    if not path.is_file():
        raise DataError(f"data file {shown} does not exist or is not a regular file")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's own errors
        raise DataError(f"data file {shown}: not a readable Parquet file: {err}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{shown}: row {i}", row


def _rows(path: Path, shown: str) -> Iterator[tuple[str, Any]] | None:
    """The JSON rows of a structured file, or None for a plain-text file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path, shown)
    if suffix == ".jsonl":
        return _jsonl_rows(read_text(path, shown), shown)
    if suffix == ".json":
        return _json_array_rows(read_text(path, shown), shown)
    return None


def _check_paths(paths: Any, text_field: Any) -> list[str | Path]:
    if isinstance(paths, (str, bytes, Path)):
        raise DataError(f"paths must be a list of file paths, got a single path {paths!r}")
    paths = list(paths)
    if not paths:
        raise DataError("paths is empty: give at least one data file")
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"text_field must be a non-empty str, got {text_field!r}")
    for item in paths:
        if not isinstance(item, (str, Path)):
            raise DataError(f"paths must hold str or Path entries, got {item!r}")
    return paths


def load_records(
    paths: Sequence[str | Path], *, text_field: str = "text", format: str = "auto"
) -> list[Record]:
    """Loads training records from JSON Lines, JSON, Parquet and plain-text files.

    See the module docstring for the formats and file types. Rows whose text is blank
    (``text`` rows, plain files) are skipped; every other row must be complete.

    Args:
        paths: files, read in order; record order is file order, then line order.
        text_field: the key of ``text`` rows.
        format: ``"auto"`` or one of `FORMATS` (forces every row of a structured file).

    Returns:
        The records.

    Raises:
        DataError: naming the file (``file:line`` and the field for rows) when a file is
            missing, unreadable, not UTF-8, not valid JSON, or a row is not a complete record of
            its format (see `record_from_json`); and when no record is left.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "chat.jsonl").write_text(
        ...     '{"messages": [{"role": "user", "content": "Hi?"},'
        ...     ' {"role": "assistant", "content": "Hello."}]}\\n')
        >>> [(r.source.rsplit("/", 1)[-1], r.format) for r in load_records([folder / "chat.jsonl"])]
        [('chat.jsonl:1', 'chat')]
    """
    paths = _check_paths(paths, text_field)
    if format != "auto" and format not in FORMATS:
        raise DataError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    records: list[Record] = []
    for item in paths:
        path, shown = Path(item).expanduser(), str(item)
        rows = _rows(path, shown)
        if rows is None:
            text = read_text(path, shown)
            if text.strip():
                records.append(Record(f"{shown}:1", "text", text=text))
            continue
        for where, row in rows:
            record = record_from_json(row, where, text_field=text_field, format=format)
            if record.format == "text" and not (record.text or "").strip():
                continue
            records.append(record)
    if not records:
        names = ", ".join(str(item) for item in paths)
        raise DataError(f"no non-whitespace text found in the data files: {names}")
    return records


def load_texts(paths: Sequence[str | Path], *, text_field: str = "text") -> list[str]:
    """Loads documents from plain-text and JSON Lines files (the plain-text API).

    * ``.jsonl`` files (suffix compared case-insensitively): one JSON object per line; blank
      lines are skipped. Each object gives one document: its ``text_field`` value if the key is
      present; otherwise ``prompt`` + ``completion``, or ``instruction`` (+ optional ``input``)
      + ``output``. Two parts are joined with a newline unless there is already whitespace at
      the seam (``"Q:"`` + ``" A"`` stays ``"Q: A"``). The documents are plain text: nothing
      marks the prompt (`load_records` keeps the parts apart, for answer-only losses).
    * ``.json`` files are rejected (convert them to JSON Lines, or use `load_records`).
    * Any other file is plain UTF-8 text and the **whole file is one document** (it is not split
      on blank lines, so code and long prose keep their structure).

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
    paths = _check_paths(paths, text_field)
    documents: list[str] = []
    for item in paths:
        path, shown = Path(item).expanduser(), str(item)
        suffix = path.suffix.lower()
        if suffix == ".json":
            raise DataError(
                f"data file {shown}: .json is not supported; use JSON Lines (.jsonl, one object "
                "per line) or plain text"
            )
        text = read_text(path, shown)
        if suffix != ".jsonl":
            if text.strip():
                documents.append(text)
            continue
        for where, row in _jsonl_rows(text, shown):
            documents.append(_legacy_text(row, text_field, where))
    documents = [d for d in documents if d.strip()]
    if not documents:
        names = ", ".join(str(item) for item in paths)
        raise DataError(f"no non-whitespace text found in the data files: {names}")
    return documents


def _legacy_text(record: Any, text_field: str, where: str) -> str:
    """`load_texts`' rule: the text field wins; then prompt+completion, instruction+output."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field in record:
        return _string(record, text_field, where)
    for first, second in (("prompt", "completion"), ("instruction", "output")):
        if first in record and second in record:
            parts = [_string(record, first, where)]
            if first == "instruction" and record.get("input") is not None:
                extra = _string(record, "input", where)
                if extra.strip():
                    parts.append(extra)
            parts.append(_string(record, second, where))
            text = parts[0]
            for part in parts[1:]:
                text = join_pair(text, part)
            return text
    found = ", ".join(repr(key) for key in record) or "none"
    raise DataError(
        f"{where}: missing field {text_field!r} (found keys: {found}); expected "
        f"{text_field!r}, or 'prompt' and 'completion', or 'instruction' and 'output'"
    )
