"""DoRA: weight-decomposed LoRA (Liu et al. 2024; PEFT's ``use_dora=True``).

Each adapted kernel also gets a trainable magnitude ``lora_magnitude`` with one entry per output
feature (PEFT's ``lora_magnitude_vector``), initialised to the column norms ``||W + gamma*A@B||``
(the norm over the input axes for each output feature), and the layer computes::

    y = x @ W' + bias,   W' = m * (W + gamma*A@B) / ||W + gamma*A@B||

where the norm is treated as a constant in the backward pass (PEFT detaches it, as the DoRA
paper's section 4.3 suggests). In the protocol's terms: the factor pair is LoRA's and the column
rescale is ``m / ||W + gamma*A@B||`` (`DoRA.column_scale`). The factored forward adds
``(m/n - 1) * (x @ W) + (m/n) * gamma * (x @ A) @ B`` to the layer's output, as PEFT does (with
adapter dropout, ``x @ W`` is recomputed on the dropped-out input, also as PEFT does); the fused
forward scales the columns of ``x @ (W + gamma*A@B)``. Unmerging needs the column scales of the
merge (the merged kernel keeps only each column's direction): ``rslora_jax.merge(...,
return_column_scales=True)`` returns them, as PEFT keeps the weight norm in a cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core.protocol import Leaf, Method, Site, register_method
from rslora_jax.core.tree import get, merge_disjoint, set_in, weight_at
from rslora_jax.methods.lora import A, B, LoRA

if TYPE_CHECKING:  # pragma: no cover
    from rslora_jax.core.config import LoraConfig

MAGNITUDE = "lora_magnitude"
_HIGHEST = jax.lax.Precision.HIGHEST


def column_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``||W + scale * A @ B||`` over the input axis, without forming ``A @ B``.

    Uses ``||w_j + s A b_j||^2 = ||w_j||^2 + 2 s (A^T w_j) . b_j + s^2 b_j^T (A^T A) b_j``, which
    needs (r, d_out) and (r, r) temporaries instead of a (d_in, d_out) one. float32 throughout.

    Args:
      w: (..., d_in, d_out).
      a: (..., d_in, r).
      b: (..., r, d_out).
      scale: gamma.

    Returns:
      (..., d_out) float32 norms.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[3.0, 0.0], [0.0, 1.0]])
      >>> column_norm(w, jnp.array([[0.0], [1.0]]), jnp.array([[4.0, 0.0]]), 1.0).tolist()
      [5.0, 1.0]
    """
    f32 = jnp.float32
    w, a, b = w.astype(f32), a.astype(f32), b.astype(f32)
    s = jnp.float32(scale)
    aw = jnp.matmul(jnp.swapaxes(a, -1, -2), w, precision=_HIGHEST)  # (..., r, d_out)
    gram = jnp.matmul(jnp.swapaxes(a, -1, -2), a, precision=_HIGHEST)  # (..., r, r)
    gb = jnp.matmul(gram, b, precision=_HIGHEST)
    sq = jnp.sum(w * w, axis=-2) + 2 * s * jnp.sum(aw * b, axis=-2) + s * s * jnp.sum(b * gb, -2)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def dora_matrix(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, m: jax.Array):
    """``m * (W + s A@B) / ||W + s A@B||`` (norm over axis -2, detached), float32.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[3.0, 0.0], [4.0, 2.0]])
      >>> a, b = jnp.zeros((2, 1)), jnp.zeros((1, 2))
      >>> dora_matrix(w, a, b, 1.0, jnp.array([10.0, 1.0])).tolist()
      [[6.0, 0.0], [8.0, 1.0]]
    """
    f32 = jnp.float32
    v = w.astype(f32) + jnp.float32(scale) * jnp.matmul(
        a.astype(f32), b.astype(f32), precision=_HIGHEST
    )
    n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=-2)))
    return v * (m.astype(f32) / n)[..., None, :]


