"""What export and import share: PEFT's file names, the leaves of each adapter method in
PEFT's format (from the method protocol), and the model's Linear modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from rslora_jax._types import Params
from rslora_jax.core import protocol
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.protocol import Method
from rslora_jax.core.tree import (
    KERNEL,
    global_entries,
    iter_holders,
    join_path,
)
from rslora_jax.models.families import LinearModule, ModelFamily

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Key prefix of a PeftModel's state dict (PeftModel.base_model is the LoraModel, whose .model is
# the transformers model).
PEFT_PREFIX = "base_model.model."
# The PEFT release whose format (field names, defaults, key names) this module writes and was
# tested against; written as ``peft_version``.
PEFT_FORMAT_VERSION = "0.21.2"
PEFT_TASK_TYPES = (None, "CAUSAL_LM")
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# The safetensors metadata entry in which export_peft records the factors' orientation: with a
# full-rank square adapter (r = in = out) shapes cannot tell lora_A from a transposed one.
LAYOUT_KEY = "rslora_jax.layout"


def layout_record(specs: tuple[LeafSpec, ...] | list[LeafSpec]) -> str:
    """The orientation of each stored leaf, as `LAYOUT_KEY` records it, e.g.
    ``"lora_A.weight=(r,in);lora_B.weight=(out,r)"``."""
    shapes = {"a": "(r,in)", "b": "(out,r)", "out": "(out,)"}
    return ";".join(f"{spec.peft}={shapes[spec.layout]}" for spec in specs)


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


def specs_of(method: Method) -> tuple[LeafSpec, ...]:
    return tuple(
        LeafSpec(name, leaf.peft, leaf.layout)
        for name, leaf in method.leaves.items()
        if leaf.peft is not None
    )


def known_specs() -> dict[str, tuple[LeafSpec, type[Method]]]:
    """Every PEFT suffix a registered method declares -> (spec, method)."""
    out: dict[str, tuple[LeafSpec, type[Method]]] = {}
    for cls in protocol.methods().values():
        if cls.peft_fields is None:
            continue
        for spec in specs_of(cls()):
            out.setdefault(spec.peft, (spec, cls))
    return out


def known_leaf_names() -> set[str]:
    """Our names of every leaf a registered method with a PEFT format stores (two methods may
    store different leaves under one PEFT suffix: LoRA's ``lora_a`` and a frozen-A method's)."""
    return {
        spec.ours
        for cls in protocol.methods().values()
        if cls.peft_fields is not None
        for spec in specs_of(cls())
    }


# PEFT suffixes of keys left over after the import (named in the error message).
UNSUPPORTED_SUFFIXES = {
    "lora_embedding_A": "LoRA on an embedding that target_modules does not select",
    "lora_embedding_B": "LoRA on an embedding that target_modules does not select",
    "lora_B.bias": "a bias on B, but the config has no lora_bias=true",
    "token_adapter.trainable_tokens_delta": "token rows trainable_token_indices does not name",
    "lora_E": "AdaLoRA is not supported",
}


def leaves_for(config: LoraConfig) -> tuple[LeafSpec, ...]:
    return specs_of(config.method)


# init_lora_weights values whose saved factors are plain LoRA factors on the unchanged base.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# init_lora_weights values with which PEFT changes the base weights when it loads the adapter.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def method_fields() -> dict[str, Any]:
    """Every adapter_config.json field a registered method sets, with its 'off' value."""
    return {k: False for cls in protocol.methods().values() for k in (cls.peft_fields or {})}


def refuse_without_peft_format(lora_config: LoraConfig, params: Any, where: str) -> None:
    """Methods that have no PEFT format (e.g. RaSA)."""
    method = lora_config.method
    shared = global_entries(params)
    if method.peft_fields is None or shared:
        title = method.title if method.peft_fields is None else f"top-level {sorted(shared)}"
        raise ValueError(
            f"{where}: {title} adapters have no PEFT format; merge them (rslora_jax.merge) and "
            "export the merged model with rslora_jax.hf.save_pretrained"
        )


def check_export_args(
    lora_config: Any, params: Any, task_type: Any, dtype: Any, where: str
) -> np.dtype | None:
    """The checks every PEFT export makes first; returns the output dtype (None: as stored).

    Raises:
      ValueError: `lora_config` not a `LoraConfig`, a method without a PEFT format, a bad
        `task_type`, or a `dtype` that is not float32, float16 or bfloat16.
    """
    import jax.numpy as jnp

    from rslora_jax.hf import io as hf_io

    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"{where}: lora_config must be a LoraConfig, got {type(lora_config)}")
    refuse_without_peft_format(lora_config, params, where)
    if task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"{where}: task_type={task_type!r} must be one of {PEFT_TASK_TYPES}")
    if dtype is None:
        return None
    out_dtype = np.dtype(jnp.dtype(dtype))
    if out_dtype not in hf_io.NP_TO_ST:
        raise ValueError(f"{where}: dtype={dtype!r} must be float32, float16 or bfloat16")
    return out_dtype


def method_to_peft(lora_config: LoraConfig) -> dict[str, Any]:
    """The adapter_config.json fields that record the method and its initialisation."""
    return {
        "init_lora_weights": lora_config.init.to_peft(),
        **method_fields(),
        **dict(lora_config.method.peft_fields or {}),
    }


def check_method_options(meta: Mapping[str, Any], where: str) -> None:
    """Refuses method fields of an adapter_config.json that import_peft cannot honour."""
    init = meta.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"{where} has init_lora_weights={init!r}: PEFT recomputes a residual base from the base "
            "weights when it loads such an adapter, which import_peft does not do. Convert it to "
            "a plain LoRA adapter with PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and import that"
        )
    if init not in PLAIN_INITS:
        raise ValueError(f"{where} has an unknown init_lora_weights={init!r}")
    for field in method_fields():
        if not isinstance(meta.get(field, False), bool):
            raise ValueError(f"{where}: {field}={meta[field]!r} must be true or false")


def method_from_peft(meta: Mapping[str, Any]) -> dict[str, Any]:
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
def base_modules(
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
