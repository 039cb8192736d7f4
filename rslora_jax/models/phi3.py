"""The Phi-3 family (Phi-3 / Phi-3.5 mini, Phi-4 mini): `Phi3Config`, run by the shared decoder.

Phi-3 is Llama's architecture with other checkpoint names: its checkpoints store the attention
projections fused as ``qkv_proj`` (rows q, then k, then v) and the MLP's as ``gate_up_proj``
(rows gate, then up). Our tree holds them split (``q_proj``/``k_proj``/``v_proj``,
``gate_proj``/``up_proj``), like every other family, so that adapters, grouped projections and
sharding rules are the same; `rslora_jax.hf` splits them on load and joins them on export
(the family's ``fused`` modules, `rslora_jax.models.families`). Also: LongRoPE
(``rope_scaling.rope_type="longrope"``), ``partial_rotary_factor`` (Phi-4 mini), and a
``sliding_window`` on every layer.
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
    hf_partial_rotary,
    hf_rope_parameters,
)
from rslora_jax.models.rope import Rope, RopeScaling

MODEL_TYPES = ("phi3",)


@dataclasses.dataclass(frozen=True)
class Phi3Config(DecoderConfig):
    """Phi-3 architecture and runtime options (hashable, immutable).

    Fields beyond :class:`~rslora_jax.models.architecture.DecoderConfig`: ``hidden_act``,
    ``partial_rotary_factor`` (the fraction of each head that rotates). ``rope_scaling`` may be
    LongRoPE only (its ``original_max_position_embeddings`` is the pre-training context).

    Example:
        >>> cfg = Phi3Config.tiny(partial_rotary_factor=0.5)
        >>> cfg.arch.ropes[0].rotary_dim
        4
    """

    MODEL_TYPES = MODEL_TYPES
    ROPE_TYPES = ("longrope",)

    model_type: str = "phi3"
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"Phi3Config.hidden_act={self.hidden_act!r} is not supported; expected one of "
                f"{sorted(ACTIVATIONS)}"
            )
        rotary = int(self.head_dim * self.partial_rotary_factor)  # type: ignore[operator]
        if not 0 < self.partial_rotary_factor <= 1 or rotary <= 0 or rotary % 2:
            raise ValueError(
                f"Phi3Config.partial_rotary_factor={self.partial_rotary_factor!r} must be in "
                f"(0, 1] and rotate an even number of features (head_dim={self.head_dim})"
            )
        if self.layer_types is not None:
            raise ValueError("Phi3Config.layer_types: Phi-3 uses sliding_window in every layer")
        self.rope_for("full_attention")  # LongRoPE's factors fit the rotated features

    def rope_for(self, layer_type: str) -> Rope:
        """The one rotary embedding, over ``int(head_dim * partial_rotary_factor)`` features."""
        del layer_type
        rotary = int(self.head_dim * self.partial_rotary_factor)  # type: ignore[operator]
        return Rope(float(self.rope_theta), rotary, self.rope_scaling)  # type: ignore[arg-type]

    def flags(self) -> dict[str, Any]:
        """Phi-3's architecture: Llama's, without biases."""
        return dict(activation=ACTIVATIONS[self.hidden_act])

    @classmethod
    def tiny(cls, **overrides: Any) -> Phi3Config:
        """A tiny configuration for tests: 2 layers of width 32, 4 query and 2 K/V heads.

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
            max_position_embeddings=128,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf(cls, hf_config: Any, **runtime: Any) -> Phi3Config:
        """Converts a transformers ``Phi3Config`` (4.57 or 5.x).

        Args:
            hf_config: the transformers config.
            **runtime: runtime fields (``dtype``, ``param_dtype``, ``scan_layers``, ``remat``,
                ``remat_policy``, ``attention_impl``).

        Returns:
            The equivalent :class:`Phi3Config`.

        Raises:
            ValueError: another model type, an activation or RoPE type we do not have, or an
                unknown runtime option.

        Example:
            >>> import transformers
            >>> hf = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
            ...     num_hidden_layers=2, num_attention_heads=4, pad_token_id=None)
            >>> Phi3Config.from_hf(hf).num_key_value_heads
            4
        """
        check_runtime("Phi3Config", runtime)
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; expected one of {MODEL_TYPES}"
            )
        act = hf_activation(hf_config, "hidden_act")
        rope = dict(hf_rope_parameters(hf_config))
        partial = hf_partial_rotary(hf_config, rope, allowed=True)
        omp = rope.get("original_max_position_embeddings") or getattr(
            hf_config, "original_max_position_embeddings", None
        )
        if omp is not None:
            rope.setdefault("original_max_position_embeddings", int(omp))
        window = getattr(hf_config, "sliding_window", None)
        max_pos = int(hf_config.max_position_embeddings)
        return cls(
            **hf_common(hf_config),
            rope_theta=float(rope.get("rope_theta") or 1e4),
            rope_scaling=RopeScaling.from_dict(rope, cls.ROPE_TYPES, max_pos),
            sliding_window=None if window is None else int(window),
            hidden_act=act,
            partial_rotary_factor=partial,
            **runtime,
        )

    def to_hf(self) -> Any:
        """Returns the equivalent ``transformers.Phi3Config`` (no token ids: our config does not
        know them; save with the checkpoint's transformers config to keep them).

        Example:
            >>> Phi3Config.tiny(sliding_window=8).to_hf().sliding_window
            8
        """
        import transformers

        kwargs = hf_common_kwargs(self)
        del kwargs["head_dim"]  # transformers' Phi3Config derives it
        kwargs.update(
            hidden_act=self.hidden_act,
            rope_theta=self.rope_theta,
            partial_rotary_factor=self.partial_rotary_factor,
            sliding_window=self.sliding_window,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        )
        rs = self.rope_scaling
        if rs is not None:
            omp = rs.original_max_position_embeddings
            kwargs["original_max_position_embeddings"] = omp
            derived = rs.factor == self.max_position_embeddings / omp  # type: ignore[operator]
            if derived and rs.attention_factor is None:  # the form transformers 4.x and 5.x read
                kwargs["rope_scaling"] = {
                    "type": "longrope",
                    "short_factor": list(rs.short_factor or ()),
                    "long_factor": list(rs.long_factor or ()),
                }
            else:  # transformers 5.x only
                kwargs["rope_scaling"] = rs.to_dict()
        hf = transformers.Phi3Config(**kwargs)
        hf.architectures = ["Phi3ForCausalLM"]
        return hf


__all__ = ["MODEL_TYPES", "Phi3Config"]
