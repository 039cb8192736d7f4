"""Merge adapters into the kernels (for serving) and take them out again.

``W' = W + gamma_r * A @ B`` is computed in float32 and cast to the kernel's dtype once, so a
bf16 base keeps small adapter updates that a bf16 accumulation would round away.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax._types import PyTree
from rslora_jax.adapters import KERNEL, combine, is_adapter_key, join_path, layout_for, split
from rslora_jax.config import LoraConfig

_HIGHEST = jax.lax.Precision.HIGHEST


def delta(holder: Mapping[str, Any], path: str, config: LoraConfig) -> jax.Array:
    """gamma * A @ B for the kernel in `holder`, in float32 and in the kernel's own layout."""
    kernel = holder[KERNEL]
    layout = layout_for(config, path, kernel)
    a = holder["lora_a"].astype(jnp.float32)
    b = holder["lora_b"].astype(jnp.float32)
    _check_factors(path, layout, a, b, config)
    ab = jnp.matmul(a, b, precision=_HIGHEST)
    return layout.to_kernel(ab * jnp.float32(config.scale_for(path)))


def _check_factors(path: str, layout: Any, a: Any, b: Any, config: LoraConfig) -> None:
    r = a.shape[-1]
    if a.shape != layout.a_shape(r) or b.shape != layout.b_shape(r):
        raise ValueError(
            f"adapter factors at {path!r} do not fit its kernel {layout.shape} "
            f"(axes {layout.axes!r}): lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)}; "
            f"expected {layout.a_shape(r)} and {layout.b_shape(r)}"
        )
    if r != config.rank_for(path):
        raise ValueError(
            f"adapter at {path!r} has rank {r}, but the config says rank "
            f"{config.rank_for(path)} there: the scale would be wrong"
        )


def _rebuild(tree: Any, fn: Any, prefix: tuple = ()) -> Any:
    """Copies nested dicts, calling ``fn(path, dict)`` on each dict that holds adapters."""
    if not isinstance(tree, Mapping):
        return tree
    if KERNEL in tree and "lora_a" in tree:
        return fn(join_path(prefix), tree)
    return {k: _rebuild(v, fn, (*prefix, k)) for k, v in tree.items() if not is_adapter_key(k)}


def merge(params: PyTree, config: LoraConfig) -> PyTree:
    """Folds every adapter into its kernel and drops the adapter leaves.

    Returns a plain tree with exactly the original (pre-`init`) structure, shapes and dtypes:
    ``W + gamma * A @ B``, computed in float32 and cast once. Jit-able (``config`` static) and
    donation-friendly; sharded inputs stay sharded (the product ``A @ B`` takes A's input-axis
    and B's output-axis sharding, which is the kernel's).

    Args:
      params: a tree with adapters (as returned by `init`).
      config: the config the adapters were built with.

    Returns:
      The merged parameter tree.

    Raises:
      ValueError: if a factor's shape or rank does not fit its kernel and config.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = LoraConfig(rank=1, alpha=2.0)
      >>> p = {"d": {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1)),
      ...            "lora_b": jnp.ones((1, 2))}}
      >>> merge(p, cfg)["d"]["kernel"].tolist()  # 2/sqrt(1) * ones
      [[2.0, 2.0], [2.0, 2.0]]
    """

    def fold(path: str, holder: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in holder.items() if not is_adapter_key(k)}
        kernel = holder[KERNEL]
        merged = kernel.astype(jnp.float32) + delta(holder, path, config)
        out[KERNEL] = merged.astype(kernel.dtype)
        return out

    return _rebuild(params, fold)


def unmerge(merged: PyTree, adapters: PyTree, config: LoraConfig) -> PyTree:
    """Recovers the base from `merge`'s output: ``W = W' - gamma * A @ B`` (float32, cast once).

    Exact up to float rounding (the round trip is not bit-exact in reduced precision).

    Args:
      merged: the merged tree (no adapter leaves).
      adapters: the adapters (first output of `split`, or a full tree holding them).
      config: the config used to merge.

    Returns:
      The base tree (no adapter leaves).

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = LoraConfig(rank=1, alpha=1.0)
      >>> ad = {"d": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}}
      >>> unmerge({"d": {"kernel": jnp.ones((2, 2))}}, ad, cfg)["d"]["kernel"].tolist()
      [[0.0, 0.0], [0.0, 0.0]]
    """
    adapters, _ = split(adapters)
    full = combine(adapters, merged)

    def unfold(path: str, holder: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in holder.items() if not is_adapter_key(k)}
        kernel = holder[KERNEL]
        base = kernel.astype(jnp.float32) - delta(holder, path, config)
        out[KERNEL] = base.astype(kernel.dtype)
        return out

    return _rebuild(full, unfold)


def merged_kernels(params: PyTree, config: LoraConfig, paths: set[str]) -> PyTree:
    """Like `merge`, but only for `paths`; other adapters stay in the tree."""

    def fold(path: str, holder: Mapping[str, Any]) -> dict[str, Any]:
        if path not in paths:
            return dict(holder)
        out = {k: v for k, v in holder.items() if not is_adapter_key(k)}
        kernel = holder[KERNEL]
        out[KERNEL] = (kernel.astype(jnp.float32) + delta(holder, path, config)).astype(
            kernel.dtype
        )
        return out

    def walk(tree: Any, prefix: tuple = ()) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        if KERNEL in tree and "lora_a" in tree:
            return fold(join_path(prefix), tree)
        return {k: walk(v, (*prefix, k)) for k, v in tree.items()}

    return walk(params)


__all__ = ["delta", "merge", "merged_kernels", "unmerge"]
