"""PEFT-format LoRA adapters in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

`export_peft` writes the adapters of a params tree so that Hugging Face PEFT
(``PeftModel.from_pretrained(transformers_model, directory)``) computes the same logits as our
forward pass; `import_peft` reads an adapter trained with PEFT on PyTorch into our tree.

On-disk format (PEFT's, adapter name stripped), for each adapted module, e.g.
``model.layers.0.self_attn.q_proj``::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight       (r, in)   = lora_a.T
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight       (out, r)  = lora_b.T
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  (out,) = lora_magnitude

(the last one with DoRA only). Scanned layers (a leading layer axis) are written one layer per
module name and stacked again on import.

Scale. PEFT computes ``lora_alpha / sqrt(r)`` if ``use_rslora`` else ``lora_alpha / r``, with
``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (the first key
that matches a '.'-bounded suffix of the module name, ``re.match(rf"(.*\\.)?({key})$", name)``).
The export always writes ``use_rslora`` and writes patterns computed from the per-module values
(not a textual translation of our regexes), so PEFT reproduces ``LoraConfig.scale_for`` for every
module; the import computes PEFT's per-module values and writes them back as patterns over our
'/' paths. An ``adapter_config.json`` without ``use_rslora`` was written by a PEFT version older
than rsLoRA, so it is read as PEFT reads it (``alpha / r``), with a `PeftFormatWarning`.

PEFT's own config rules (which modules a config selects, rank/alpha patterns, refused options)
are in :mod:`rslora_jax.hf._peft_rules`. The format is model-independent: the model side is the family's map between our module paths
and HF module names with the kernels' shapes (:meth:`ModelFamily.linear_modules
<rslora_jax.models.families.ModelFamily.linear_modules>`), looked up by the model config's
``model_type``.

What depends on the adapter method comes from the method protocol (`rslora_jax.core.protocol`):
each method declares its leaves' PEFT key suffixes and layouts (`Leaf.peft`, `Leaf.layout`) and
its adapter_config.json fields (``use_dora`` for DoRA; RaSA has no PEFT format and is refused),
the initialiser its ``init_lora_weights``. A new method with a PEFT format needs nothing here.

transformers, torch and peft are not imported: this module reads and writes JSON and safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rslora_jax import _files
from rslora_jax._types import Params
from rslora_jax.core import protocol
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.protocol import Method
from rslora_jax.core.tree import (
    KERNEL,
    adapted_holders,
    combine,
    global_entries,
    is_adapter_key,
    iter_holders,
    join_path,
)
from rslora_jax.hf import _peft_rules as rules
from rslora_jax.hf import io as hf_io
from rslora_jax.hf._peft_rules import PeftFormatWarning
from rslora_jax.models.families import LinearModule, ModelFamily, family_of

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Key prefix of a PeftModel's state dict (PeftModel.base_model is the LoraModel, whose .model is
# the transformers model).
PEFT_PREFIX = "base_model.model."
# The PEFT release whose format (field names, defaults, key names) this module writes and was
# tested against; written as ``peft_version``.
PEFT_FORMAT_VERSION = "0.21.2"
PEFT_TASK_TYPES = (None, "CAUSAL_LM")
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


# ============================================================================ adapter methods
# What depends on the adapter method comes from the method protocol: each method declares its
# leaves with their PEFT key suffixes (`rslora_jax.core.Leaf.peft`) and its extra
# adapter_config.json fields (`Method.peft_fields`, None: no PEFT format); the initialiser says
# its init_lora_weights value (`Initialiser.to_peft`).


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """How one of our adapter leaves is stored in a PEFT file (derived from its `Leaf`).

    Attributes:
      ours: the leaf name in the dict holding the kernel (e.g. ``lora_a``).
      peft: the PEFT key suffix after the module name (e.g. ``lora_A.weight``).
      layout: the leaf's layout (``"a"``: PEFT stores ``A.T`` (r, d_in); ``"b"``: ``B.T``
        (d_out, r); ``"out"``: as is, (d_out,)).
    """

    ours: str
    peft: str
    layout: str

    @property
    def transpose(self) -> bool:
        return self.layout in ("a", "b")

    def shape(self, r: int, d_in: int, d_out: int) -> tuple[int, ...]:
        """PEFT's shape for one module."""
        return {"a": (r, d_in), "b": (d_out, r), "out": (d_out,)}[self.layout]

    def ours_shape(self, r: int, d_in: int, d_out: int) -> tuple[int, ...]:
        """Our per-layer shape (PEFT's, reversed if transposed)."""
        shape = self.shape(r, d_in, d_out)
        return tuple(reversed(shape)) if self.transpose else shape

    def to_peft(self, x: np.ndarray) -> np.ndarray:
        return x.T if self.transpose else x

    def from_peft(self, x: np.ndarray) -> np.ndarray:
        return x.T if self.transpose else x


