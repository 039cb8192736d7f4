"""Hugging Face checkpoint directories in and out: config.json + safetensors weights.

Reading streams tensor by tensor (or slice by slice, when a sharding is given) through
:class:`~rslora_jax.hf.io.TensorReader`, so host memory stays about one tensor (one stacked leaf
for scanned layers); PyTorch ``(out, in)`` Linear weights become Flax ``(in, out)`` kernels.
Writing produces what ``transformers.AutoModelForCausalLM.from_pretrained`` loads: config.json,
``model.safetensors`` or shards plus ``model.safetensors.index.json``. The files are written
into a new directory next to the target, which then replaces the target in one step
(:func:`rslora_jax._files.staged_directory`): a reader sees the old save or the new one, never
a mix.

Which model a directory holds is read off ``config.json``'s ``model_type``; the
:mod:`rslora_jax.models.families` registry gives the model's config class, its parameters and
its module names (e.g. ``model/layers/self_attn/q_proj/kernel[i]`` <->
``model.layers.{i}.self_attn.q_proj.weight``, transposed). Parameter leaves map to tensor
suffixes as flax and PyTorch name them::

    .../kernel     <-> ...weight (transposed)        .../scale  <-> ...weight
    .../embedding  <-> ...weight                     .../bias   <-> ...bias

transformers and torch are imported lazily: importing this module imports neither.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rslora_jax import _files
from rslora_jax._types import Params
from rslora_jax.hf import io as hf_io
from rslora_jax.hf.io import load_tokenizer
from rslora_jax.models.families import (
    FAMILIES,
    ModelFamily,
    family,
    family_of,
    flax_module_path,
    hf_module_name,
)
from rslora_jax.ops.finite import NonFiniteError, nonfinite_paths
from rslora_jax.ops.quantize import check_plain

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "pytorch_model.bin.index.json")
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


# --------------------------------------------------------------------------------------------
# Name mapping


class _Slot(NamedTuple):
    """Where one of our arrays (one layer of a stacked leaf) lives in the checkpoint.

    ``offset``/``size``: the rows (HF's output axis 0) of a fused tensor that hold it (Phi-3's
    ``qkv_proj``: q, k, v), or None for a whole tensor; ``total``: the fused tensor's rows.
    """

    name: str
    transposed: bool
    offset: int | None = None
    size: int | None = None
    total: int | None = None


def _hf_tensor_name(
    fam: ModelFamily, leaf_path: tuple[str, ...], layer: int | None
) -> tuple[str, bool]:
    """(HF tensor name, whether the array is transposed) for a leaf of our tree."""
    *module, leaf = leaf_path
    if leaf not in _LEAF_TO_HF:
        raise ValueError(
            f"parameter {'/'.join(leaf_path)!r} has no Hugging Face counterpart "
            f"(leaf {leaf!r}; expected one of {sorted(_LEAF_TO_HF)})"
        )
    path = "/".join(module)
    fused = fam.fused_path(path)
    if fused is not None:
        path = fused[1]
    name = fam.hf_module_name(path, layer)
    return f"{name}.{_LEAF_TO_HF[leaf]}", leaf == "kernel"


def _path_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _leaf_specs(
    fam: ModelFamily, abstract: Params, scanned: bool
) -> dict[tuple[str, ...], list[_Slot]]:
    """For each leaf of an (abstract) tree: its HF tensors (one per stacked layer)."""
    leaves = {_path_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    specs: dict[tuple[str, ...], list[_Slot]] = {}
    for keys, leaf in leaves.items():
        stacked = fam.is_stacked(keys, scanned)
        layers: list[int | None] = list(range(leaf.shape[0])) if stacked else [None]
        fused = fam.fused_path("/".join(keys[:-1]))
        rows: tuple[int | None, int | None, int | None] = (None, None, None)
        if fused is not None:  # rows of the fused tensor: members' outputs, in order
            group, fused_path, index = fused
            sizes = [
                int(leaves[(*m.split("/"), keys[-1])].shape[-1])
                for m in group.member_paths(fused_path)
            ]
            rows = (sum(sizes[:index]), sizes[index], sum(sizes))
        specs[keys] = [_Slot(*_hf_tensor_name(fam, keys, i), *rows) for i in layers]
    return specs


def _hf_shape(slot: _Slot, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape, from our per-layer array shape."""
    hf = tuple(reversed(shape)) if slot.transposed else tuple(shape)
    if slot.total is not None:
        hf = (slot.total, *hf[1:])
    return hf


