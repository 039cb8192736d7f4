"""The Qwen3 family (dense): `Qwen3Config`, run by the shared decoder.

What differs from Llama: an RMSNorm over each query and key head before RoPE (``q_norm``,
``k_norm``), ``head_dim`` independent of the width, an optional bias on q/k/v/o
(``attention_bias``), optional sliding-window layers (``use_sliding_window``: the layers from
``max_window_layers`` on, or as ``layer_types`` says).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rslora_jax.models.architecture import (
    ACTIVATIONS,
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
from rslora_jax.models.rope import RopeScaling

MODEL_TYPES = ("qwen3",)


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
    """Qwen3 (dense) architecture and runtime options (hashable, immutable).

    Fields beyond :class:`~rslora_jax.models.architecture.DecoderConfig`: ``hidden_act`` and
    ``attention_bias`` (on q/k/v/o).

    Example:
        >>> cfg = Qwen3Config.tiny()
        >>> cfg.arch.qk_norm, cfg.head_dim
        (True, 16)
    """

    MODEL_TYPES = MODEL_TYPES

    model_type: str = "qwen3"
    hidden_act: str = "silu"
    attention_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"Qwen3Config.hidden_act={self.hidden_act!r} is not supported; expected one of "
                f"{sorted(ACTIVATIONS)}"
            )

    def flags(self) -> dict[str, Any]:
        """Qwen3's architecture: q/k norms, biases as ``attention_bias`` says."""
        return dict(
            activation=ACTIVATIONS[self.hidden_act],
            qk_norm=True,
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> Qwen3Config:
        """A tiny configuration for tests: 2 layers of width 32, 4 query and 2 K/V heads of
        size 16.

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
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf(cls, hf_config: Any, **runtime: Any) -> Qwen3Config:
        """Converts a transformers ``Qwen3Config`` (4.57 or 5.x).

        Args:
            hf_config: the transformers config.
            **runtime: runtime fields (``dtype``, ``param_dtype``, ``scan_layers``, ``remat``,
                ``remat_policy``, ``attention_impl``).

        Returns:
            The equivalent :class:`Qwen3Config`.

        Raises:
            ValueError: another model type, an activation or RoPE type we do not have, or an
                unknown runtime option.

        Example:
            >>> import transformers
            >>> hf = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
            ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
            >>> Qwen3Config.from_hf(hf).head_dim
            16
        """
        check_runtime("Qwen3Config", runtime)
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; expected one of {MODEL_TYPES}"
            )
        act = hf_activation(hf_config, "hidden_act")
        rope = hf_rope_parameters(hf_config)
        hf_partial_rotary(hf_config, rope, allowed=False)
        window = getattr(hf_config, "sliding_window", None)
        if not getattr(hf_config, "use_sliding_window", False):
            window = None
        sliding_window, layer_types = hf_layer_types(hf_config, window)
        return cls(
            **hf_common(hf_config),
            rope_theta=float(rope.get("rope_theta") or 1e4),
            rope_scaling=RopeScaling.from_dict(rope, cls.ROPE_TYPES),
            sliding_window=sliding_window,
            layer_types=layer_types,
            hidden_act=act,
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            **runtime,
        )

    def to_hf(self) -> Any:
        """Returns the equivalent ``transformers.Qwen3Config``.

        Example:
            >>> Qwen3Config.tiny(sliding_window=8).to_hf().use_sliding_window
            True
        """
        import transformers

        kwargs = hf_common_kwargs(self)
        kwargs.update(
            hidden_act=self.hidden_act,
            attention_bias=self.attention_bias,
            rope_theta=self.rope_theta,
            use_sliding_window=self.sliding_window is not None,
            sliding_window=self.sliding_window,
            max_window_layers=0,
            layer_types=hf_layer_type_list(self),
        )
        if self.rope_scaling is not None:
            kwargs["rope_scaling"] = self.rope_scaling.to_dict()
        hf = transformers.Qwen3Config(**kwargs)
        hf.architectures = ["Qwen3ForCausalLM"]
        return hf


__all__ = ["MODEL_TYPES", "Qwen3Config"]