def _specs_of(method: Method) -> tuple[LeafSpec, ...]:
    return tuple(
        LeafSpec(name, leaf.peft, leaf.layout)
        for name, leaf in method.leaves.items()
        if leaf.peft is not None
    )


def _known_specs() -> dict[str, tuple[LeafSpec, type[Method]]]:
    """Every PEFT suffix a registered method declares -> (spec, method)."""
    out: dict[str, tuple[LeafSpec, type[Method]]] = {}
    for cls in protocol.methods().values():
        if cls.peft_fields is None:
            continue
        for spec in _specs_of(cls()):
            out.setdefault(spec.peft, (spec, cls))
    return out


def _known_leaf_names() -> set[str]:
    """Our names of every leaf a registered method with a PEFT format stores (two methods may
    store different leaves under one PEFT suffix: LoRA's ``lora_a`` and a frozen-A method's)."""
    return {
        spec.ours
        for cls in protocol.methods().values()
        if cls.peft_fields is not None
        for spec in _specs_of(cls())
    }


# PEFT suffixes we know but cannot represent (named in the error message).
_UNSUPPORTED_SUFFIXES = {
    "lora_embedding_A": "LoRA on an embedding",
    "lora_embedding_B": "LoRA on an embedding",
    "lora_B.bias": "lora_bias=True",
    "lora_E": "AdaLoRA",
}


def _leaves_for(config: LoraConfig) -> tuple[LeafSpec, ...]:
    return _specs_of(config.method)


# init_lora_weights values whose saved factors are plain LoRA factors on the unchanged base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# init_lora_weights values with which PEFT changes the base weights when it loads the adapter.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _method_fields() -> dict[str, Any]:
    """Every adapter_config.json field a registered method sets, with its 'off' value."""
    return {k: False for cls in protocol.methods().values() for k in (cls.peft_fields or {})}


def _refuse_without_peft_format(lora_config: LoraConfig, params: Any, where: str) -> None:
    """Methods that have no PEFT format (e.g. RaSA)."""
    method = lora_config.method
    shared = global_entries(params)
    if method.peft_fields is None or shared:
        title = method.title if method.peft_fields is None else f"top-level {sorted(shared)}"
        raise ValueError(
            f"{where}: {title} adapters have no PEFT format; merge them (rslora_jax.merge) and "
            "export the merged model with rslora_jax.hf.save_pretrained"
        )


def _method_to_peft(lora_config: LoraConfig) -> dict[str, Any]:
    """The adapter_config.json fields that record the method and its initialisation."""
    return {
        "init_lora_weights": lora_config.init.to_peft(),
        **_method_fields(),
        **dict(lora_config.method.peft_fields or {}),
    }


def _check_method_options(meta: Mapping[str, Any], where: str) -> None:
    """Refuses method fields of an adapter_config.json that import_peft cannot honour."""
    init = meta.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{where} has init_lora_weights={init!r}: PEFT recomputes a residual base from the base "
            "weights when it loads such an adapter, which import_peft does not do. Convert it to "
            "a plain LoRA adapter with PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and import that"
        )
    if init not in _PLAIN_INITS:
        raise ValueError(f"{where} has an unknown init_lora_weights={init!r}")
    for field in _method_fields():
        if not isinstance(meta.get(field, False), bool):
            raise ValueError(f"{where}: {field}={meta[field]!r} must be true or false")


def _method_from_peft(meta: Mapping[str, Any]) -> dict[str, Any]:
    """LoraConfig fields for the method and initialisation an adapter_config.json records: the
    registered method whose PEFT fields it sets (none set: the default method)."""
    init = meta.get("init_lora_weights", True)
    chosen = protocol.default_method()
    for cls in protocol.methods().values():
        fields = cls.peft_fields or {}
        if fields and all(meta.get(k, False) == v for k, v in fields.items()):
            chosen = cls()
    return {"init": "gaussian" if init == "gaussian" else "kaiming_uniform", "method": chosen}