def _natural_key(name: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


# --------------------------------------------------------------------------------------------
# Config and tokenizer


def load_config(directory: str | os.PathLike[str]) -> Any:
    """Reads ``config.json`` with transformers' AutoConfig, offline and without remote code.

    A directory that a crash left half swapped (see :mod:`rslora_jax._files`) is restored first.

    Args:
        directory: a checkpoint directory.

    Returns:
        The transformers config object.

    Raises:
        ValueError: naming the file: there is no config.json, it is not a JSON object, no
            model family (:data:`rslora_jax.models.families.FAMILIES`) serves its
            ``model_type``, a size field (``hidden_size``, ``num_attention_heads``, ...) is not a
            positive integer, or transformers cannot read it.

    Example:
        >>> import tempfile
        >>> from rslora_jax.models import LlamaConfig
        >>> tmp = tempfile.TemporaryDirectory()
        >>> LlamaConfig.tiny().to_hf().save_pretrained(tmp.name)
        >>> load_config(tmp.name).model_type
        'llama'
        >>> tmp.cleanup()
    """
    path = Path(directory)
    _files.recover_directory(path)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"load_config: {str(path)!r} has no {CONFIG_NAME}")
    raw = hf_io.read_json(path / CONFIG_NAME, "load_config")
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"load_config: {str(path / CONFIG_NAME)!r} has model_type={model_type!r}; "
            f"supported: {tuple(FAMILIES)}"
        )
    _check_sizes(raw, path / CONFIG_NAME)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # transformers' errors vary (ValueError, TypeError, ...)
        raise ValueError(
            f"load_config: transformers cannot read {str(path / CONFIG_NAME)!r}: "
            f"{type(err).__name__}: {err}"
        ) from None


#: config.json fields that must be positive integers where present (a zero one divides by zero
#: inside transformers or gives empty tensors).
_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def _check_sizes(raw: dict[str, Any], file: Path) -> None:
    """The size fields of a raw config.json: positive integers, heads a multiple of kv heads."""
    for field in _SIZE_FIELDS:
        value = raw.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"load_config: {str(file)!r} has {field}={value!r}; expected a positive integer"
            )
    heads, kv = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if heads is not None and kv is not None and heads % kv:
        raise ValueError(
            f"load_config: {str(file)!r} has num_attention_heads={heads}, which is not a "
            f"multiple of num_key_value_heads={kv}"
        )
    if heads is not None and raw.get("head_dim") is None and raw.get("hidden_size") is not None:
        if raw["hidden_size"] % heads:
            raise ValueError(
                f"load_config: {str(file)!r} has hidden_size={raw['hidden_size']}, which is not "
                f"a multiple of num_attention_heads={heads} (and no head_dim)"
            )


