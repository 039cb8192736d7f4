"""The Gemma family (Gemma 2, Gemma 3 text): `GemmaConfig`, run by the shared decoder.

What differs from Llama (`rslora_jax.models.architecture.Architecture` flags): embeddings scaled
by ``sqrt(hidden_size)``; RMSNorm with ``(1 + w)`` (weights stored around 0); a GeGLU MLP
(tanh-approximated GELU); norms before and after attention and MLP; ``head_dim`` independent of
the width; queries scaled by ``query_pre_attn_scalar ** -0.5``; soft-capped attention logits
(Gemma 2) and output logits; sliding-window and global layers (``layer_types``; Gemma 3's
local layers have their own RoPE base ``rope_local_base_freq``); q/k RMSNorm (Gemma 3); tied
embeddings.

As in transformers, Gemma 3 ignores ``attn_logit_softcapping`` (its attention passes no soft cap);
the field is kept so that a config round-trips.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rslora_jax.models.architecture import (
    ACTIVATIONS,
    FULL,
    SLIDING,
    DecoderConfig,
    check_runtime,
    hf_activation,
    hf_common,
    hf_common_kwargs,
    hf_layer_type_list,
    hf_layer_types,
    hf_partial_rotary,
    hf_rope_parameters,
)
from rslora_jax.models.rope import Rope, RopeScaling

MODEL_TYPES = ("gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
    """Gemma 2 / Gemma 3 (text) architecture and runtime options (hashable, immutable).

    Fields beyond :class:`~rslora_jax.models.architecture.DecoderConfig` (transformers' names):
    ``hidden_activation``, ``query_pre_attn_scalar`` (None: ``head_dim``),
    ``attn_logit_softcapping`` (Gemma 2 only), ``final_logit_softcapping``,
    ``rope_local_base_freq`` and ``rope_local_scaling`` (Gemma 3's sliding layers),
    ``attention_bias`` (on q/k/v/o).

    Example:
        >>> cfg = GemmaConfig.tiny()
        >>> cfg.arch.norm_offset, cfg.arch.qk_norm, [k.window for k in cfg.arch.kinds]
        (1.0, True, [4, None])
        >>> GemmaConfig.tiny(model_type="gemma2").arch.attn_softcap
        50.0
    """

    MODEL_TYPES = MODEL_TYPES

    model_type: str = "gemma3_text"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float = 10000.0
    rope_local_scaling: RopeScaling | Any = None
    attention_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(
                f"GemmaConfig.hidden_activation={self.hidden_activation!r} is not supported; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )
        if self.query_pre_attn_scalar is None:
            object.__setattr__(self, "query_pre_attn_scalar", self.head_dim)
        for name in ("query_pre_attn_scalar", "rope_local_base_freq"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GemmaConfig.{name}={getattr(self, name)!r} must be > 0")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"GemmaConfig.{name}={value!r} must be None or > 0")
        object.__setattr__(
            self, "rope_local_scaling", self._scaling("rope_local_scaling", self.rope_local_scaling)
        )
        if self.model_type == "gemma2" and (
            self.rope_local_base_freq != 10000.0 or self.rope_local_scaling is not None
        ):
            raise ValueError(
                "GemmaConfig: model_type='gemma2' uses rope_theta in every layer; got "
                f"rope_local_base_freq={self.rope_local_base_freq!r}, "
                f"rope_local_scaling={self.rope_local_scaling!r}"
            )

    def rope_for(self, layer_type: str) -> Rope:
        """Gemma 3's sliding layers use ``rope_local_base_freq``; other layers ``rope_theta``."""
        if self.model_type == "gemma3_text" and layer_type == SLIDING:
            return Rope(
                float(self.rope_local_base_freq), int(self.head_dim), self.rope_local_scaling
            )  # type: ignore[arg-type]
        return super().rope_for(layer_type)

    def flags(self) -> dict[str, Any]:
        """Gemma's architecture (see the module docstring)."""
        gemma2 = self.model_type == "gemma2"
        return dict(
            norm_offset=1.0,
            embed_scale=math.sqrt(self.hidden_size),
            activation=ACTIVATIONS[self.hidden_activation],
            sandwich_norms=True,
            qk_norm=not gemma2,
            query_scale=float(self.query_pre_attn_scalar) ** -0.5,  # type: ignore[arg-type]
            attn_softcap=self.attn_logit_softcapping if gemma2 else None,
            final_softcap=self.final_logit_softcapping,
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> GemmaConfig:
        """A tiny configuration for tests: 2 layers (sliding, global) of width 32, 4 query and
        2 K/V heads of size 16, window 4; soft caps (Gemma 2's attention cap too).

        Args:
            **overrides: any field to change.

        Returns:
            The configuration.
        """
        fields: dict[str, Any] = dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            query_pre_attn_scalar=24,
            sliding_window=4,
            final_logit_softcapping=30.0,
        )
        if overrides.get("model_type") == "gemma2":
            fields["attn_logit_softcapping"] = 50.0
        else:
            fields["rope_local_base_freq"] = 100.0
        fields.update(overrides)
        if "layer_types" not in overrides:  # alternating, as Gemma 2's default
            n = fields["num_hidden_layers"]
            fields["layer_types"] = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n))
        return cls(**fields)

    @classmethod
    def from_hf(cls, hf_config: Any, **runtime: Any) -> GemmaConfig:
        """Converts a transformers ``Gemma2Config`` or ``Gemma3TextConfig`` (4.57 or 5.x).

        Args:
            hf_config: the transformers config.
            **runtime: runtime fields (``dtype``, ``param_dtype``, ``scan_layers``, ``remat``,
                ``remat_policy``, ``attention_impl``).

        Returns:
            The equivalent :class:`GemmaConfig`.

        Raises:
            ValueError: another model type (a multimodal ``gemma3`` config: pass its
                ``text_config``), an activation or RoPE type we do not have, bidirectional
                attention, or an unknown runtime option.

        Example:
            >>> import transformers
            >>> hf = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
            ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
            >>> GemmaConfig.from_hf(hf).layer_types
            ('sliding_attention', 'full_attention')
        """
        check_runtime("GemmaConfig", runtime)
        model_type = getattr(hf_config, "model_type", None)
        if model_type == "gemma3":
            raise ValueError(
                "model_type='gemma3' is the multimodal Gemma 3 (Gemma3ForConditionalGeneration); "
                "only its text model (model_type='gemma3_text', Gemma3ForCausalLM) is supported"
            )
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; expected one of {MODEL_TYPES}"
            )
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ValueError(
                "use_bidirectional_attention=True is not supported (a causal LM attends left)"
            )
        act = hf_activation(hf_config, "hidden_activation", "hidden_act")
        window = getattr(hf_config, "sliding_window", None)
        sliding_window, layer_types = hf_layer_types(hf_config, window)
        nested = any(
            isinstance(v, dict)
            for v in (getattr(hf_config, "rope_parameters", None) or {}).values()
        )
        full = hf_rope_parameters(hf_config, FULL if nested else None)
        hf_partial_rotary(hf_config, full, allowed=False)
        local_scaling, local_theta = None, 10000.0
        if model_type == "gemma3_text":
            if nested:
                local = hf_rope_parameters(hf_config, SLIDING)
                hf_partial_rotary(hf_config, local, allowed=False)
                local_theta = float(local.get("rope_theta") or local_theta)
                local_scaling = RopeScaling.from_dict(local, cls.ROPE_TYPES)
            else:  # transformers 4.x
                local_theta = float(getattr(hf_config, "rope_local_base_freq", local_theta))
        return cls(
            **hf_common(hf_config),
            rope_theta=float(full.get("rope_theta") or 1e4),
            rope_scaling=RopeScaling.from_dict(full, cls.ROPE_TYPES),
            sliding_window=sliding_window,
            layer_types=layer_types,
            hidden_activation=act,
            query_pre_attn_scalar=float(hf_config.query_pre_attn_scalar),
            attn_logit_softcapping=getattr(hf_config, "attn_logit_softcapping", None),
            final_logit_softcapping=getattr(hf_config, "final_logit_softcapping", None),
            rope_local_base_freq=local_theta,
            rope_local_scaling=local_scaling,
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            **runtime,
        )

    def to_hf(self) -> Any:
        """Returns the equivalent transformers config (``Gemma2Config`` / ``Gemma3TextConfig``).

        Example:
            >>> GemmaConfig.tiny().to_hf().model_type
            'gemma3_text'
        """
        import transformers

        kwargs = hf_common_kwargs(self)
        kwargs.update(
            hidden_activation=self.hidden_activation,
            query_pre_attn_scalar=_number(self.query_pre_attn_scalar),
            attn_logit_softcapping=self.attn_logit_softcapping,
            final_logit_softcapping=self.final_logit_softcapping,
            attention_bias=self.attention_bias,
            sliding_window=self.sliding_window,
            layer_types=hf_layer_type_list(self),
        )
        if self.model_type == "gemma2":
            cls = transformers.Gemma2Config
            kwargs.update(rope_theta=self.rope_theta)
            if self.rope_scaling is not None:
                kwargs["rope_scaling"] = self.rope_scaling.to_dict()
        else:
            cls = transformers.Gemma3TextConfig
            if self.rope_local_scaling is None:  # the form transformers 4.x and 5.x both read
                kwargs.update(
                    rope_theta=self.rope_theta, rope_local_base_freq=self.rope_local_base_freq
                )
                if self.rope_scaling is not None:
                    kwargs["rope_scaling"] = self.rope_scaling.to_dict()
            else:  # transformers 5.x only
                kwargs["rope_parameters"] = {
                    FULL: _rope_dict(self.rope_theta, self.rope_scaling),
                    SLIDING: _rope_dict(self.rope_local_base_freq, self.rope_local_scaling),
                }
        hf = cls(**kwargs)
        hf.architectures = [
            "Gemma2ForCausalLM" if self.model_type == "gemma2" else "Gemma3ForCausalLM"
        ]
        return hf


def _number(x: Any) -> Any:
    return int(x) if float(x).is_integer() else float(x)  # transformers types it as an int


def _rope_dict(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        out.update(scaling.to_dict())
    return out


__all__ = ["MODEL_TYPES", "GemmaConfig"]