# ============================================================================ end of methods


# ---------------------------------------------------------------------------- model side
def _base_modules(
    fam: ModelFamily, params: Params, config: Any, where: str
) -> dict[str, LinearModule]:
    """The model's Linear modules, checked against `config` (names, kernel shapes)."""
    modules = fam.linear_modules(config)
    given = {join_path(k): tuple(h[KERNEL].shape) for k, h in iter_holders(params)}
    missing = sorted(set(modules) - set(given))
    unexpected = sorted(set(given) - set(modules))
    if missing or unexpected:
        raise ValueError(
            f"{where}: the params' kernels do not match the {config.model_type} model config: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    for path, shape in given.items():
        m = modules[path]
        expected = ((len(m.names),) if m.stacked else ()) + (m.d_in, m.d_out)
        if shape != expected:
            raise ValueError(
                f"{where}: kernel at {path!r} has shape {shape}, expected {expected} from "
                "the model config"
            )
    return modules


# ---------------------------------------------------------------------------- export
def export_peft(
    directory: str | os.PathLike[str],
    params: Params,
    lora_config: LoraConfig,
    model_config: Any,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    dtype: Any = None,
) -> None:
    """Writes the adapters of `params` as a PEFT LoRA adapter directory.

    Writes ``adapter_config.json`` (``peft_type`` LORA, ``use_rslora`` always explicit, ``r``,
    ``lora_alpha``, ``rank_pattern`` / ``alpha_pattern`` as dotted HF module-name regexes that
    give every module the rank and alpha of `lora_config`, ``target_modules`` as HF module names
    (the set of last name components of the adapted modules, or a regex when those names would
    also select modules without an adapter), ...) and ``adapter_model.safetensors`` with PEFT's
    key names and (out, in) layouts. ``PeftModel.from_pretrained(model, directory)`` on the
    transformers model of the same base then computes the same logits as
    ``rslora_jax.lora(LlamaForCausalLM(config).apply, lora_config)``.

    ``init_lora_weights`` records `lora_config.init` in PEFT's terms (True for
    ``kaiming_uniform``). With PiSSA/OLoRA (``init="pissa"``/``"olora"``), PEFT recomputes the
    residual base from the base it is given when it loads the adapter: load it onto the original
    (pre-PiSSA) base model, not onto the residual. For ``"pissa_niter_<n>"``, PEFT's randomized
    SVD draws other numbers than ours, so that residual differs slightly.

    Both files are written into a new directory next to `directory`, which then replaces
    `directory` in one step (:func:`rslora_jax._files.staged_directory`): a reader sees the old
    adapter or the new one, never new factors with an old ``lora_alpha``. Other files already in
    `directory` are kept; symbolic links at the two target names are refused.

    Args:
      directory: target directory (created if missing; its parent must be writable).
      params: our params tree with adapters (``lora_a``/``lora_b``, and ``lora_magnitude`` with
        DoRA), layers scanned (stacked on a leading axis) or not (``model/layers/<i>``).
      lora_config: the adapters' config (ranks, alphas, scaling).
      model_config: our model config (e.g. `LlamaConfig`) or a transformers config of the base
        model; its ``model_type`` selects the model family (the module-name map). The layout
        (scanned or not) is read off `params`.
      base_model_name_or_path: recorded in the config (PEFT's field); default: the
        transformers config's ``name_or_path`` if there is one, else None.
      task_type: PEFT's ``task_type`` (``"CAUSAL_LM"`` or None).
      dtype: dtype of the stored tensors; None keeps the adapters' dtype.

    Raises:
      ValueError: RaSA adapters (not a PEFT format), adapter leaves without a PEFT counterpart,
        factors whose shapes or ranks do not fit their kernel and `lora_config`, params that do
        not match `model_config`, a bad `dtype` or `task_type`, or a symbolic link at a target.

    Example:
      >>> import tempfile, jax
      >>> from rslora_jax import LoraConfig, init
      >>> from rslora_jax.models import LlamaConfig, init_params
      >>> cfg = LlamaConfig.tiny(scan_layers=False)
      >>> lcfg = LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
      >>> params = init(init_params(cfg, jax.random.key(0)), lcfg, jax.random.key(1))
      >>> tmp = tempfile.TemporaryDirectory()
      >>> export_peft(tmp.name, params, lcfg, cfg)
      >>> sorted(os.listdir(tmp.name))
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> meta = json.load(open(os.path.join(tmp.name, "adapter_config.json")))
      >>> meta["use_rslora"], meta["r"], meta["target_modules"]
      (True, 4, ['q_proj', 'v_proj'])
      >>> tmp.cleanup()
    """
    where = "export_peft"
    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"{where}: lora_config must be a LoraConfig, got {type(lora_config)}")
    _refuse_without_peft_format(lora_config, params, where)
    if task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"{where}: task_type={task_type!r} must be one of {PEFT_TASK_TYPES}")
    out_dtype = None
    if dtype is not None:
        out_dtype = np.dtype(jnp.dtype(dtype))
        if out_dtype not in hf_io.NP_TO_ST:
            raise ValueError(f"{where}: dtype={dtype!r} must be float32, float16 or bfloat16")
    fam = family_of(model_config, where)
    scanned = fam.is_scanned(params, where)
    model_cfg = fam.config(model_config, scan_layers=scanned, where=where)
    modules = _base_modules(fam, params, model_cfg, where)
    holders = adapted_holders(params)
    if not holders:
        raise ValueError(f"{where}: params hold no adapters (no kernel with adapter leaves)")
    specs = _leaves_for(lora_config)

    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    adapted_paths: set[str] = set()
    for path, holder in holders:
        module = modules[path]
        adapted_paths.add(path)
        _check_export_axes(lora_config, path, holder[KERNEL], module)
        present = {k for k in holder if is_adapter_key(k)}
        known = _known_leaf_names()
        unknown = sorted(present - known)
        if unknown:
            raise ValueError(
                f"{where}: adapter leaves {unknown} at {path!r} have no PEFT counterpart "
                f"(known: {sorted(known)})"
            )
        wanted = {spec.ours for spec in specs}
        if present != wanted:
            raise ValueError(
                f"{where}: the adapter at {path!r} has leaves {sorted(present)}, but "
                f"the config's method {lora_config.method.title} calls for {sorted(wanted)}"
            )
        a_name = next(spec.ours for spec in specs if spec.layout == "a")
        r = int(holder[a_name].shape[-1])
        if r != lora_config.rank_for(path):
            raise ValueError(
                f"{where}: the adapter at {path!r} has rank {r} ({a_name} {tuple(holder[a_name].shape)}), "
                f"but lora_config gives rank {lora_config.rank_for(path)} there: the scale would be wrong"
            )
        stack = (len(module.names),) if module.stacked else ()
        arrays = {}
        for spec in specs:
            want = (*stack, *spec.ours_shape(r, module.d_in, module.d_out))
            got = tuple(holder[spec.ours].shape)
            if got != want:
                raise ValueError(
                    f"{where}: {path}/{spec.ours} has shape {got}, expected {want} for a kernel "
                    f"{(*stack, module.d_in, module.d_out)} at rank {r}"
                )
            arr = np.asarray(jax.device_get(holder[spec.ours]))
            if out_dtype is None and arr.dtype not in hf_io.NP_TO_ST:
                raise ValueError(
                    f"{where}: {path}/{spec.ours} has dtype {arr.dtype}; pass dtype=float32"
                )
            arrays[spec] = arr
        for i, name in enumerate(module.names):
            ranks[name] = r
            alphas[name] = lora_config.alpha_for(path)
            for spec, arr in arrays.items():
                x = spec.to_peft(arr[i] if module.stacked else arr)
                dt = arr.dtype if out_dtype is None else out_dtype
                tensors[f"{PEFT_PREFIX}{name}.{spec.peft}"] = np.ascontiguousarray(x, dtype=dt)

    adapted_names = [n for p in sorted(adapted_paths) for n in modules[p].names]
    if base_model_name_or_path is None and not isinstance(model_config, fam.config_class):
        base_model_name_or_path = getattr(model_config, "name_or_path", None) or None
    config_dict = {
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "peft_version": PEFT_FORMAT_VERSION,
        "inference_mode": True,
        "r": lora_config.rank,
        "lora_alpha": rules.number(lora_config.alpha),
        "use_rslora": lora_config.scaling == "rslora",
        "target_modules": rules.target_modules(modules, adapted_paths),
        "exclude_modules": None,
        "rank_pattern": rules.patterns(ranks, lora_config.rank, ".", adapted_names),
        "alpha_pattern": {
            k: rules.number(v)
            for k, v in rules.patterns(alphas, lora_config.alpha, ".", adapted_names).items()
        },
        "lora_dropout": lora_config.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        **_method_to_peft(lora_config),
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        "target_parameters": None,
        "trainable_token_indices": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
    }
    if task_type is None:  # what PEFT writes for AutoPeftModel without a task type
        config_dict["auto_mapping"] = {
            "base_model_class": fam.architecture(model_cfg.model_type),
            "parent_library": f"transformers.models.{model_cfg.model_type}.modeling_"
            f"{model_cfg.model_type}",
        }
    text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"

    real_dir = Path(directory).resolve()
    if real_dir.is_dir():
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            _files.check_target(real_dir, name, where)
    with _files.staged_directory(directory, who=where) as staging:
        hf_io.write_safetensors(staging / ADAPTER_WEIGHTS_NAME, tensors)
        (staging / ADAPTER_CONFIG_NAME).write_text(text, encoding="utf-8")


