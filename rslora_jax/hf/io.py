"""File I/O shared by the Hugging Face formats: safetensors in and out, JSON, tokenizers.

- One dtype table (:data:`ST_DTYPES`) for safetensors files, read and written.
- :func:`write_safetensors`: one file with PyTorch-style metadata and the umask's permissions.
- :func:`safetensors_header`: a safetensors file's header, checked against the file's size
  (empty, truncated or oversized-header files are refused with the file's name) before any
  tensor is read.
- :class:`TensorReader`: lazy, slice-wise reads of the tensors of one or more safetensors files
  (with a byte-level fallback for safetensors versions that cannot give numpy bfloat16).
- :func:`read_json`: a JSON object, with errors that name the file.
- :func:`load_tokenizer`: the package's one tokenizer loader (local files only, never remote
  code, the built-in tokenizer by default); defined in :mod:`rslora_jax.data`, which must stay
  importable without the rest of the package.

Atomic writes of files and directories live in :mod:`rslora_jax._files`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from rslora_jax._files import new_file_mode
from rslora_jax.data import load_tokenizer

#: safetensors dtype names we read and write, and their numpy dtypes.
ST_DTYPES: dict[str, Any] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
#: The numpy dtypes of :data:`ST_DTYPES`, to the safetensors names.
NP_TO_ST: dict[np.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
#: transformers' ``torch_dtype`` / ``dtype`` config names of the same dtypes.
HF_DTYPE_NAMES: dict[np.dtype, str] = {
    ST_DTYPES["F32"]: "float32",
    ST_DTYPES["F16"]: "float16",
    ST_DTYPES["BF16"]: "bfloat16",
    ST_DTYPES["F64"]: "float64",
}


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes one safetensors file (PyTorch-style metadata, the umask's permissions).

    Args:
        path: the file to write.
        tensors: name -> C-contiguous array of a dtype in :data:`ST_DTYPES`.
        metadata: more string entries for the header's ``__metadata__`` (``format`` is "pt").

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write_safetensors(path, {"w": np.ones((2, 3), np.float32)})
        >>> with contextlib.ExitStack() as stack:
        ...     TensorReader([path], stack).shape
        {'w': (2, 3)}
    """
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={**(metadata or {}), "format": "pt"})
    os.chmod(path, new_file_mode())  # save_file recreates the file with mode 0600