# --------------------------------------------------------------------------------------------
# Loading


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files to read (``model.safetensors`` first, as transformers does)."""
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = hf_io.read_json(index, "load_pretrained").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{str(index)!r} has no 'weight_map'")
        for fname in set(weight_map.values()):
            if not isinstance(fname, str) or Path(fname).name != fname or fname in (".", ".."):
                raise ValueError(
                    f"{str(index)!r} names the file {fname!r}, which is not a plain file name "
                    "inside the checkpoint directory"
                )
        files = [directory / fname for fname in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise ValueError(f"weight file {str(path)!r} named by the index does not exist")
        return files
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


def _check_names(
    reader: hf_io.TensorReader,
    expected: dict[str, tuple[int, ...]],
    fam: ModelFamily,
    config: Any,
    directory: Path,
) -> None:
    present = set(reader.shape)
    ignored = {n for n in present if n.endswith(fam.ignored_tensor_suffixes)}
    if config.tie_word_embeddings:
        ignored.add(f"{fam.output_name}.weight")  # a tied head some checkpoints store anyway
    missing = sorted(set(expected) - present, key=_natural_key)
    unexpected = sorted(present - set(expected) - ignored, key=_natural_key)
    if missing or unexpected:
        msg = [
            f"the weights in {str(directory)!r} do not match its {CONFIG_NAME} "
            f"({config.model_type}, num_hidden_layers={getattr(config, 'num_hidden_layers', None)}):"
        ]
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {missing[:10]}")
        if unexpected:
            msg.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:10]}")
        raise ValueError(" ".join(msg))
    for name, shape in expected.items():
        if reader.shape[name] != shape:
            raise ValueError(
                f"tensor {name!r} in {str(reader.files[name])!r} has shape "
                f"{reader.shape[name]}, expected {shape} from "
                f"{str(directory / CONFIG_NAME)!r}"
            )
        if reader.dtype[name] not in hf_io.ST_DTYPES:
            raise ValueError(
                f"tensor {name!r} has dtype {reader.dtype[name]}; expected one of "
                f"{sorted(hf_io.ST_DTYPES)}"
            )


def _our_config(fam: ModelFamily, hf_config: Any, path: Path, **kwargs: Any) -> Any:
    """The family's config from a transformers config; errors name the config file."""
    try:
        return fam.from_hf(hf_config, **kwargs)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as err:
        raise ValueError(f"{str(path / CONFIG_NAME)!r}: {err}") from None