def _concrete_kernel(params: PyTree, site: Site) -> jax.Array:
    kernel = weight_at(params, site.path)
    if isinstance(kernel, jax.ShapeDtypeStruct):
        raise ValueError(
            f"DoRA (LoraConfig.use_dora=True) reads the kernel at {site.path!r} to initialise "
            "its magnitude, but the kernel is abstract (jax.ShapeDtypeStruct); pass arrays"
        )
    return kernel


@register_method
@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA: LoRA's factors plus a magnitude per output feature (see the module docstring).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from rslora_jax import LoraConfig, init
      >>> p = init({"d": {"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]])}},
      ...          LoraConfig(rank=1, method=DoRA()), jax.random.key(0))
      >>> p["d"]["lora_magnitude"].tolist()  # the column norms of W (B = 0)
      [5.0, 2.0]
    """

    name: ClassVar[str] = "dora"
    title: ClassVar[str] = "DoRA"
    default: ClassVar[bool] = False
    leaves: ClassVar[Mapping[str, Leaf]] = {
        **LoRA.leaves,
        MAGNITUDE: Leaf("out", fast=True, peft="lora_magnitude_vector"),
    }
    rescales_columns: ClassVar[bool] = True
    peft_fields: ClassVar[Mapping[str, Any] | None] = {"use_dora": True}
    legacy_fields: ClassVar[tuple[str, ...]] = ("use_dora",)

    @classmethod
    def from_legacy(cls, values: Mapping[str, Any]) -> tuple[Method, str] | None:
        flag = values.get("use_dora", False)
        if not isinstance(flag, bool):
            raise ValueError(f"LoraConfig.use_dora must be a bool, got {flag!r}")
        return (cls(), "use_dora") if flag else None

    @classmethod
    def legacy_value(cls, method: Method, field: str) -> Any:
        return isinstance(method, DoRA)

    def init_adapters(
        self, params: PyTree, sites: list[Site], config: LoraConfig, key: PRNGKey
    ) -> PyTree:
        kernels = {s.path: _concrete_kernel(params, s) for s in sites}
        factors = super().init_adapters(params, sites, config, key)
        pairs = {s.path: (get(factors, s.keys)[A], get(factors, s.keys)[B]) for s in sites}

        def run(kernels, pairs):
            out: dict[str, Any] = {}
            for s in sites:
                a, b = pairs[s.path]
                m = column_norm(s.layout.from_kernel(kernels[s.path]), a, b, s.scale)
                set_in(out, (*s.keys, MAGNITUDE), m.astype(config.dtype))
            return out

        return merge_disjoint(factors, jax.jit(run)(kernels, pairs))

    def adopt(
        self, site: Site, a: jax.Array, b: jax.Array, kernel: jax.Array, config: LoraConfig
    ) -> dict[str, jax.Array]:
        out = super().adopt(site, a, b, kernel, config)
        m = column_norm(kernel, out[A], out[B], site.scale)
        return {**out, MAGNITUDE: m.astype(config.dtype)}

    def check_leaves(
        self, leaves: Mapping[str, Any], site: Site, config: LoraConfig, shared: Any
    ) -> None:
        super().check_leaves(leaves, site, config, shared)
        want = site.layout.out_vector_shape()
        if tuple(leaves[MAGNITUDE].shape) != want:
            raise ValueError(
                f"DoRA magnitude at {site.path!r} has shape {tuple(leaves[MAGNITUDE].shape)}, "
                f"expected {want} (one entry per output feature)"
            )

    def column_scale(
        self,
        leaves: Mapping[str, Any],
        path: str,
        config: LoraConfig,
        w: jax.Array,
        a: jax.Array,
        b: jax.Array,
        scale: float,
    ) -> jax.Array:
        n = jax.lax.stop_gradient(column_norm(w, a, b, scale))
        return leaves[MAGNITUDE].astype(jnp.float32) / n


__all__ = ["MAGNITUDE", "DoRA", "column_norm", "dora_matrix"]
