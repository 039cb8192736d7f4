"""Hugging Face checkpoint directories in and out: config.json + safetensors weights.

Reading streams tensor by tensor (or slice by slice, when a sharding is given) through
:func:`safetensors.safe_open`, so host memory stays about one tensor (one stacked leaf for
scanned layers); PyTorch ``(out, in)`` Linear weights become Flax ``(in, out)`` kernels.
Writing produces what ``transformers.AutoModelForCausalLM.from_pretrained`` loads: config.json,
``model.safetensors`` or shards plus ``model.safetensors.index.json``. Each file is written
under a temporary name in the target directory and moved into place with :func:`os.replace`,
only after every file of the save has been written.

Name mapping (see :func:`hf_module_name` and :func:`flax_module_path`)::

    model/embed_tokens/embedding               <-> model.embed_tokens.weight
    model/layers/self_attn/q_proj/kernel[i]    <-> model.layers.{i}.self_attn.q_proj.weight (.T)
    model/layers/{i}/mlp/up_proj/bias          <-> model.layers.{i}.mlp.up_proj.bias
    model/layers/input_layernorm/scale[i]      <-> model.layers.{i}.input_layernorm.weight
    model/norm/scale                           <-> model.norm.weight
    lm_head/kernel                             <-> lm_head.weight (.T; absent when tied)

transformers and torch are imported lazily: importing this module imports neither.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rslora_jax._types import Params
from rslora_jax.models.llama import MODEL_TYPES, LlamaConfig, init_params

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "pytorch_model.bin.index.json")
# Tensors some checkpoints carry that the model recomputes (old Llama checkpoints).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_HF_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float64): "float64",
}


# --------------------------------------------------------------------------------------------
# Name mapping


def hf_module_name(path: str, layer: int | None = None) -> str:
    """Maps one of our module paths to Hugging Face's dotted module name.

    Args:
        path: '/'-joined path of the dict holding a ``kernel`` (or ``scale``/``embedding``),
            scanned (``model/layers/self_attn/q_proj``) or not (``model/layers/3/self_attn/q_proj``).
        layer: the layer index for a scanned path; must be None otherwise.

    Returns:
        The dotted name, e.g. ``model.layers.3.self_attn.q_proj``.

    Raises:
        ValueError: if a scanned layer path has no ``layer``, or ``layer`` is given for a path
            that already names its layer or is outside the layers.

    Example:
        >>> hf_module_name("model/layers/self_attn/q_proj", 3)
        'model.layers.3.self_attn.q_proj'
        >>> hf_module_name("model/layers/3/self_attn/q_proj")
        'model.layers.3.self_attn.q_proj'
        >>> hf_module_name("lm_head")
        'lm_head'
    """
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError(f"hf_module_name: path={path!r} is empty")
    in_layers = len(parts) >= 2 and parts[0] == "model" and parts[1] == "layers"
    if in_layers and len(parts) > 2 and parts[2].isdigit():
        if layer is not None:
            raise ValueError(
                f"hf_module_name: path={path!r} already names its layer; got layer={layer!r}"
            )
    elif in_layers:
        if layer is None:
            raise ValueError(f"hf_module_name: scanned path={path!r} needs a layer index")
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or layer < 0:
            raise ValueError(f"hf_module_name: layer={layer!r} must be an int >= 0")
        parts = [*parts[:2], str(int(layer)), *parts[2:]]
    elif layer is not None:
        raise ValueError(f"hf_module_name: path={path!r} is not a layer path; got layer={layer!r}")
    return ".".join(parts)


def flax_module_path(name: str, scan_layers: bool = True) -> tuple[str, int | None]:
    """Inverse of :func:`hf_module_name`: a dotted HF module name to ``(path, layer)``.

    Args:
        name: e.g. ``model.layers.3.self_attn.q_proj``.
        scan_layers: True for our scanned layout (layer index returned separately), False for
            the unscanned one (layer index kept in the path, ``layer`` None).

    Returns:
        ``(path, layer)`` such that ``hf_module_name(path, layer) == name``.

    Raises:
        ValueError: for a layer name without a numeric index.

    Example:
        >>> flax_module_path("model.layers.3.self_attn.q_proj")
        ('model/layers/self_attn/q_proj', 3)
        >>> flax_module_path("model.layers.3.self_attn.q_proj", scan_layers=False)
        ('model/layers/3/self_attn/q_proj', None)
    """
    parts = [p for p in name.split(".") if p]
    if len(parts) >= 2 and parts[0] == "model" and parts[1] == "layers":
        if len(parts) < 3 or not parts[2].isdigit():
            raise ValueError(f"flax_module_path: name={name!r} has no layer index")
        if scan_layers:
            return "/".join([*parts[:2], *parts[3:]]), int(parts[2])
    return "/".join(parts), None


def _hf_tensor_name(leaf_path: tuple[str, ...], layer: int | None) -> tuple[str, bool]:
    """(HF tensor name, whether the array is transposed) for a leaf of our tree."""
    *module, leaf = leaf_path
    if leaf not in _LEAF_TO_HF:
        raise ValueError(
            f"parameter {'/'.join(leaf_path)!r} has no Hugging Face counterpart "
            f"(leaf {leaf!r}; expected one of {sorted(_LEAF_TO_HF)})"
        )
    return f"{hf_module_name('/'.join(module), layer)}.{_LEAF_TO_HF[leaf]}", leaf == "kernel"


def _path_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _leaf_specs(abstract: Params, scanned: bool) -> dict[tuple[str, ...], list[tuple[str, bool]]]:
    """For each leaf of an (abstract) tree: its HF tensor names (one per stacked layer)."""
    specs: dict[tuple[str, ...], list[tuple[str, bool]]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = _path_keys(path)
        if scanned and keys[:2] == ("model", "layers"):
            specs[keys] = [_hf_tensor_name(keys, i) for i in range(leaf.shape[0])]
        else:
            specs[keys] = [_hf_tensor_name(keys, None)]
    return specs


def _natural_key(name: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _abstract_params(config: LlamaConfig) -> Params:
    return jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))


# --------------------------------------------------------------------------------------------
# Config and tokenizer


def load_config(directory: str | os.PathLike[str]) -> Any:
    """Reads ``config.json`` with transformers' AutoConfig, offline and without remote code.

    Args:
        directory: a checkpoint directory.

    Returns:
        The transformers config object.

    Raises:
        ValueError: if there is no config.json or the model type is not llama/mistral/qwen2.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> LlamaConfig.tiny().to_hf().save_pretrained(tmp.name)
        >>> load_config(tmp.name).model_type
        'llama'
        >>> tmp.cleanup()
    """
    path = Path(directory)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"load_config: {str(path)!r} has no {CONFIG_NAME}")
    with open(path / CONFIG_NAME, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"load_config: {str(path / CONFIG_NAME)!r} has model_type={model_type!r}; "
            f"supported: {MODEL_TYPES}"
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def load_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """Loads the tokenizer saved in a checkpoint directory (offline, no remote code).

    Args:
        directory: a directory holding tokenizer files (tokenizer.json, tokenizer_config.json).

    Returns:
        The transformers tokenizer.

    Example::

        tok = load_tokenizer("/models/TinyLlama-1.1B")
        ids = tok("hello", return_tensors="np")["input_ids"]
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(directory), local_files_only=True, trust_remote_code=False
    )


