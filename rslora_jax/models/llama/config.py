"""The Llama-family configuration: `LlamaConfig` (validated, from / to a transformers config)
and `RopeScaling`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODEL_TYPES = ("llama", "mistral", "qwen2")
_ATTENTION_IMPLS = (None, "xla", "cudnn", "blocked")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (Llama-3 or linear), as in a transformers ``rope_scaling`` dict.

    Attributes:
        rope_type: ``"llama3"`` or ``"linear"``.
        factor: frequency division factor.
        low_freq_factor: Llama-3 only.
        high_freq_factor: Llama-3 only.
        original_max_position_embeddings: Llama-3 only: the pre-training context length.

    Example:
        >>> RopeScaling.from_dict({"rope_type": "linear", "factor": 2.0}).factor
        2.0
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                "expected 'llama3' or 'linear'"
            )
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor={self.factor!r} must be > 0")
        if self.rope_type == "llama3":
            for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if getattr(self, name) is None:
                    raise ValueError(f"rope_scaling.{name} is required for rope_type='llama3'")
            if not self.high_freq_factor > self.low_freq_factor:  # type: ignore[operator]
                raise ValueError(
                    f"rope_scaling.high_freq_factor={self.high_freq_factor!r} must exceed "
                    f"low_freq_factor={self.low_freq_factor!r}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RopeScaling | None:
        """Builds from a transformers ``rope_scaling``/``rope_parameters`` dict.

        Args:
            d: dict with ``rope_type`` (or the legacy ``type``) and the scaling fields. Other keys
                (``rope_theta``) are ignored.

        Returns:
            A :class:`RopeScaling`, or None for ``rope_type == "default"``.

        Raises:
            ValueError: for rope types other than default, linear and llama3.
        """
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type in (None, "default"):
            return None
        if rope_type not in ("llama3", "linear"):
            raise ValueError(
                f"rope_scaling rope_type={rope_type!r} is not supported; "
                "expected 'default', 'linear' or 'llama3'"
            )
        if "partial_rotary_factor" in d and d["partial_rotary_factor"] not in (None, 1, 1.0):
            raise ValueError(
                f"partial_rotary_factor={d['partial_rotary_factor']!r} is not supported"
            )
        if rope_type == "linear":
            return cls("linear", float(d["factor"]))
        omp = d.get("original_max_position_embeddings")
        return cls(
            "llama3",
            float(d["factor"]),
            float(d["low_freq_factor"]),
            float(d["high_freq_factor"]),
            None if omp is None else int(omp),
        )

    def to_dict(self) -> dict[str, Any]:
        """The transformers ``rope_scaling`` dict (without ``rope_theta``)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


