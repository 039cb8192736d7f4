"""What every family's configuration shares, and the flags the one decoder reads.

A family's configuration class (`rslora_jax.models.llama.LlamaConfig`,
`rslora_jax.models.gemma.GemmaConfig`, ...) subclasses `DecoderConfig`: the fields every
decoder-only model has (transformers' names), the runtime options, their validation, the
per-layer attention pattern (``sliding_window`` and ``layer_types``) and conversion helpers from
transformers configs. It adds its own fields and says, through `DecoderConfig.flags`, how its
architecture differs from Llama's; `DecoderConfig.arch` combines both into an `Architecture`,
which is all that the modules of `rslora_jax.models.decoder` read.

Layer kinds. Layers differ only in their attention window and rotary embedding (Gemma 2/3's
local and global layers, Qwen2/Qwen3's upper sliding layers). `Architecture.kinds` lists the
distinct ``(window, rope)`` pairs and `Architecture.layer_kinds` gives each layer's index into
it. With scanned layers the index is a scanned per-layer input and each kind is one branch of a
``lax.switch`` with a static window, so the fast paths of `jax.nn.dot_product_attention`
(``local_window_size``, cuDNN) stay available and only one branch runs per layer; the stacked
parameter layout (one leading layer axis) stays the same for every family.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rslora_jax.models.rope import Rope, RopeScaling

ATTENTION_IMPLS = (None, "xla", "cudnn")
FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)
#: transformers' activation names -> ours (the MLP computes ``act(gate) * up``).
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu": "gelu",
}
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "remat_policy", "attention_impl")


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One kind of layer: its attention window (None: global) and its rotary embedding.

    Attributes:
        window: sliding window length, or None.
        rope: index into `Architecture.ropes`.
    """

    window: int | None
    rope: int


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The flags of the one decoder (`rslora_jax.models.decoder`), derived from a config.

    Attributes:
        norm_offset: RMSNorm multiplies by ``offset + w`` (Gemma: 1, weights stored around 0).
        embed_scale: the embeddings are multiplied by it (Gemma: ``sqrt(hidden_size)``).
        activation: the MLP's gate activation: ``"silu"``, ``"gelu_tanh"`` or ``"gelu"``.
        sandwich_norms: norms before and after attention and MLP (Gemma 2/3): the layer holds
            ``input_layernorm``, ``post_attention_layernorm`` (on the attention output),
            ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``.
        qk_norm: RMSNorm over each query and key head before RoPE (Gemma 3, Qwen3).
        query_scale: attention logit scale (default ``head_dim ** -0.5``).
        attn_softcap: attention logit soft cap ``c * tanh(x / c)`` (Gemma 2).
        final_softcap: output logit soft cap (Gemma 2/3).
        qkv_bias: q/k/v projections carry a bias.
        o_bias: the output projection carries a bias.
        mlp_bias: the MLP projections carry biases.
        ropes: the distinct rotary embeddings.
        kinds: the distinct layer kinds.
        layer_kinds: each layer's index into `kinds`.
    """

    norm_offset: float = 0.0
    embed_scale: float | None = None
    activation: str = "silu"
    sandwich_norms: bool = False
    qk_norm: bool = False
    query_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    ropes: tuple[Rope, ...] = ()
    kinds: tuple[LayerKind, ...] = ()
    layer_kinds: tuple[int, ...] = ()


def to_dtype(name: str, value: Any) -> np.dtype:
    """`value` as a floating numpy dtype, or a ValueError naming `name`."""
    try:
        dt = jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"{name}={value!r} is not a dtype") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{name}={value!r} must be a floating dtype")
    return dt


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer) and value > 0


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Fields and checks every family's configuration shares (see the module docstring).

    Architecture fields follow transformers' names. ``sliding_window`` lets a query attend to
    itself and the ``sliding_window - 1`` keys before it, as transformers does; ``layer_types``
    (``"full_attention"`` / ``"sliding_attention"`` per layer) says which layers use it. None
    means every layer does (when ``sliding_window`` is set) or none does; a pattern that is not
    mixed is normalised to None.

    Runtime fields: ``dtype`` (compute dtype of activations and logits), ``param_dtype``,
    ``scan_layers`` (one ``nn.scan`` over the layers, params stacked on a leading axis),
    ``remat`` (per-layer rematerialisation with the ``jax.checkpoint_policies`` entry named by
    ``remat_policy``) and ``attention_impl`` (``implementation`` of
    :func:`jax.nn.dot_product_attention`: None/"xla"/"cudnn").

    Subclasses set `MODEL_TYPES`, override `flags` (and `rope_for` when layer types differ in
    their RoPE), ``from_hf``, ``to_hf`` and ``tiny``.
    """

    MODEL_TYPES = ()
    # Rope types a family's rope_scaling may have (see RopeScaling.from_dict).
    ROPE_TYPES = ("linear", "llama3")

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | Mapping[str, Any] | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    tie_word_embeddings: bool = False
    model_type: str = ""
    initializer_range: float = 0.02
    # Runtime options.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: bool = False
    remat_policy: str = "dots_with_no_batch_dims_saveable"
    attention_impl: str | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if not _positive_int(value):
                raise ValueError(f"{name}.{field}={value!r} must be a positive int")
        if self.model_type not in self.MODEL_TYPES:
            raise ValueError(
                f"{name}.model_type={self.model_type!r} must be one of {self.MODEL_TYPES}"
            )
        kv = self.num_key_value_heads
        if kv is None:
            kv = self.num_attention_heads
            object.__setattr__(self, "num_key_value_heads", kv)
        if kv <= 0 or self.num_attention_heads % kv:
            raise ValueError(
                f"{name}.num_key_value_heads={kv!r} must be positive and divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"{name}.hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"{name}.head_dim={self.head_dim!r} must be a positive even int")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"{name}.rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"{name}.rope_theta={self.rope_theta!r} must be > 0")
        object.__setattr__(self, "rope_scaling", self._scaling("rope_scaling", self.rope_scaling))
        if self.sliding_window is not None and not _positive_int(self.sliding_window):
            raise ValueError(
                f"{name}.sliding_window={self.sliding_window!r} must be None or a positive int"
            )
        self._normalise_layer_types()
        object.__setattr__(self, "dtype", to_dtype(f"{name}.dtype", self.dtype))
        object.__setattr__(self, "param_dtype", to_dtype(f"{name}.param_dtype", self.param_dtype))
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"{name}.attention_impl={self.attention_impl!r} must be one of {ATTENTION_IMPLS}"
            )
        if not callable(getattr(jax.checkpoint_policies, self.remat_policy, None)):
            raise ValueError(
                f"{name}.remat_policy={self.remat_policy!r} is not a jax.checkpoint_policies name"
            )

    def _scaling(self, field: str, value: Any) -> RopeScaling | None:
        if isinstance(value, Mapping):
            return RopeScaling.from_dict(value, self.ROPE_TYPES, self.max_position_embeddings)
        if value is None:
            return None
        if not isinstance(value, RopeScaling):
            raise ValueError(
                f"{type(self).__name__}.{field}={value!r} must be None, a dict or RopeScaling"
            )
        if value.rope_type not in self.ROPE_TYPES:
            raise ValueError(
                f"{type(self).__name__}.{field}: rope_type={value.rope_type!r} is not supported "
                f"by {self.MODEL_TYPES}; expected one of {self.ROPE_TYPES}"
            )
        return value

    def _normalise_layer_types(self) -> None:
        name = type(self).__name__
        types = self.layer_types
        if types is None:
            return
        if isinstance(types, str) or not isinstance(types, Sequence):
            raise ValueError(f"{name}.layer_types={types!r} must be a list of layer types")
        types = tuple(types)
        bad = sorted({t for t in types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(
                f"{name}.layer_types holds {bad}; expected {FULL!r} or {SLIDING!r} per layer"
            )
        if len(types) != self.num_hidden_layers:
            raise ValueError(
                f"{name}.layer_types has {len(types)} entries; expected num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        if SLIDING in types and self.sliding_window is None:
            raise ValueError(f"{name}.layer_types has sliding layers but sliding_window is None")
        if set(types) == {SLIDING}:
            types = None  # uniform: every layer uses the window
        elif set(types) == {FULL}:
            if self.sliding_window is not None:
                raise ValueError(
                    f"{name}.sliding_window={self.sliding_window} but layer_types has no "
                    "sliding layer; set sliding_window=None"
                )
            types = None
        object.__setattr__(self, "layer_types", types)

    # ------------------------------------------------------------------ architecture
    def layer_type(self, i: int) -> str:
        """``"sliding_attention"`` or ``"full_attention"`` for layer `i`."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return SLIDING if self.sliding_window is not None else FULL

    def rope_for(self, layer_type: str) -> Rope:
        """The rotary embedding of layers of `layer_type` (the same for all by default)."""
        del layer_type
        return Rope(float(self.rope_theta), int(self.head_dim), self.rope_scaling)  # type: ignore[arg-type]

    def flags(self) -> dict[str, Any]:
        """How the family differs from Llama: `Architecture` fields other than the layer kinds."""
        return {}

    @functools.cached_property
    def arch(self) -> Architecture:
        """The decoder's flags (cached on the config)."""
        ropes: list[Rope] = []
        kinds: list[LayerKind] = []
        layer_kinds = []
        for i in range(self.num_hidden_layers):
            t = self.layer_type(i)
            rope = self.rope_for(t)
            if rope not in ropes:
                ropes.append(rope)
            kind = LayerKind(self.sliding_window if t == SLIDING else None, ropes.index(rope))
            if kind not in kinds:
                kinds.append(kind)
            layer_kinds.append(kinds.index(kind))
        return Architecture(
            **self.flags(), ropes=tuple(ropes), kinds=tuple(kinds), layer_kinds=tuple(layer_kinds)
        )

    def replace(self, **changes: Any) -> Any:
        """Returns a copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- from transformers
def check_runtime(cls_name: str, runtime: Mapping[str, Any]) -> None:
    """Refuses runtime options that are not `RUNTIME_FIELDS`."""
    unknown = sorted(set(runtime) - set(RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"{cls_name}.from_hf: unknown runtime options {unknown}")


def hf_activation(hf_config: Any, *names: str) -> str:
    """The first of the attributes `names` that is set, checked against `ACTIVATIONS`.

    Returns:
        The transformers name (stored in the config for the round trip).
    """
    act = None
    for n in names:
        act = getattr(hf_config, n, None)
        if act is not None:
            break
    if act not in ACTIVATIONS:
        raise ValueError(
            f"{names[0]}={act!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
        )
    return act


def hf_rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE dict of a transformers config (5.x ``rope_parameters``, possibly per layer
    type; 4.x ``rope_theta`` + ``rope_scaling``), with ``rope_theta`` set when known.

    Raises:
        ValueError: a per-layer-type dict where the family has one RoPE, or the reverse.
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_parameters={params!r}: expected a dict")
    nested = any(isinstance(v, Mapping) for v in params.values())
    if nested and layer_type is None:
        raise ValueError("per-layer-type rope_parameters are not supported by this family")
    if nested:
        params = params.get(layer_type) or {}
    out = dict(params)
    if not out:
        out = dict(getattr(hf_config, "rope_scaling", None) or {})
        theta = getattr(hf_config, "rope_theta", None)
        if theta is not None:
            out.setdefault("rope_theta", theta)
    return out


def hf_partial_rotary(hf_config: Any, params: Mapping[str, Any], allowed: bool) -> float:
    """``partial_rotary_factor`` of a transformers config (1.0 if unset).

    Raises:
        ValueError: a factor other than 1 where the family has no partial rotation.
    """
    value = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    value = 1.0 if value is None else float(value)
    if value != 1.0 and not allowed:
        raise ValueError(f"partial_rotary_factor={value!r} is not supported")
    if not 0 < value <= 1:
        raise ValueError(f"partial_rotary_factor={value!r} must be in (0, 1]")
    return value


def hf_layer_types(hf_config: Any, window: int | None) -> tuple[int | None, tuple[str, ...] | None]:
    """``(sliding_window, layer_types)`` of a transformers config with per-layer types
    (``layer_types``; else Qwen's ``max_window_layers`` rule), normalised: None when every
    layer is alike."""
    n = int(hf_config.num_hidden_layers)
    types = getattr(hf_config, "layer_types", None)
    if types is None:
        if window is None:
            return None, None
        first = getattr(hf_config, "max_window_layers", 0) or 0
        types = [SLIDING if i >= first else FULL for i in range(n)]
    types = tuple(types)
    if window is None or SLIDING not in types:
        return None, None
    if set(types) == {SLIDING}:
        return int(window), None
    return int(window), types


def hf_common(hf_config: Any) -> dict[str, Any]:
    """The `DecoderConfig` fields every transformers decoder config has."""
    kv = getattr(hf_config, "num_key_value_heads", None)
    heads = int(hf_config.num_attention_heads)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return dict(
        vocab_size=int(hf_config.vocab_size),
        hidden_size=int(hf_config.hidden_size),
        intermediate_size=int(hf_config.intermediate_size),
        num_hidden_layers=int(hf_config.num_hidden_layers),
        num_attention_heads=heads,
        num_key_value_heads=None if kv is None else int(kv),
        head_dim=int(head_dim),
        max_position_embeddings=int(hf_config.max_position_embeddings),
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        model_type=hf_config.model_type,
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
    )


def hf_common_kwargs(config: DecoderConfig) -> dict[str, Any]:
    """The transformers config arguments of the common fields (inverse of `hf_common`)."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
    )


def hf_layer_type_list(config: DecoderConfig) -> list[str]:
    """Every layer's type, for a transformers config's ``layer_types``."""
    return [config.layer_type(i) for i in range(config.num_hidden_layers)]


__all__ = [
    "ACTIVATIONS",
    "ATTENTION_IMPLS",
    "FULL",
    "LAYER_TYPES",
    "RUNTIME_FIELDS",
    "SLIDING",
    "Architecture",
    "DecoderConfig",
    "LayerKind",
]