def _check_export_axes(config: LoraConfig, path: str, kernel: Any, module: LinearModule) -> None:
    """The config's axis roles for this kernel, if it states them, must be a Linear's ones."""
    try:
        axes = config.axes_for(path, kernel.shape)
    except ValueError:
        return  # a stacked kernel without kernel_axes: the model's layout is used
    expected = "lio" if module.stacked else "io"
    if axes != expected:
        raise ValueError(
            f"export_peft: LoraConfig gives kernel axes {axes!r} for {path!r} (kernel "
            f"{tuple(kernel.shape)}), but this Linear kernel is {expected!r}; PEFT's factors would "
            "be laid out wrongly"
        )


# ---------------------------------------------------------------------------- import
def import_peft(
    directory: str | os.PathLike[str],
    params: Params,
    model_config: Any,
    *,
    strict: bool = True,
    expected_base_model: str | None = None,
    dtype: Any = jnp.float32,
) -> tuple[Params, LoraConfig]:
    """Loads a PEFT LoRA/rsLoRA adapter (trained with PEFT on PyTorch) into our params tree.

    Applies PEFT's rules to the adapter's config: which modules are adapted
    (``target_modules``, ``exclude_modules``, ``layers_to_transform``), their rank and alpha
    (``rank_pattern``/``alpha_pattern``, first '.'-bounded suffix match), and the scale
    (``lora_alpha/sqrt(r)`` with ``use_rslora``, else ``lora_alpha/r``). The returned
    `LoraConfig` gives, through ``scale_for(path)``/``rank_for(path)``, the same per-module
    values with patterns over our '/' paths, so
    ``rslora_jax.lora(LlamaForCausalLM(config).apply, lora_config)`` computes PEFT's logits.

    A config without ``use_rslora`` is read as PEFT reads it (``alpha / r``: such files come from
    PEFT versions before rsLoRA), with a `PeftFormatWarning`.

    Checks (each a ValueError naming the key, shapes and what was expected): ``peft_type`` other
    than LORA; options we do not implement (``bias`` other than "none", ``lora_bias``,
    ``fan_in_fan_out``, layer replication, trainable tokens, aLoRA, ... and base-changing inits
    such as PiSSA/OLoRA, which PEFT recomputes on load); adapters on embeddings or on a tied
    ``lm_head``; modules or shapes that do not exist in `params` (a different base model);
    lora_A not (r, in_features) or lora_B not (out_features, r) with r from
    ``rank_pattern``/``r`` (a transposed factor has the right numbers in the wrong order; a
    square one is caught by its rank); missing or unexpected tensors (with ``strict``); a
    ``base_model_name_or_path`` other than `expected_base_model`. Only safetensors are read:
    a pickled ``adapter_model.bin`` is refused.

    Args:
      directory: the adapter directory (``adapter_config.json``,
        ``adapter_model.safetensors``).
      params: our base params tree (no adapters), scanned or not.
      model_config: our `LlamaConfig` or a transformers config of the base model.
      strict: if False, adapted modules without tensors get no adapter, and tensors we cannot
        use (unknown modules, embeddings, ``modules_to_save``) are ignored, with a
        `PeftFormatWarning` listing them. Shape and rank errors are never relaxed.
      expected_base_model: if given, must equal the adapter's ``base_model_name_or_path``.
      dtype: dtype of the adapter factors (and of the returned config).

    Returns:
      ``(params_with_adapters, lora_config)``. Scanned params get stacked adapters and a
      config with ``kernel_axes="lio"``.

    Raises:
      ValueError: see above; also per-layer ranks or alphas that differ within a scanned
        (stacked) module, or adapters on only some of its layers (load with
        ``scan_layers=False``).

    Example:
      >>> import tempfile, jax
      >>> from rslora_jax import LoraConfig, init
      >>> from rslora_jax.models import LlamaConfig, init_params
      >>> cfg = LlamaConfig.tiny(scan_layers=False)
      >>> base = init_params(cfg, jax.random.key(0))
      >>> lcfg = LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
      >>> tmp = tempfile.TemporaryDirectory()
      >>> export_peft(tmp.name, init(base, lcfg, jax.random.key(1)), lcfg, cfg)
      >>> params, got = import_peft(tmp.name, base, cfg)
      >>> got.scale_for("model/layers/0/self_attn/q_proj"), got.targets
      (4.0, ('q_proj', 'v_proj'))
      >>> params["model"]["layers"]["1"]["self_attn"]["v_proj"]["lora_b"].shape
      (4, 16)
      >>> tmp.cleanup()
    """
    where = "import_peft"
    path = Path(directory)
    _files.recover_directory(path)
    config_file = path / ADAPTER_CONFIG_NAME
    weights_file = path / ADAPTER_WEIGHTS_NAME
    if not config_file.is_file():
        raise ValueError(f"{where}: {str(path)!r} has no {ADAPTER_CONFIG_NAME}")
    if not weights_file.is_file():
        pickles = [n for n in _PICKLE_NAMES if (path / n).exists()]
        if pickles:
            raise ValueError(
                f"{where}: {str(path)!r} holds only pickled weights ({', '.join(pickles)}); "
                "rslora_jax reads safetensors only (pickles can run code on load). Re-save the "
                "adapter with PEFT's save_pretrained(..., safe_serialization=True)"
            )
        raise ValueError(f"{where}: {str(path)!r} has no {ADAPTER_WEIGHTS_NAME}")
    meta = hf_io.read_json(config_file, where)
    rules.check_options(meta, config_file, strict)
    _check_method_options(meta, f"{where}: {str(config_file)!r}")
    if expected_base_model is not None and meta.get("base_model_name_or_path") != (
        expected_base_model
    ):
        raise ValueError(
            f"{where}: the adapter in {str(path)!r} was trained on base_model_name_or_path="
            f"{meta.get('base_model_name_or_path')!r}, expected {expected_base_model!r}"
        )
    if "use_rslora" not in meta:
        warnings.warn(
            f"{where}: {str(config_file)!r} has no 'use_rslora' field; reading it as PEFT does, "
            "with use_rslora=False (scale lora_alpha / r)",
            PeftFormatWarning,
            stacklevel=2,
        )
    use_rslora = bool(meta.get("use_rslora", False))
    method = _method_from_peft(meta)
    r_default = int(meta["r"])
    alpha_default = float(meta.get("lora_alpha", 8))
    rank_pattern = meta.get("rank_pattern") or {}
    alpha_pattern = meta.get("alpha_pattern") or {}

    if any(is_adapter_key(k) for k in _all_keys(params)):
        raise ValueError(f"{where}: params already hold adapter leaves; pass the base tree")
    fam = family_of(model_config, where)
    scanned = fam.is_scanned(params, where)
    model_cfg = fam.config(model_config, scan_layers=scanned, where=where)
    modules = _base_modules(fam, params, model_cfg, where)
    by_name = {name: (m, i) for m in modules.values() for i, name in enumerate(m.names)}
    linear_names = list(by_name)
    all_linear = fam.all_linear(linear_names)

    # Modules PEFT adapts, per its config.
    unsupported = {fam.embedding_name: "the token embedding"}
    if model_cfg.tie_word_embeddings:
        unsupported[fam.output_name] = f"the tied {fam.output_name}"
    for name, what in unsupported.items():
        if rules.peft_selects(meta, name, all_linear):
            raise ValueError(
                f"{where}: {str(config_file)!r} (target_modules={meta.get('target_modules')!r}) "
                f"adapts {name!r}, {what}; LoRA there is not supported"
            )
    targeted = [n for n in linear_names if rules.peft_selects(meta, n, all_linear)]
    if not targeted:
        raise ValueError(
            f"{where}: target_modules={meta.get('target_modules')!r} selects no Linear module of "
            f"the base model (modules: {linear_names[:10]}...)"
        )
    specs = _leaves_for(LoraConfig(**method))

    with contextlib.ExitStack() as stack:
        reader = hf_io.TensorReader([weights_file], stack)
        keys = list(reader.shape)
        shapes, dtypes = reader.shape, reader.dtype
        prefixed = [k.startswith(PEFT_PREFIX) for k in keys]
        strip = len(PEFT_PREFIX) if keys and all(prefixed) else 0
        if any(prefixed) and not all(prefixed):
            bad = [k for k, p in zip(keys, prefixed) if not p][:5]
            raise ValueError(
                f"{where}: {str(weights_file)!r} mixes keys with and without the "
                f"{PEFT_PREFIX!r} prefix, e.g. {bad}"
            )
        found, unexpected = _classify_keys(keys, strip, specs, by_name, targeted, meta)
        missing = [
            f"{PEFT_PREFIX}{n}.{s.peft}"
            for n in targeted
            for s in specs
            if (n, s.ours) not in found
        ]
        missing_modules = {n for n in targeted if any((n, s.ours) not in found for s in specs)}
        if strict and (unexpected or missing):
            msg = [f"{where}: {str(weights_file)!r} does not match its adapter config and base:"]
            if missing:
                msg.append(f"missing tensors ({len(missing)}): {missing[:10]}")
            if unexpected:
                msg.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:10]}")
            raise ValueError(" ".join(msg))
        if unexpected or missing:
            warnings.warn(
                f"{where}: strict=False: ignoring unexpected tensors {unexpected[:10]} and "
                f"modules without (all) tensors {sorted(missing_modules)[:10]}",
                PeftFormatWarning,
                stacklevel=2,
            )
        loaded = [n for n in targeted if n not in missing_modules]
        if not loaded:
            raise ValueError(f"{where}: {str(weights_file)!r} holds no usable adapter")

        # Shapes, ranks, dtypes: checked for every tensor before any is read.
        ranks = {n: rules.pattern_value(rank_pattern, n, r_default) for n in loaded}
        alphas = {n: float(rules.pattern_value(alpha_pattern, n, alpha_default)) for n in loaded}
        for name in loaded:
            module, _ = by_name[name]
            r = ranks[name]
            for spec in specs:
                key = found[(name, spec.ours)]
                _check_shape(key, shapes[key], spec, r, module, rank_pattern)
                if dtypes[key] not in hf_io.ST_DTYPES:
                    raise ValueError(
                        f"{where}: tensor {key!r} has dtype {dtypes[key]}; expected one of "
                        f"{sorted(hf_io.ST_DTYPES)}"
                    )

        # Group by our path (stacked modules: all layers must agree).
        per_path: dict[str, list[str]] = {}
        for name in loaded:
            per_path.setdefault(by_name[name][0].path, []).append(name)
        path_rank: dict[str, int] = {}
        path_alpha: dict[str, float] = {}
        adapters: dict[str, Any] = {}
        np_dtype = np.dtype(jnp.dtype(dtype))
        for p, names in per_path.items():
            module = modules[p]
            if module.stacked:
                if len(names) != len(module.names):
                    absent = sorted(set(module.names) - set(names))
                    raise ValueError(
                        f"{where}: the adapter covers only some layers of the stacked module "
                        f"{p!r} (no adapter on {absent[:5]}); load the base with "
                        "scan_layers=False"
                    )
                for field, vals in (("rank", ranks), ("alpha", alphas)):
                    seen = {n: vals[n] for n in module.names}
                    if len(set(seen.values())) > 1:
                        raise ValueError(
                            f"{where}: per-layer {field}s differ within the stacked module "
                            f"{p!r} ({seen}); a scanned tree holds one {field} per stack: load "
                            "the base with scan_layers=False"
                        )
                names = list(module.names)
            path_rank[p] = ranks[names[0]]
            path_alpha[p] = alphas[names[0]]
            node = adapters
            for k in p.split("/"):
                node = node.setdefault(k, {})
            for spec in specs:
                arrs = [spec.from_peft(reader.get(found[(n, spec.ours)])) for n in names]
                arr = np.stack(arrs) if module.stacked else arrs[0]
                node[spec.ours] = jnp.asarray(arr.astype(np_dtype))

    adapted = set(per_path)
    lora_config = LoraConfig(
        rank=r_default,
        alpha=alpha_default,
        targets=rules.our_targets(adapted, meta, list(modules)),
        scaling="rslora" if use_rslora else "lora",
        rank_pattern=rules.our_patterns(path_rank, r_default),
        alpha_pattern=rules.our_patterns(path_alpha, alpha_default),
        dropout=float(meta.get("lora_dropout", 0.0) or 0.0),
        dtype=dtype,
        kernel_axes="lio" if scanned else None,
        **method,
    )
    for p in adapted:  # the translation is exact (a cheap check of our own patterns)
        if lora_config.rank_for(p) != path_rank[p] or lora_config.alpha_for(p) != path_alpha[p]:
            raise AssertionError(f"internal error: pattern translation failed at {p!r}")
    return combine(adapters, params), lora_config