def _to_dtype(name: str, value: Any) -> np.dtype:
    try:
        dt = jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"{name}={value!r} is not a dtype") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{name}={value!r} must be a floating dtype")
    return dt


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and runtime options of :class:`LlamaForCausalLM` (hashable, immutable).

    Architecture fields follow transformers' names. ``attention_bias`` puts a bias on q, k, v and
    o for Llama; for Qwen2 (whose q/k/v always carry a bias and o never does) it must be True
    and means "bias on q/k/v only". ``sliding_window`` (Mistral, all-sliding Qwen2) lets each
    token attend to itself and the ``sliding_window - 1`` tokens before it, as transformers does.

    Runtime fields: ``dtype`` (compute dtype of activations and logits), ``param_dtype``,
    ``scan_layers`` (one ``nn.scan`` over the layers, params stacked on a leading axis),
    ``remat`` (per-layer rematerialisation with the ``jax.checkpoint_policies`` entry named by
    ``remat_policy``; the default saves the projections' matmul outputs and recomputes the rest,
    attention included) and ``attention_impl`` (None: "blocked" on CPUs from 256 positions on,
    XLA's choice elsewhere;
    "xla"/"cudnn": ``implementation`` of :func:`jax.nn.dot_product_attention`; "blocked": the
    flash-style CPU attention of :mod:`rslora_jax.models.attention`). Without remat, the XLA
    attention's (B, H, S, S) probabilities are still recomputed in the backward pass instead of
    being kept per layer. On GPUs prefer ``attention_impl="cudnn"`` (fused flash attention):
    measured on one H100 for a 1.1B model (TinyLlama shapes) at batch 4 x 2048 tokens, bf16
    params and compute, gradients of all parameters (XLA temporaries / step time):
    xla 30.7 GB / 367 ms, cudnn 26.4 GB / 141 ms, remat+xla 13.3 GB / 386 ms,
    remat+cudnn 7.9 GB / 124 ms.

    Example:
        >>> cfg = LlamaConfig.tiny()
        >>> cfg.head_dim, cfg.num_key_value_heads
        (8, 2)
        >>> LlamaConfig.tiny(dtype="bfloat16").dtype
        dtype(bfloat16)
    """

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
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    initializer_range: float = 0.02
    # Runtime options.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: bool = False
    remat_policy: str = "dots_with_no_batch_dims_saveable"
    attention_impl: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"LlamaConfig.{name}={value!r} must be a positive int")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig.model_type={self.model_type!r} must be one of {MODEL_TYPES}"
            )
        kv = self.num_key_value_heads
        if kv is None:
            kv = self.num_attention_heads
            object.__setattr__(self, "num_key_value_heads", kv)
        if kv <= 0 or self.num_attention_heads % kv:
            raise ValueError(
                f"LlamaConfig.num_key_value_heads={kv!r} must be positive and divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim!r} must be a positive even int")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta={self.rope_theta!r} must be > 0")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"LlamaConfig.rope_scaling={self.rope_scaling!r} must be None, a dict or RopeScaling"
            )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int | np.integer) or self.sliding_window <= 0
        ):
            raise ValueError(
                f"LlamaConfig.sliding_window={self.sliding_window!r} must be None or a positive int"
            )
        if self.model_type == "qwen2" and (not self.attention_bias or self.mlp_bias):
            raise ValueError(
                "LlamaConfig: model_type='qwen2' always has a q/k/v bias and no MLP bias: "
                f"got attention_bias={self.attention_bias!r}, mlp_bias={self.mlp_bias!r}"
            )
        if self.model_type == "mistral" and (self.attention_bias or self.mlp_bias):
            raise ValueError(
                "LlamaConfig: model_type='mistral' has no biases: "
                f"got attention_bias={self.attention_bias!r}, mlp_bias={self.mlp_bias!r}"
            )
        if self.model_type == "llama" and self.sliding_window is not None:
            raise ValueError(
                f"LlamaConfig.sliding_window={self.sliding_window!r}: model_type='llama' has no "
                "sliding-window attention (use model_type='mistral')"
            )
        object.__setattr__(self, "dtype", _to_dtype("LlamaConfig.dtype", self.dtype))
        object.__setattr__(
            self, "param_dtype", _to_dtype("LlamaConfig.param_dtype", self.param_dtype)
        )
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ValueError(
                f"LlamaConfig.attention_impl={self.attention_impl!r} must be one of "
                f"{_ATTENTION_IMPLS}"
            )
        if not callable(getattr(jax.checkpoint_policies, self.remat_policy, None)):
            raise ValueError(
                f"LlamaConfig.remat_policy={self.remat_policy!r} is not a "
                "jax.checkpoint_policies name"
            )

    @property
    def qkv_bias(self) -> bool:
        """Whether q/k/v projections carry a bias."""
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Whether the output projection carries a bias (Llama's attention_bias; never Qwen2)."""
        return self.attention_bias and self.model_type == "llama"

    def replace(self, **changes: Any) -> LlamaConfig:
        """Returns a copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A tiny configuration for tests: 2 layers, width 32, 4 query and 2 K/V heads.

        Args:
            **overrides: any field to change.

        Returns:
            The configuration.
        """
        fields = dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf(cls, hf_config: Any, **runtime: Any) -> LlamaConfig:
        """Converts a transformers Llama/Mistral/Qwen2 config (transformers 4.57 or 5.x).

        Args:
            hf_config: a ``transformers`` ``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``.
            **runtime: runtime fields (``dtype``, ``param_dtype``, ``scan_layers``, ``remat``,
                ``remat_policy``, ``attention_impl``).

        Returns:
            The equivalent :class:`LlamaConfig`.

        Raises:
            ValueError: for other model types, activations other than SiLU, unsupported RoPE
                variants, Qwen2 configs that mix sliding and full attention layers, or an
                unknown runtime option.

        Example:
            >>> import transformers
            >>> hf = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
            ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
            >>> LlamaConfig.from_hf(hf, scan_layers=False).num_key_value_heads
            2
        """
        runtime_names = {"dtype", "param_dtype", "scan_layers", "remat", "remat_policy"}
        runtime_names.add("attention_impl")
        unknown = sorted(set(runtime) - runtime_names)
        if unknown:
            raise ValueError(f"LlamaConfig.from_hf: unknown runtime options {unknown}")
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; expected one of {MODEL_TYPES}"
            )
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported; expected 'silu'")
        heads = int(hf_config.num_attention_heads)
        kv = getattr(hf_config, "num_key_value_heads", None)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads

        # RoPE: transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in
        # `rope_theta` and `rope_scaling`.
        rope_params = getattr(hf_config, "rope_parameters", None) or {}
        if not isinstance(rope_params, Mapping):
            raise ValueError(f"rope_parameters={rope_params!r}: expected a flat dict")
        if any(isinstance(v, Mapping) for v in rope_params.values()):
            raise ValueError("per-layer-type rope_parameters are not supported")
        theta = rope_params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 1e4
        scaling_dict = getattr(hf_config, "rope_scaling", None) or rope_params
        partial = getattr(hf_config, "partial_rotary_factor", None)
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={partial!r} is not supported")
        rope_scaling = RopeScaling.from_dict(scaling_dict) if scaling_dict else None
        if rope_scaling is not None and rope_scaling.rope_type == "llama3":
            if rope_scaling.original_max_position_embeddings is None:
                rope_scaling = dataclasses.replace(
                    rope_scaling,
                    original_max_position_embeddings=int(hf_config.max_position_embeddings),
                )

        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        sliding_window = None
        if model_type == "qwen2":
            attention_bias, mlp_bias = True, False
            window = getattr(hf_config, "sliding_window", None)
            if getattr(hf_config, "use_sliding_window", False) and window is not None:
                layer_types = getattr(hf_config, "layer_types", None) or [
                    "sliding_attention" if i >= hf_config.max_window_layers else "full_attention"
                    for i in range(hf_config.num_hidden_layers)
                ]
                kinds = set(layer_types)
                if kinds == {"sliding_attention"}:
                    sliding_window = int(window)
                elif "sliding_attention" in kinds:
                    raise ValueError(
                        "Qwen2 configs that mix sliding-window and full-attention layers "
                        f"(layer_types={layer_types}) are not supported"
                    )
        elif model_type == "mistral":
            attention_bias = mlp_bias = False
            window = getattr(hf_config, "sliding_window", None)
            sliding_window = None if window is None else int(window)

        return cls(
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size),
            num_hidden_layers=int(hf_config.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=None if kv is None else int(kv),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf_config.max_position_embeddings),
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
            sliding_window=sliding_window,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            model_type=model_type,
            initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
            **runtime,
        )

    def to_hf(self) -> Any:
        """Returns the equivalent transformers config object (imports transformers lazily).

        Returns:
            A ``transformers.LlamaConfig``, ``MistralConfig`` or ``Qwen2Config``.

        Example:
            >>> LlamaConfig.tiny(model_type="mistral", sliding_window=8).to_hf().sliding_window
            8
        """
        import transformers

        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            hidden_act="silu",
            rope_theta=self.rope_theta,
        )
        if self.rope_scaling is not None:
            kwargs["rope_scaling"] = self.rope_scaling.to_dict()
        default_head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "llama":
            cls = transformers.LlamaConfig
            kwargs.update(
                head_dim=self.head_dim, attention_bias=self.attention_bias, mlp_bias=self.mlp_bias
            )
        elif self.model_type == "mistral":
            cls = transformers.MistralConfig
            kwargs.update(head_dim=self.head_dim, sliding_window=self.sliding_window)
        else:
            cls = transformers.Qwen2Config
            kwargs.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                max_window_layers=0,
            )
            if self.head_dim != default_head_dim:
                kwargs["head_dim"] = self.head_dim
        hf = cls(**kwargs)
        hf.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
        return hf


__all__ = ["MODEL_TYPES", "LlamaConfig", "RopeScaling"]