# --------------------------------------------------------------------------------------------
# Loading


def _weight_files(directory: Path) -> list[str]:
    """The safetensors files to read (``model.safetensors`` first, as transformers does)."""
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [SAFE_WEIGHTS_NAME]
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{str(index)!r} has no 'weight_map'")
        for fname in set(weight_map.values()):
            if not isinstance(fname, str) or Path(fname).name != fname or fname in (".", ".."):
                raise ValueError(
                    f"{str(index)!r} names the file {fname!r}, which is not a plain file name "
                    "inside the checkpoint directory"
                )
        return sorted(set(weight_map.values()))
    pickles = sorted({p.name for pat in _PICKLE_PATTERNS for p in directory.glob(pat)})
    if pickles:
        raise ValueError(
            f"{str(directory)!r} holds only PyTorch pickle weights ({', '.join(pickles)}), "
            f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}. rslora_jax reads safetensors "
            "only (pickles can run code on load). Convert once with transformers: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True)`."
        )
    raise ValueError(f"{str(directory)!r} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")


class _TensorReader:
    """Lazy, slice-wise reads of the tensors of a checkpoint's safetensors files."""

    def __init__(self, directory: Path, stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        self.directory = directory
        self.where: dict[str, Any] = {}  # name -> open safe_open handle
        self.files: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        self._raw: dict[Path, tuple[int, dict[str, Any]]] = {}
        for fname in _weight_files(directory):
            path = directory / fname
            if not path.is_file():
                raise ValueError(f"weight file {str(path)!r} named by the index does not exist")
            handle = stack.enter_context(safe_open(str(path), framework="numpy"))
            for name in handle.keys():
                if name in self.where:
                    raise ValueError(f"tensor {name!r} appears in more than one weight file")
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

    def _read_raw(self, name: str) -> np.ndarray:
        path = self.files[name]
        if path not in self._raw:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self._raw[path] = (8 + n, json.loads(f.read(n)))
        start, header = self._raw[path]
        info = header[name]
        begin, end = info["data_offsets"]
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        return data.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _check_names(
    reader: _TensorReader,
    expected: dict[str, tuple[int, ...]],
    config: LlamaConfig,
    directory: Path,
) -> None:
    present = set(reader.shape)
    ignored = {n for n in present if n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")  # a tied head some checkpoints store anyway
    missing = sorted(set(expected) - present, key=_natural_key)
    unexpected = sorted(present - set(expected) - ignored, key=_natural_key)
    if missing or unexpected:
        msg = [f"checkpoint {str(directory)!r} does not match its {config.model_type} config:"]
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {missing[:10]}")
        if unexpected:
            msg.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:10]}")
        raise ValueError(" ".join(msg))
    for name, shape in expected.items():
        if reader.shape[name] != shape:
            raise ValueError(
                f"tensor {name!r} in {str(reader.files[name])!r} has shape "
                f"{reader.shape[name]}, expected {shape} from the config"
            )
        if reader.dtype[name] not in _ST_DTYPES:
            raise ValueError(
                f"tensor {name!r} has dtype {reader.dtype[name]}; expected one of "
                f"{sorted(_ST_DTYPES)}"
            )


