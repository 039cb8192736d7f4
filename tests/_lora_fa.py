"""LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): A frozen at its first value, only B trained."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from rslora_jax.core import Leaf, LoraConfig, Method, Site, path_key, register_method
from rslora_jax.core.protocol import check_leaf_names

A = "lora_fa_a"  # its own name: "lora_a" is LoRA's, a trained leaf
B = "lora_b"  # the same role as LoRA's B: the same name may be shared


@register_method
@dataclasses.dataclass(frozen=True)
class LoRAFA(Method):
    """``delta W = gamma * A @ B`` with A frozen: the optimizer trains B alone.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from rslora_jax import LoraConfig, init
      >>> p = init({"d": {"kernel": jnp.ones((4, 3))}}, LoraConfig(rank=2, method=LoRAFA()),
      ...          jax.random.key(0))
      >>> jax.tree.map(jnp.shape, p["d"])
      {'kernel': (4, 3), 'lora_b': (2, 3), 'lora_fa_a': (4, 2)}
    """

    name: ClassVar[str] = "lora_fa"
    title: ClassVar[str] = "LoRA-FA"
    leaves: ClassVar[Mapping[str, Leaf]] = {
        A: Leaf("a", trainable=False, peft="lora_A.weight"),
        B: Leaf("b", fast=True, peft="lora_B.weight"),
    }
    peft_fields: ClassVar[Mapping[str, Any] | None] = {}  # a plain LoRA adapter in PEFT

    def init_adapters(
        self, params: Any, sites: list[Site], config: LoraConfig, key: jax.Array
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in sites:
            lay = s.layout
            a = config.init.draw_a(
                path_key(key, s.path), lay.a_shape(s.rank), lay.d_in, config.dtype
            )
            node = out
            for k in s.keys:
                node = node.setdefault(k, {})
            node[A] = a
            node[B] = jnp.zeros(lay.b_shape(s.rank), config.dtype)
        return out

    def adopt(
        self, site: Site, a: jax.Array, b: jax.Array, kernel: jax.Array, config: LoraConfig
    ) -> dict[str, jax.Array]:
        return {A: a.astype(config.dtype), B: b.astype(config.dtype)}

    def check_leaves(
        self, leaves: Mapping[str, Any], site: Site, config: LoraConfig, shared: Any
    ) -> None:
        check_leaf_names(self, leaves, site.path)
        want = {A: site.layout.a_shape(site.rank), B: site.layout.b_shape(site.rank)}
        for name, shape in want.items():
            if tuple(leaves[name].shape) != shape:
                raise ValueError(
                    f"LoRA-FA leaf {name!r} at {site.path!r} has shape "
                    f"{tuple(leaves[name].shape)}, expected {shape} (kernel {site.layout.shape}, "
                    f"rank {site.rank})"
                )

    def pair(
        self, leaves: Mapping[str, Any], path: str, config: LoraConfig, shared: Any
    ) -> tuple[jax.Array, jax.Array, float]:
        return leaves[A], leaves[B], config.scale_for(path)
