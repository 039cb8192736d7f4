"""Rotary position embeddings as transformers computes them, for every family.

`RopeScaling` holds a transformers ``rope_scaling`` / ``rope_parameters`` dict (linear, Llama-3,
Phi-3's LongRoPE); `Rope` is one rotary embedding (base, scaling, rotated dimensions);
`inv_freq` computes its inverse frequencies in float32 exactly as transformers does,
`cos_sin` the cos/sin tables for given positions and `apply_rope` rotates queries or keys with
Hugging Face's ``rotate_half`` convention (only the first ``rotary_dim`` features when the
rotation is partial, as in Phi-3/Phi-4's ``partial_rotary_factor``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from rslora_jax._types import Array

#: The scaled rope types this module computes (``"default"`` is no scaling).
ROPE_TYPES = ("linear", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in a transformers ``rope_scaling`` dict.

    Attributes:
        rope_type: ``"llama3"``, ``"linear"`` or ``"longrope"``.
        factor: frequency division factor (LongRoPE: the context extension factor, from which
            the default ``attention_factor`` is computed).
        low_freq_factor: Llama-3 only.
        high_freq_factor: Llama-3 only.
        original_max_position_embeddings: Llama-3 and LongRoPE: the pre-training context length.
        short_factor: LongRoPE only: per-frequency divisors while positions stay within
            ``original_max_position_embeddings``.
        long_factor: LongRoPE only: the divisors beyond it.
        attention_factor: LongRoPE only: cos and sin are multiplied by it (default
            ``sqrt(1 + log(factor) / log(original_max_position_embeddings))``, 1 if factor <= 1).

    Example:
        >>> RopeScaling.from_dict({"rope_type": "linear", "factor": 2.0}).factor
        2.0
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                f"expected one of {ROPE_TYPES}"
            )
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor={self.factor!r} must be > 0")
        required = {
            "linear": (),
            "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
        }[self.rope_type]
        for name in required:
            if getattr(self, name) is None:
                raise ValueError(
                    f"rope_scaling.{name} is required for rope_type={self.rope_type!r}"
                )
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:  # type: ignore[operator]
            raise ValueError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor!r} must exceed "
                f"low_freq_factor={self.low_freq_factor!r}"
            )
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        allowed: Sequence[str] = ("linear", "llama3"),
        max_position_embeddings: int | None = None,
    ) -> RopeScaling | None:
        """Builds from a transformers ``rope_scaling``/``rope_parameters`` dict.

        Args:
            d: dict with ``rope_type`` (or the legacy ``type``) and the scaling fields. Other keys
                (``rope_theta``) are ignored.
            allowed: the scaled rope types the caller's family supports.
            max_position_embeddings: the model's context length (LongRoPE's default ``factor``
                is its ratio to ``original_max_position_embeddings``).

        Returns:
            A :class:`RopeScaling`, or None for ``rope_type == "default"``.

        Raises:
            ValueError: for rope types not in `allowed` (naming the type and what is supported).

        Example:
            >>> RopeScaling.from_dict({"rope_type": "default"}) is None
            True
        """
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type in ("su", "yarn") and "longrope" in allowed:  # Phi-3's legacy names
            rope_type = "longrope"
        if rope_type in (None, "default"):
            return None
        if rope_type not in allowed:
            expected = ", ".join(repr(t) for t in ("default", *allowed))
            raise ValueError(
                f"rope_scaling rope_type={rope_type!r} is not supported; expected {expected}"
            )
        omp = d.get("original_max_position_embeddings")
        if rope_type == "linear":
            return cls("linear", float(d["factor"]))
        if rope_type == "llama3":
            return cls(
                "llama3",
                float(d["factor"]),
                float(d["low_freq_factor"]),
                float(d["high_freq_factor"]),
                None if omp is None else int(omp),
            )
        if omp is None:
            raise ValueError("rope_scaling: longrope needs original_max_position_embeddings")
        factor = d.get("factor")
        if factor is None:
            if max_position_embeddings is None:
                raise ValueError("rope_scaling: longrope needs factor or max_position_embeddings")
            factor = max_position_embeddings / int(omp)
        attention_factor = d.get("attention_factor")
        return cls(
            "longrope",
            float(factor),
            original_max_position_embeddings=int(omp),
            short_factor=tuple(d["short_factor"]),
            long_factor=tuple(d["long_factor"]),
            attention_factor=None if attention_factor is None else float(attention_factor),
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
        if self.rope_type == "longrope":
            out.update(
                short_factor=list(self.short_factor or ()),
                long_factor=list(self.long_factor or ()),
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
            if self.attention_factor is not None:
                out["attention_factor"] = self.attention_factor
        return out

    @property
    def cos_sin_factor(self) -> float:
        """What cos and sin are multiplied by (LongRoPE's attention factor; else 1)."""
        if self.rope_type != "longrope":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.factor <= 1.0:
            return 1.0
        omp = self.original_max_position_embeddings
        return math.sqrt(1 + math.log(self.factor) / math.log(omp))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Rope:
    """One rotary embedding: base ``theta``, optional scaling, the rotated features.

    Attributes:
        theta: the base (transformers' ``rope_theta``).
        rotary_dim: how many leading features of each head rotate (even; ``head_dim`` unless
            ``partial_rotary_factor`` < 1).
        scaling: a :class:`RopeScaling`, or None.

    Example:
        >>> Rope(10000.0, 8).inv_freq().shape
        (4,)
    """

    theta: float
    rotary_dim: int
    scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if not self.theta > 0:
            raise ValueError(f"rope_theta={self.theta!r} must be > 0")
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary dimension {self.rotary_dim!r} must be a positive even int")
        s = self.scaling
        if s is not None and s.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(s, name)) != self.rotary_dim // 2:
                    raise ValueError(
                        f"rope_scaling.{name} has {len(getattr(s, name))} entries; expected "
                        f"rotary_dim / 2 = {self.rotary_dim // 2}"
                    )

    def inv_freq(self, long: bool = False) -> np.ndarray:
        """Inverse frequencies (rotary_dim // 2,), float32, computed as transformers does.

        Args:
            long: LongRoPE only: the frequencies beyond the pre-training context.
        """
        dim = self.rotary_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        base = (np.float32(self.theta) ** exponent).astype(np.float32)
        inv_freq = (np.float32(1.0) / base).astype(np.float32)
        rs = self.scaling
        if rs is None:
            return inv_freq
        if rs.rope_type == "linear":
            return (inv_freq / np.float32(rs.factor)).astype(np.float32)
        if rs.rope_type == "longrope":
            ext = np.asarray(rs.long_factor if long else rs.short_factor, np.float32)
            return (np.float32(1.0) / (ext * base)).astype(np.float32)
        factor = np.float32(rs.factor)
        low, high = rs.low_freq_factor, rs.high_freq_factor
        old_ctx = rs.original_max_position_embeddings
        low_freq_wavelen = old_ctx / low  # type: ignore[operator]
        high_freq_wavelen = old_ctx / high  # type: ignore[operator]
        wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
        llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)  # type: ignore[operator]
        smoothed = ((1 - smooth) * llama / factor + smooth * llama).astype(np.float32)
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(medium, smoothed, llama).astype(np.float32)