def _classify_keys(
    keys: Sequence[str],
    strip: int,
    specs: Sequence[LeafSpec],
    by_name: Mapping[str, Any],
    targeted: Sequence[str],
    meta: Mapping[str, Any],
) -> tuple[dict[tuple[str, str], str], list[str]]:
    """``{(module name, our leaf): key}`` for the usable keys, and the others with a reason."""
    found: dict[tuple[str, str], str] = {}
    unexpected: list[str] = []
    chosen = set(targeted)
    for key in keys:
        body = key[strip:]
        spec = next((s for s in specs if body.endswith("." + s.peft)), None)
        if spec is None:
            known = next((d for s, d in _UNSUPPORTED_SUFFIXES.items() if s in body), None)
            other = next(
                ((s, cls) for s, (_, cls) in _known_specs().items() if body.endswith("." + s)),
                None,
            )
            if known:
                reason = f"{known} is not supported"
            elif other is not None:
                needs = ", ".join(other[1].peft_fields or {})
                reason = f"{other[0]!r} needs {needs or other[1].title}"
            else:
                reason = "not a LoRA factor"
            unexpected.append(f"{key} ({reason})")
            continue
        name = body[: -len(spec.peft) - 1]
        if name not in by_name:
            unexpected.append(f"{key} (module {name!r} does not exist in the base params)")
        elif name not in chosen:
            unexpected.append(
                f"{key} (module {name!r} is not selected by target_modules="
                f"{meta.get('target_modules')!r})"
            )
        else:
            found[(name, spec.ours)] = key
    return found, unexpected