def _expected(
    fam: ModelFamily, config: Any, scan_layers: bool
) -> tuple[Params, dict[tuple[str, ...], list[_Slot]], dict[str, tuple[int, ...]]]:
    """(abstract params, HF names per leaf, HF tensor name -> shape) that `config` calls for."""
    abstract = fam.abstract_params(config)
    specs = _leaf_specs(fam, abstract, scanned=scan_layers)
    expected: dict[str, tuple[int, ...]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = _path_keys(path)
        shape = leaf.shape[1:] if fam.is_stacked(keys, scan_layers) else leaf.shape
        for slot in specs[keys]:
            expected[slot.name] = _hf_shape(slot, shape)
    return abstract, specs, expected


def check_pretrained(directory: str | os.PathLike[str]) -> Any:
    """Checks a Hugging Face checkpoint directory without reading any tensor.

    Everything `load_pretrained` refuses that the files' metadata show: config.json (readable,
    a supported ``model_type``, positive sizes, a model the family can build), the shard index
    (file names inside the directory, the files present), every weight file's header against
    its size (empty, truncated, damaged), and every tensor's name, shape and dtype against the
    config. A command calls it before it creates anything.

    Args:
        directory: the checkpoint directory.

    Returns:
        The transformers config (as `load_config` returns it).

    Raises:
        ValueError: naming the file (and the tensor) at fault.

    Example:
        >>> import tempfile
        >>> from rslora_jax.models import LlamaConfig, init_params
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cfg = LlamaConfig.tiny()
        >>> save_pretrained(tmp.name, init_params(cfg, jax.random.key(0)), cfg)
        >>> check_pretrained(tmp.name).model_type
        'llama'
        >>> file = Path(tmp.name) / CONFIG_NAME
        >>> _ = file.write_text(file.read_text().replace('"intermediate_size": 48', '"intermediate_size": 40'))
        >>> check_pretrained(tmp.name)
        Traceback (most recent call last):
        ...
        ValueError: tensor 'model.layers.0.mlp.down_proj.weight' in '.../model.safetensors' has shape (32, 48), expected (32, 40) from '.../config.json'
        >>> tmp.cleanup()
    """
    path = Path(directory)
    hf_config = load_config(path)
    fam = family(hf_config.model_type, "check_pretrained")
    config = _our_config(fam, hf_config, path, scan_layers=True)
    _, _, expected = _expected(fam, config, scan_layers=True)
    with contextlib.ExitStack() as stack:
        reader = hf_io.TensorReader(_weight_files(path), stack)
        _check_names(reader, expected, fam, config, path)
    return hf_config


def _leaf_callback(
    reader: hf_io.TensorReader,
    slots: list[_Slot],
    stacked: bool,
    dtype: np.dtype,
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    def read_one(slot: _Slot, index: tuple[slice, ...]) -> np.ndarray:
        hf_index = tuple(reversed(index)) if slot.transposed else index
        if slot.offset is not None:  # a member of a fused tensor: shift its rows
            start, stop, step = hf_index[0].indices(slot.size)  # type: ignore[arg-type]
            rows = slice(slot.offset + start, slot.offset + stop, step)
            hf_index = (rows, *hf_index[1:])
        raw = reader.read(slot.name, hf_index)
        x = np.ascontiguousarray(raw.T if slot.transposed else raw, dtype=dtype)
        if not np.isfinite(x).all():
            raise ValueError(
                f"tensor {slot.name!r} in {str(reader.files[slot.name])!r} holds NaN or Inf "
                "values"
                + (f" once cast to {dtype}" if np.isfinite(raw).all() else "")
                + ": the weights are damaged (or overflow the param_dtype)"
            )
        return x

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index)
        if not stacked:
            return read_one(slots[0], index)
        layers = range(len(slots))[index[0]]
        return np.stack([read_one(slots[i], index[1:]) for i in layers])

    return callback


def load_pretrained(
    directory: str | os.PathLike[str],
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = True,
    shardings: Any = None,
    transform: Callable[[str, jax.Array], Any] | None = None,
    **runtime: Any,
) -> tuple[Any, Params]:
    """Loads a Hugging Face checkpoint directory (any registered family) into our params tree.

    The model family is chosen by the config's ``model_type``
    (:data:`rslora_jax.models.families.FAMILIES`: Llama, Mistral, Qwen2, Qwen3, Gemma 2,
    Gemma 3 text, Phi-3); tensors the checkpoint stores fused (Phi-3's ``qkv_proj``,
    ``gate_up_proj``) are split into our modules, each device reading only its rows when
    sharded. Only safetensors weights are read
    (``model.safetensors`` or a sharded ``model.safetensors.index.json``); PyTorch pickles are
    refused.

    Args:
        directory: the checkpoint directory (config.json + safetensors).
        dtype: compute dtype of the returned config; None means ``param_dtype``.
        param_dtype: dtype the parameters are cast to.
        scan_layers: stack the layers on a leading axis (``nn.scan`` layout).
        shardings: optional pytree of :class:`jax.sharding.Sharding` with the structure of the
            params (or one Sharding for all leaves). Each array is assembled directly on its
            sharding from the slices each device needs; without it, every array goes to the
            default device.
        transform: called on each leaf once it is on its devices, with its '/'-joined path
            (``model/layers/self_attn/q_proj/kernel``); its result is stored instead, before
            the next leaf is read (e.g. `rslora_jax.ops.quantize.loader_transform`, which
            quantizes the kernels while the checkpoint streams, so at most one leaf is held in
            full precision).
        **runtime: other runtime fields of the family's config (for
            :class:`~rslora_jax.models.LlamaConfig`: ``remat``, ``attention_impl``).

    Returns:
        ``(config, params)``: our config (the family's, e.g. a
        :class:`~rslora_jax.models.GemmaConfig` for Gemma) and the params.

    Raises:
        ValueError: unsupported model type, pickle-only directory, damaged weight files,
            missing or unexpected tensors, shape mismatches (all found before any tensor is
            read, see `check_pretrained`), a tensor holding NaN or Inf values, or shardings
            that do not match the params.

    Example:
        >>> import tempfile
        >>> from rslora_jax.models import LlamaConfig, init_params
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
    fam = family(hf_config.model_type, "load_pretrained")
    param_dtype = jnp.dtype(param_dtype)
    config = _our_config(
        fam,
        hf_config,
        path,
        dtype=param_dtype if dtype is None else dtype,
        param_dtype=param_dtype,
        scan_layers=scan_layers,
        **runtime,
    )
    abstract, specs, expected = _expected(fam, config, scan_layers)
    abstract_leaves = {
        _path_keys(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }

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
        reader = hf_io.TensorReader(_weight_files(path), stack)
        _check_names(reader, expected, fam, config, path)
        arrays = []
        for (keys, leaf), sharding in zip(abstract_leaves.items(), sharding_leaves):
            stacked = fam.is_stacked(keys, scan_layers)
            callback = _leaf_callback(reader, specs[keys], stacked, param_dtype)
            array = jax.make_array_from_callback(leaf.shape, sharding, callback)
            if transform is not None:
                array = transform("/".join(keys), array)
            arrays.append(array)
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


def _resolve_config(fam: ModelFamily, config: Any, scanned: bool) -> tuple[Any, Any]:
    """(our config with the tree's layout, the transformers config to write)."""
    ours = fam.config(config, scan_layers=scanned, where="save_pretrained")
    if isinstance(config, fam.config_class):
        return ours, config.to_hf()
    hf = copy.deepcopy(config)
    if not getattr(hf, "architectures", None):
        hf.architectures = [fam.architecture(ours.model_type)]
    return ours, hf


def _is_weight_file(name: str) -> bool:
    """Files a save owns: an earlier save's weights that this one does not write are dropped."""
    return bool(_SHARD_RE.match(name)) or name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)


def save_pretrained(
    directory: str | os.PathLike[str],
    params: Params,
    config: Any,
    *,
    max_shard_size: int | str = "2GB",
    dtype: Any = None,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Writes plain (merged) params as a Hugging Face checkpoint directory.

    The result (config.json, ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, PyTorch names and ``(out, in)`` layout) loads with
    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` as the family's class
    (modules the checkpoint format fuses, Phi-3's ``qkv_proj``, are joined). The files are
    written into a new directory next to ``directory``, which then replaces it in one step
    (:func:`rslora_jax._files.staged_directory`): a reader, or a crash, sees either the old
    save or the new one complete, and a failed save leaves the old directory intact. Other
    files already in ``directory`` (a tokenizer, a README) are kept; weight files of an earlier
    save that this one does not write (old shards, index) are not.

    Args:
        directory: target directory (created if missing; its parent must be writable).
            Symbolic links at the target file names are refused.
        params: plain params, scanned or not (the layout is detected). Adapter leaves
            (``lora_*``) are refused: merge them first. Arrays must be fully addressable
            from this process (in multi-host runs, gather them and save from one process).
        config: our model config (e.g. :class:`~rslora_jax.models.LlamaConfig`), or a
            transformers config (e.g. from :func:`load_config`, which keeps token ids and other
            fields).
        max_shard_size: largest shard in bytes, or a string like ``"2GB"`` (10^9) or
            ``"500MiB"`` (2^20). A tensor larger than this gets a shard of its own.
        dtype: dtype to store; None keeps each array's dtype.
        extra: called with the staging directory to write more files (a tokenizer) that
            appear together with the weights, in the same swap.

    Raises:
        ValueError: adapter leaves, params that do not match the config, values that are NaN
            or Inf (or overflow `dtype`), a bad shard size, a target file name that is a
            symbolic link, or a ``directory`` that is a file or the current working directory.

    Example:
        >>> import tempfile
        >>> from rslora_jax.models import LlamaConfig, init_params
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cfg = LlamaConfig.tiny()
        >>> save_pretrained(tmp.name, init_params(cfg, jax.random.key(0)), cfg, dtype="bfloat16")
        >>> sorted(os.listdir(tmp.name))
        ['config.json', 'model.safetensors']
        >>> tmp.cleanup()
    """
    check_plain(params, "save_pretrained")
    lora = _find_lora_leaves(params)
    if lora:
        raise ValueError(
            f"save_pretrained: params hold adapter leaves ({lora[:3]}...): call rslora_jax.merge "
            "first to fold the adapters into the base weights"
        )
    limit = _parse_size(max_shard_size)
    out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    if out_dtype is not None and out_dtype not in hf_io.NP_TO_ST:
        raise ValueError(f"save_pretrained: dtype={dtype!r} must be float32/float16/bfloat16")
    fam = family_of(config, "save_pretrained")
    scanned = fam.is_scanned(params, "save_pretrained")
    ours, hf_config = _resolve_config(fam, config, scanned)

    # Validate the tree against the config: structure and every shape.
    abstract = fam.abstract_params(ours)
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
        if out_dtype is None and leaf_dtype not in hf_io.NP_TO_ST:
            raise ValueError(
                f"save_pretrained: {'/'.join(keys)!r} has dtype {leaf_dtype}; pass dtype="
            )

    bad, after = nonfinite_paths(params), ""
    if not bad and out_dtype is not None:
        bad, after = nonfinite_paths(params, out_dtype), f" once cast to {out_dtype}"
    if bad:
        raise NonFiniteError(
            f"save_pretrained: the params hold NaN or Inf values{after} at {len(bad)} "
            f"leaf(s): {bad[:10]}; refusing to write {str(directory)!r}"
        )

    # One entry per HF tensor: name -> (getter, nbytes); fused tensors join their members.
    specs = _leaf_specs(fam, abstract, scanned)
    parts: dict[str, list[tuple[int, Callable[[], np.ndarray]]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype] = {}
    for keys, slots in specs.items():
        leaf = given[keys]
        leaf_dtype = np.dtype(leaf.dtype) if out_dtype is None else out_dtype
        stacked = fam.is_stacked(keys, scanned)
        for i, slot in enumerate(slots):
            shape = expected[keys].shape[1:] if stacked else expected[keys].shape

            def get(
                leaf: Any = leaf,
                i: int = i,
                stacked: bool = stacked,
                t: bool = slot.transposed,
                dt: np.dtype = leaf_dtype,
            ) -> np.ndarray:
                x = np.asarray(leaf[i] if stacked else leaf)
                if t:
                    x = x.T
                return np.ascontiguousarray(x, dtype=dt)

            parts.setdefault(slot.name, []).append((slot.offset or 0, get))
            shapes[slot.name] = _hf_shape(slot, tuple(shape))
            dtypes[slot.name] = leaf_dtype

    def joined(getters: list[tuple[int, Callable[[], np.ndarray]]]) -> Callable[[], np.ndarray]:
        if len(getters) == 1:
            return getters[0][1]
        ordered = [g for _, g in sorted(getters, key=lambda p: p[0])]
        return lambda: np.concatenate([g() for g in ordered], axis=0)

    tensors: dict[str, tuple[Callable[[], np.ndarray], int]] = {
        name: (joined(getters), int(np.prod(shapes[name])) * dtypes[name].itemsize)
        for name, getters in parts.items()
    }
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
    hf_config.dtype = hf_io.HF_DTYPE_NAMES.get(stored, "float32")
    config_json = hf_config.to_json_string(use_diff=True)

    real_dir = Path(directory).resolve()
    names = [*shard_names, CONFIG_NAME] + ([SAFE_WEIGHTS_INDEX_NAME] if n > 1 else [])
    if real_dir.is_dir():
        for name in names:
            _files.check_target(real_dir, name, "save_pretrained")

    with _files.staged_directory(
        directory, carry=lambda name: not _is_weight_file(name), who="save_pretrained"
    ) as staging:
        for fname, members in zip(shard_names, shards):
            hf_io.write_safetensors(staging / fname, {name: tensors[name][0]() for name in members})
        if n > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {
                    name: fname for fname, members in zip(shard_names, shards) for name in members
                },
            }
            with open(staging / SAFE_WEIGHTS_INDEX_NAME, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
        with open(staging / CONFIG_NAME, "w", encoding="utf-8") as f:
            f.write(config_json)
        if extra is not None:
            extra(staging)


__all__ = [
    "check_pretrained",
    "flax_module_path",
    "hf_module_name",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