def read_json(path: str | os.PathLike[str], who: str) -> dict[str, Any]:
    """Reads a JSON object from a file; errors name the file.

    Args:
        path: the file.
        who: the caller, named in errors.

    Returns:
        The object.

    Raises:
        ValueError: the file is missing, not UTF-8 JSON, or does not hold an object.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "c.json"
        >>> _ = path.write_text('{"r": 4}')
        >>> read_json(path, "example")
        {'r': 4}
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{who}: {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{who}: {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{who}: {str(path)!r} does not hold a JSON object")
    return data


#: Bytes per element of every safetensors dtype (the format's own table).
_ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
#: The largest header the safetensors library accepts (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000


def safetensors_header(path: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    """Reads and checks the header of a safetensors file, without reading any tensor.

    Checks what a truncated, empty or damaged file gets wrong, against the file's size: the
    8-byte header length, the header (a JSON object of ``name -> {dtype, shape,
    data_offsets}``), and that every tensor's bytes lie inside the file and match its dtype and
    shape.

    Args:
        path: the file.

    Returns:
        ``(offset of the data, header)``; the header without ``__metadata__``.

    Raises:
        ValueError: naming the file and what is wrong with it.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write_safetensors(path, {"w": np.ones((2, 3), np.float32)})
        >>> safetensors_header(path)[1]["w"]["shape"]
        [2, 3]
        >>> _ = path.write_bytes(path.read_bytes()[:-4])
        >>> safetensors_header(path)
        Traceback (most recent call last):
        ...
        ValueError: safetensors file '...' is truncated: tensor 'w' ends at byte 24 of the data, but the file holds 20 bytes of data
    """
    shown = repr(str(path))
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                what = "empty" if size == 0 else f"only {size} bytes long"
                raise ValueError(
                    f"safetensors file {shown} is {what}: not a safetensors file (truncated?)"
                )
            n = int.from_bytes(f.read(8), "little")
            if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
                raise ValueError(
                    f"safetensors file {shown} announces a header of {n} bytes, but the file "
                    f"has {size} bytes (and a header may have at most {MAX_HEADER_BYTES}): "
                    "truncated, damaged or not a safetensors file"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise ValueError(f"safetensors file {shown} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"safetensors file {shown} is a directory") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(
            f"safetensors file {shown}: its header is not valid JSON (damaged, or not a "
            "safetensors file)"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(f"safetensors file {shown}: its header is not a JSON object")
    header = {k: v for k, v in header.items() if k != "__metadata__"}
    available = size - 8 - n
    for name, info in header.items():
        _check_entry(shown, name, info, available)
    return 8 + n, header


def _check_entry(shown: str, name: str, info: Any, available: int) -> None:
    """One header entry: a shape, offsets inside the data and of the size its dtype needs."""
    bad = f"safetensors file {shown}: tensor {name!r} has a malformed header entry {info!r}"
    if not isinstance(info, dict):
        raise ValueError(bad)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    ints = (list, tuple)
    if (
        not isinstance(dtype, str)
        or not isinstance(shape, ints)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or not isinstance(offsets, ints)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(bad)
    begin, end = offsets
    count = int(np.prod(shape, dtype=np.int64))
    # A dtype the table does not know (a newer format version) is left to the reader.
    nbytes = (count + 1) // 2 if dtype == "F4" else count * _ST_ITEMSIZE.get(dtype, 0)
    if dtype in _ST_ITEMSIZE and end - begin != nbytes:
        raise ValueError(
            f"safetensors file {shown}: tensor {name!r} ({dtype}, shape {list(shape)}) needs "
            f"{nbytes} bytes, but its data_offsets {[begin, end]} span {end - begin}: damaged"
        )
    if end > available:
        raise ValueError(
            f"safetensors file {shown} is truncated: tensor {name!r} ends at byte {end} of the "
            f"data, but the file holds {available} bytes of data"
        )


def _raw_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header) of a safetensors file."""
    return safetensors_header(path)


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike[str]) -> None:
    """Saves a transformers tokenizer so that transformers 4.x and 5.x both load it.

    transformers 5 writes ``tokenizer_class: "TokenizersBackend"``, a class transformers 4
    does not have; for a fast (``tokenizer.json``) tokenizer the class both know is
    ``PreTrainedTokenizerFast``, which is written instead.

    Args:
        tokenizer: a transformers tokenizer.
        directory: where its files go (an existing directory).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.mkdtemp()
        >>> save_tokenizer(load_tokenizer(), tmp)
        >>> read_json(Path(tmp) / "tokenizer_config.json", "example")["tokenizer_class"]
        'PreTrainedTokenizerFast'
    """
    tokenizer.save_pretrained(str(directory))
    file = Path(directory) / "tokenizer_config.json"
    if not file.is_file():
        return
    config = read_json(file, "save_tokenizer")
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _raw_tensor(path: Path, name: str, start: int, header: dict[str, Any]) -> np.ndarray:
    """A read-only view of one tensor's bytes in the file, as its dtype and shape."""
    info = header[name]
    begin, end = info["data_offsets"]
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return data.view(ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def read_tensor(handle: Any, name: str, file: str | os.PathLike[str]) -> np.ndarray:
    """The whole tensor `name` from an open ``safe_open`` handle on `file` (a copy).

    Older safetensors cannot give numpy bfloat16 (a TypeError): the bytes are read directly.

    Example:
        >>> import tempfile
        >>> from safetensors import safe_open
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write_safetensors(path, {"w": np.arange(3, dtype=np.float32)})
        >>> with safe_open(str(path), framework="numpy") as h:
        ...     read_tensor(h, "w", path)
        array([0., 1., 2.], dtype=float32)
    """
    try:
        return np.asarray(handle.get_tensor(name))
    except TypeError:
        start, header = _raw_header(Path(file))
        return np.array(_raw_tensor(Path(file), name, start, header))


class TensorReader:
    """Lazy, slice-wise reads of the tensors of safetensors files.

    Opens each file with ``safetensors.safe_open`` (kept open until `stack` closes) and records
    every tensor's file, shape and dtype; tensors are read only when asked for.

    Args:
        files: the safetensors files.
        stack: closes the files when it exits.

    Raises:
        ValueError: a file does not exist or is not a valid safetensors file (its header is
            checked against its size first, :func:`safetensors_header`), or a tensor name
            appears in two files.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
        >>> with contextlib.ExitStack() as stack:
        ...     reader = TensorReader([path], stack)
        ...     reader.read("w", (slice(1, 2), slice(None)))
        array([[3., 4., 5.]], dtype=float32)
    """

    def __init__(self, files: Sequence[str | os.PathLike[str]], stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.where: dict[str, Any] = {}  # name -> open safe_open handle
        self.files: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        self.metadata: dict[Path, dict[str, str]] = {}  # each file's ``__metadata__``
        self._raw: dict[Path, tuple[int, dict[str, Any]]] = {}
        for file in files:
            path = Path(file)
            if not path.is_file():
                raise ValueError(f"weight file {str(path)!r} does not exist")
            self._raw[path] = safetensors_header(path)
            try:
                handle = stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as err:  # the library's own error types vary between versions
                raise ValueError(
                    f"safetensors file {str(path)!r} cannot be opened: {type(err).__name__}: {err}"
                ) from None
            self.metadata[path] = dict(handle.metadata() or {})
            for name in handle.keys():
                if name in self.where:
                    raise ValueError(
                        f"tensor {name!r} appears in more than one weight file "
                        f"({str(self.files[name])!r} and {str(path)!r})"
                    )
                sl = handle.get_slice(name)
                self.where[name] = handle
                self.files[name] = path
                self.shape[name] = tuple(int(d) for d in sl.get_shape())
                self.dtype[name] = sl.get_dtype()

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Reads ``tensor[index]`` (basic slices) in the file's dtype."""
        try:
            return np.asarray(self.where[name].get_slice(name)[index])
        except TypeError:
            if self.dtype[name] != "BF16":
                raise
            # Older safetensors cannot give numpy bfloat16: read the raw bytes instead.
            return np.array(self._read_raw(name)[index])  # a copy, not a file view

    def get(self, name: str) -> np.ndarray:
        """Reads the whole tensor (a copy)."""
        return read_tensor(self.where[name], name, self.files[name])

    def _read_raw(self, name: str) -> np.ndarray:
        path = self.files[name]
        if path not in self._raw:
            self._raw[path] = _raw_header(path)
        return _raw_tensor(path, name, *self._raw[path])


__all__ = [
    "HF_DTYPE_NAMES",
    "NP_TO_ST",
    "ST_DTYPES",
    "TensorReader",
    "load_tokenizer",
    "read_json",
    "read_tensor",
    "safetensors_header",
    "save_tokenizer",
    "write_safetensors",
]