def is_dynamic(rope: Rope) -> bool:
    """Whether the frequencies depend on the sequence's length (LongRoPE), so that keys
    rotated for a short sequence differ from the same keys in a longer one."""
    return rope.scaling is not None and rope.scaling.rope_type == "longrope"


def cos_sin(rope: Rope, positions: Array, lengths: Array | None = None) -> tuple[Array, Array]:
    """cos and sin tables (B, S, 1, rotary_dim), float32, for (B, S) integer positions.

    LongRoPE picks its long frequencies when the sequence reaches beyond the pre-training
    context: by default when the largest position of the call does (as transformers does, per
    call), or per row when `lengths` (B,) gives each row's sequence length (decoding with a
    cache: a row's result then equals running it alone).
    """
    inv = jnp.asarray(rope.inv_freq())
    rs = rope.scaling
    if is_dynamic(rope):
        if lengths is None:
            long = jnp.max(positions) + 1 > rs.original_max_position_embeddings
        else:
            long = (lengths > rs.original_max_position_embeddings)[:, None, None]  # (B, 1, 1)
        inv = jnp.where(long, jnp.asarray(rope.inv_freq(long=True)), inv)
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    factor = 1.0 if rs is None else rs.cos_sin_factor
    if factor != 1.0:
        cos, sin = cos * jnp.float32(factor), sin * jnp.float32(factor)
    return cos, sin


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, S, N, hd) rotated with HF's rotate_half convention, computed in float32.

    Only the first ``cos.shape[-1]`` features rotate (partial rotary embeddings); the others
    pass through.
    """
    dim = cos.shape[-1]
    x32 = x.astype(jnp.float32)
    rot, rest = (x32, None) if dim == x.shape[-1] else (x32[..., :dim], x32[..., dim:])
    half = dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos + rotated * sin
    if rest is not None:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(x.dtype)


__all__ = ["ROPE_TYPES", "Rope", "RopeScaling", "apply_rope", "cos_sin", "is_dynamic"]