def _all_keys(tree: Any) -> list[str]:
    out = []
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.append(k)
            out.extend(_all_keys(v))
    return out


def _check_shape(
    key: str,
    shape: tuple[int, ...],
    spec: LeafSpec,
    r: int,
    module: LinearModule,
    rank_pattern: Mapping[str, Any],
) -> None:
    want = spec.shape(r, module.d_in, module.d_out)
    if shape == want:
        return
    source = (
        "rank_pattern"
        if rank_pattern and any(re.match(rf"(.*\.)?({k})$", module.names[0]) for k in rank_pattern)
        else "r"
    )
    msg = (
        f"import_peft: tensor {key!r} has shape {shape}, expected {want} "
        f"({spec.peft} of a module with in_features={module.d_in}, "
        f"out_features={module.d_out}, rank {r} from the config's {source})"
    )
    if len(shape) == len(want) == 2 and shape == want[::-1]:
        msg += ": the factor is stored transposed"
    elif len(shape) == 2 and len(want) == 2:
        r_axis = 0 if spec.peft.startswith("lora_A") else 1
        other = 1 - r_axis
        if shape[other] == want[other]:
            msg += (
                f": its rank is {shape[r_axis]}, but the config (rank_pattern/r) says {r}, so "
                "the scale would be wrong"
            )
        elif shape[::-1][other] == want[other]:
            msg += ": the factor looks transposed and its rank does not match the config"
    raise ValueError(msg)


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_FORMAT_VERSION",
    "LeafSpec",
    "PeftFormatWarning",
    "export_peft",
    "import_peft",
]
