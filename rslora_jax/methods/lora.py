"""LoRA and rsLoRA: ``delta W = gamma * A @ B``, the default method.

Each adapted kernel gets ``lora_a`` ``(*l, d_in, r)`` (drawn by the config's initialiser) and
``lora_b`` ``(*l, r, d_out)`` (zeros), so the model's output is unchanged at first. ``gamma`` is
``LoraConfig.scale_for(path)``: ``alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023: activations and
gradients stay stable at any rank) or ``alpha / r`` (classic LoRA). PEFT's format: ``lora_A.weight``
``(r, in) = A.T`` and ``lora_B.weight`` ``(out, r) = B.T``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core.protocol import Leaf, Method, Site, check_leaf_names, register_method
from rslora_jax.core.sites import path_key
from rslora_jax.core.tree import set_in

if TYPE_CHECKING:  # pragma: no cover
    from rslora_jax.core.config import LoraConfig

A = "lora_a"
B = "lora_b"


def check_factors(path: str, site: Site, a: Any, b: Any, rank: int) -> None:
    """Raises if ``(a, b)`` do not fit the site's kernel, or their rank is not `rank`."""
    lay = site.layout
    r = a.shape[-1]
    if a.shape != lay.a_shape(r) or b.shape != lay.b_shape(r):
        raise ValueError(
            f"adapter factors at {path!r} do not fit its kernel {lay.shape} "
            f"(axes {lay.axes!r}): lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)}; "
            f"expected {lay.a_shape(r)} and {lay.b_shape(r)}"
        )
    if r != rank:
        raise ValueError(
            f"adapter at {path!r} has rank {r}, but the config says rank {rank} there: the "
            "scale would be wrong"
        )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def draw_factors(plan: tuple, init: Any, dtype: Any, key: PRNGKey) -> dict[str, Any]:
    """LoRA's first factors for every site of `plan` in one compiled program (cached per plan).

    `plan` is ``((path, keys, a_shape, b_shape, d_in), ...)``; A from `init` with a key derived
    from the path, B zero.
    """
    out: dict[str, Any] = {}
    for path, keys, a_shape, b_shape, d_in in plan:
        set_in(out, (*keys, A), init.draw_a(path_key(key, path), a_shape, d_in, dtype))
        set_in(out, (*keys, B), jnp.zeros(b_shape, dtype))
    return out


@register_method
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """LoRA / rsLoRA (the scale is the config's ``scaling``): the default method.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from rslora_jax import LoraConfig, init
      >>> p = init({"d": {"kernel": jnp.ones((4, 3))}}, LoraConfig(rank=2, method=LoRA()),
      ...          jax.random.key(0))
      >>> jax.tree.map(jnp.shape, p["d"])
      {'kernel': (4, 3), 'lora_a': (4, 2), 'lora_b': (2, 3)}
    """

    name: ClassVar[str] = "lora"
    title: ClassVar[str] = "LoRA"
    default: ClassVar[bool] = True
    leaves: ClassVar[Mapping[str, Leaf]] = {
        A: Leaf("a", peft="lora_A.weight"),
        B: Leaf("b", fast=True, peft="lora_B.weight"),
    }

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def init_adapters(
        self, params: PyTree, sites: list[Site], config: LoraConfig, key: PRNGKey
    ) -> PyTree:
        plan = tuple(
            (s.path, s.keys, s.layout.a_shape(s.rank), s.layout.b_shape(s.rank), s.layout.d_in)
            for s in sites
        )
        return draw_factors(plan, config.init, config.dtype, key)

    def adopt(
        self, site: Site, a: jax.Array, b: jax.Array, kernel: jax.Array, config: LoraConfig
    ) -> dict[str, jax.Array]:
        return {A: a.astype(config.dtype), B: b.astype(config.dtype)}

    def check_leaves(
        self, leaves: Mapping[str, Any], site: Site, config: LoraConfig, shared: Any
    ) -> None:
        check_leaf_names(self, leaves, site.path)
        check_factors(site.path, site, leaves[A], leaves[B], site.rank)

    def pair(
        self, leaves: Mapping[str, Any], path: str, config: LoraConfig, shared: Any
    ) -> tuple[jax.Array, jax.Array, float]:
        return leaves[A], leaves[B], config.scale_for(path)


__all__ = ["LoRA", "check_factors", "draw_factors"]