def _leaf_callback(
    reader: _TensorReader,
    names: list[tuple[str, bool]],
    stacked: bool,
    dtype: np.dtype,
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    def read_one(name: str, transposed: bool, index: tuple[slice, ...]) -> np.ndarray:
        hf_index = tuple(reversed(index)) if transposed else index
        x = reader.read(name, hf_index)
        return np.ascontiguousarray(x.T if transposed else x, dtype=dtype)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index)
        if not stacked:
            return read_one(*names[0], index)
        layers = range(len(names))[index[0]]
        return np.stack([read_one(*names[i], index[1:]) for i in layers])

    return callback


def load_pretrained(
    directory: str | os.PathLike[str],
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = True,
    shardings: Any = None,
    **runtime: Any,
) -> tuple[LlamaConfig, Params]:
    """Loads a Hugging Face Llama/Mistral/Qwen2 checkpoint directory into our params tree.

    Only safetensors weights are read (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``); PyTorch pickles are refused.

    Args:
        directory: the checkpoint directory (config.json + safetensors).
        dtype: compute dtype of the returned config; None means ``param_dtype``.
        param_dtype: dtype the parameters are cast to.
        scan_layers: stack the layers on a leading axis (``nn.scan`` layout).
        shardings: optional pytree of :class:`jax.sharding.Sharding` with the structure of the
            params (or one Sharding for all leaves). Each array is assembled directly on its
            sharding from the slices each device needs; without it, every array goes to the
            default device.
        **runtime: other runtime fields of :class:`LlamaConfig` (``remat``, ``attention_impl``).

    Returns:
        ``(config, params)``.

    Raises:
        ValueError: unsupported model type, pickle-only directory, missing or unexpected
            tensors, shape mismatches, or shardings that do not match the params.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cfg = LlamaConfig.tiny()
        >>> save_pretrained(tmp.name, init_params(cfg, jax.random.key(0)), cfg)
        >>> cfg2, params = load_pretrained(tmp.name, scan_layers=False)
        >>> params["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"].shape
        (32, 16)
        >>> tmp.cleanup()
    """
    path = Path(directory)
    hf_config = load_config(path)
    param_dtype = jnp.dtype(param_dtype)
    config = LlamaConfig.from_hf(
        hf_config,
        dtype=param_dtype if dtype is None else dtype,
        param_dtype=param_dtype,
        scan_layers=scan_layers,
        **runtime,
    )
    abstract = _abstract_params(config)
    specs = _leaf_specs(abstract, scanned=scan_layers)
    abstract_leaves = {
        _path_keys(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    expected: dict[str, tuple[int, ...]] = {}
    for keys, names in specs.items():
        shape = abstract_leaves[keys].shape
        if scan_layers and keys[:2] == ("model", "layers"):
            shape = shape[1:]
        for name, transposed in names:
            expected[name] = tuple(reversed(shape)) if transposed else tuple(shape)

    treedef = jax.tree.structure(abstract)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        sharding_leaves = [device] * treedef.num_leaves
    elif isinstance(shardings, jax.sharding.Sharding):
        sharding_leaves = [shardings] * treedef.num_leaves
    else:
        sharding_leaves, sharding_def = jax.tree.flatten(shardings)
        if sharding_def != treedef:
            raise ValueError(
                "load_pretrained: shardings do not match the params structure: "
                f"got {sharding_def}, expected {treedef}"
            )
        for keys, s in zip(abstract_leaves, sharding_leaves):
            if not isinstance(s, jax.sharding.Sharding):
                raise ValueError(
                    f"load_pretrained: shardings at {'/'.join(keys)!r} is {s!r}, "
                    "not a jax.sharding.Sharding"
                )

    with contextlib.ExitStack() as stack:
        reader = _TensorReader(path, stack)
        _check_names(reader, expected, config, path)
        arrays = []
        for (keys, leaf), sharding in zip(abstract_leaves.items(), sharding_leaves):
            stacked = scan_layers and keys[:2] == ("model", "layers")
            callback = _leaf_callback(reader, specs[keys], stacked, param_dtype)
            arrays.append(jax.make_array_from_callback(leaf.shape, sharding, callback))
    return config, jax.tree.unflatten(treedef, arrays)


# --------------------------------------------------------------------------------------------
# Saving


def _parse_size(size: int | str) -> int:
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size!r} must be positive")
        return int(size)
    if not isinstance(size, str):
        raise ValueError(f"max_shard_size={size!r} must be an int or a string such as '2GB'")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size such as '2GB' or '500MiB'")
    unit = m.group(2).upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    value = int(float(m.group(1)) * powers[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


def _find_lora_leaves(params: Any) -> list[str]:
    found = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = _path_keys(path)
        if any(k.startswith("lora_") for k in keys):
            found.append("/".join(keys))
    return found


def _resolve_config(config: Any, scanned: bool) -> tuple[LlamaConfig, Any]:
    """(our config with the tree's layout, the transformers config to write)."""
    if isinstance(config, LlamaConfig):
        return config.replace(scan_layers=scanned), config.to_hf()
    if hasattr(config, "to_json_string") and hasattr(config, "model_type"):
        ours = LlamaConfig.from_hf(config, scan_layers=scanned)
        hf = copy.deepcopy(config)
        if not getattr(hf, "architectures", None):
            name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[ours.model_type]
            hf.architectures = [f"{name}ForCausalLM"]
        return ours, hf
    raise ValueError(
        f"save_pretrained: config must be a rslora_jax LlamaConfig or a transformers config, "
        f"got {type(config).__name__}"
    )


def _target(real_dir: Path, name: str, who: str = "save_pretrained") -> Path:
    """`real_dir / name`, refused if it is a symlink or not a regular file (`who` names the caller)."""
    target = real_dir / name
    if target.is_symlink() or (target.exists() and target.resolve().parent != real_dir):
        raise ValueError(
            f"{who}: {str(target)!r} is a symbolic link (to "
            f"{str(target.resolve())!r}); refusing to write through it"
        )
    if target.exists() and not target.is_file():
        raise ValueError(f"{who}: {str(target)!r} exists and is not a regular file")
    return target


def _write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes one safetensors file (PyTorch-style metadata)."""
    from safetensors.numpy import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())  # save_file recreates the file with mode 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _temp_file(real_dir: Path, name: str) -> Iterator[str]:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=real_dir)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> the usual permissions of a new file
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_pretrained(
    directory: str | os.PathLike[str],
    params: Params,
    config: Any,
    *,
    max_shard_size: int | str = "2GB",
    dtype: Any = None,
) -> None:
    """Writes plain (merged) params as a Hugging Face checkpoint directory.

    The result (config.json, ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, PyTorch names and ``(out, in)`` layout) loads with
    ``transformers.AutoModelForCausalLM.from_pretrained(directory)``. Every file is first written
    to a temporary name in ``directory`` and moved into place with ``os.replace`` once all of
    them are complete, so a failed save leaves the files that were there intact. Files of an
    earlier save that the new one does not use (old shards, index) are removed afterwards.

    Args:
        directory: target directory (created if missing). Nothing is written outside it:
            existing symbolic links at the target names are refused.
        params: plain params, scanned or not (the layout is detected). Adapter leaves
            (``lora_*``) are refused: merge them first. Arrays must be fully addressable
            from this process (in multi-host runs, gather them and save from one process).
        config: our :class:`LlamaConfig`, or a transformers config (e.g. from
            :func:`load_config`, which keeps token ids and other fields).
        max_shard_size: largest shard in bytes, or a string like ``"2GB"`` (10^9) or
            ``"500MiB"`` (2^20). A tensor larger than this gets a shard of its own.
        dtype: dtype to store; None keeps each array's dtype.

    Raises:
        ValueError: adapter leaves, params that do not match the config, a bad shard size,
            or a target path that is a symbolic link.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cfg = LlamaConfig.tiny()
        >>> save_pretrained(tmp.name, init_params(cfg, jax.random.key(0)), cfg, dtype="bfloat16")
        >>> sorted(os.listdir(tmp.name))
        ['config.json', 'model.safetensors']
        >>> tmp.cleanup()
    """
    lora = _find_lora_leaves(params)
    if lora:
        raise ValueError(
            f"save_pretrained: params hold adapter leaves ({lora[:3]}...): call rslora_jax.merge "
            "first to fold the adapters into the base weights"
        )
    limit = _parse_size(max_shard_size)
    out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    if out_dtype is not None and out_dtype not in _NP_TO_ST:
        raise ValueError(f"save_pretrained: dtype={dtype!r} must be float32/float16/bfloat16")
    try:
        layers = params["model"]["layers"]
    except (KeyError, TypeError) as e:
        raise ValueError("save_pretrained: params have no 'model/layers' entry") from e
    scanned = not (layers and all(str(k).isdigit() for k in layers))
    ours, hf_config = _resolve_config(config, scanned)

    # Validate the tree against the config: structure and every shape.
    abstract = _abstract_params(ours)
    expected = {
        _path_keys(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    given = {_path_keys(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted("/".join(k) for k in set(expected) - set(given))
    unexpected = sorted("/".join(k) for k in set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"save_pretrained: params do not match the {ours.model_type} config: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    for keys, leaf in given.items():
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        if shape != expected[keys].shape:
            raise ValueError(
                f"save_pretrained: {'/'.join(keys)!r} has shape {shape}, expected "
                f"{expected[keys].shape} from the config"
            )
        leaf_dtype = np.dtype(getattr(leaf, "dtype", np.float32))
        if out_dtype is None and leaf_dtype not in _NP_TO_ST:
            raise ValueError(
                f"save_pretrained: {'/'.join(keys)!r} has dtype {leaf_dtype}; pass dtype="
            )

    # One entry per HF tensor: name -> (getter, nbytes).
    specs = _leaf_specs(abstract, scanned)
    tensors: dict[str, tuple[Callable[[], np.ndarray], int]] = {}
    for keys, names in specs.items():
        leaf = given[keys]
        leaf_dtype = np.dtype(leaf.dtype) if out_dtype is None else out_dtype
        stacked = scanned and keys[:2] == ("model", "layers")
        for i, (name, transposed) in enumerate(names):
            shape = expected[keys].shape[1:] if stacked else expected[keys].shape

            def get(
                leaf: Any = leaf,
                i: int = i,
                stacked: bool = stacked,
                t: bool = transposed,
                dt: np.dtype = leaf_dtype,
            ) -> np.ndarray:
                x = np.asarray(leaf[i] if stacked else leaf)
                if t:
                    x = x.T
                return np.ascontiguousarray(x, dtype=dt)

            tensors[name] = (get, int(np.prod(shape)) * leaf_dtype.itemsize)
    order = sorted(tensors, key=_natural_key)
    shards: list[list[str]] = []
    size = 0
    for name in order:
        nbytes = tensors[name][1]
        if not shards or (size + nbytes > limit and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = sum(n for _, n in tensors.values())
    n = len(shards)
    shard_names = (
        [SAFE_WEIGHTS_NAME]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )

    # The config to write: record the stored dtype.
    first = given[("model", "embed_tokens", "embedding")]
    stored = np.dtype(first.dtype) if out_dtype is None else out_dtype
    hf_config.dtype = _HF_DTYPE_NAMES.get(stored, "float32")
    config_json = hf_config.to_json_string(use_diff=True)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    real_dir = directory.resolve()
    if not real_dir.is_dir():
        raise ValueError(f"save_pretrained: {str(directory)!r} is not a directory")
    names = [*shard_names, CONFIG_NAME] + ([SAFE_WEIGHTS_INDEX_NAME] if n > 1 else [])
    targets = {name: _target(real_dir, name) for name in names}

    with contextlib.ExitStack() as stack:
        written: dict[str, str] = {}
        for fname, members in zip(shard_names, shards):
            tmp = stack.enter_context(_temp_file(real_dir, fname))
            _write_safetensors(tmp, {name: tensors[name][0]() for name in members})
            _fsync(tmp)
            written[fname] = tmp
        if n > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {
                    name: fname for fname, members in zip(shard_names, shards) for name in members
                },
            }
            tmp = stack.enter_context(_temp_file(real_dir, SAFE_WEIGHTS_INDEX_NAME))
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
            written[SAFE_WEIGHTS_INDEX_NAME] = tmp
        tmp = stack.enter_context(_temp_file(real_dir, CONFIG_NAME))
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_json)
        written[CONFIG_NAME] = tmp
        # Every file is complete: move them into place (weights, then index, then config).
        for fname in names:
            os.replace(written[fname], targets[fname])

    # Remove weight files of an earlier save that this one does not use.
    keep = set(names)
    for entry in real_dir.iterdir():
        stale = entry.name not in keep and (
            _SHARD_RE.match(entry.name)
            or entry.name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
        )
        if stale and (entry.is_file() or entry.is_symlink()):
            entry.unlink()


__all__ = [
    "flax_module_path",
    "hf_module_name",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
