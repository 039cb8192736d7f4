"""Merge adapters into the kernels (for serving) and take them out again, for every method.

Written once over the method protocol: a site's merged kernel is
``(W + scale * A @ B) * c`` with ``(A, B, scale)`` from `Method.pair` and the column rescale
``c`` from `Method.column_scale` (DoRA's ``m / ||W + scale*A@B||``, None for LoRA and RaSA),
computed in float32 and cast to the kernel's dtype once, so a bf16 base keeps small adapter
updates that a bf16 accumulation would round away. Unmerging divides by ``c`` and subtracts the
update; a method that rescales columns needs the scales the merge used
(``merge(..., return_column_scales=True)``), since the merged kernel keeps only each column's
direction (PEFT keeps them in a cache for the same reason).

A quantized base (`rslora_jax.quantize`) merges the same way: each kernel is dequantized in
float32, the update added, the sum cast once to the kernel's original dtype; `merge` also
dequantizes the quantized kernels that have no adapter, so its result is always a plain tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax._types import PyTree
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.protocol import Site
from rslora_jax.core.sites import site_for
from rslora_jax.core.tree import (
    KERNEL,
    adapted_holders,
    adapter_leaves,
    combine,
    global_entries,
    is_adapter_key,
    rebuild,
    split,
)
from rslora_jax.execution.quant import dense, dequantize, is_quantized
from rslora_jax.ops.finite import NonFiniteError, nonfinite_paths

_HIGHEST = jax.lax.Precision.HIGHEST


def _site(config: LoraConfig, path: str, holder: Mapping[str, Any]) -> Site:
    return site_for(config, path, tuple(path.split("/")) if path else (), holder[KERNEL])


def site_update(
    holder: Mapping[str, Any], site: Site, config: LoraConfig, shared: Any
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(W, W + scale*A@B, c)`` for one site: the kernel and its update as float32
    ``(*l, d_in, d_out)`` matrices, and the method's column rescale ``(*l, d_out)`` or None.

    Raises:
      ValueError: if the site's leaves do not fit its kernel and the config's method.
    """
    method = config.method
    leaves = adapter_leaves(holder)
    method.check_leaves(leaves, site, config, shared)
    a, b, scale = method.pair(leaves, site.path, config, shared)
    f32 = jnp.float32
    w = site.layout.from_kernel(dense(holder[KERNEL], f32))
    ab = jnp.matmul(a.astype(f32), b.astype(f32), precision=_HIGHEST)
    c = method.column_scale(leaves, site.path, config, w, a, b, scale)
    return w, w + f32(scale) * ab, None if c is None else c.astype(f32)


def updated_kernel(
    holder: Mapping[str, Any], path: str, config: LoraConfig, shared: Any = None
) -> jax.Array:
    """The merged kernel for one adapted dict, any method, in float32 (not cast), in the
    kernel's layout. `shared`: the params' top-level adapter entries (RaSA's pools).

    Raises:
      ValueError: if the adapter's shapes or kind do not fit the kernel and config.
    """
    site = _site(config, path, holder)
    _, v, c = site_update(holder, site, config, shared)
    return site.layout.to_kernel(v if c is None else v * c[..., None, :])


def merge(
    params: PyTree,
    config: LoraConfig,
    *,
    return_column_scales: bool = False,
    safe_merge: bool = False,
) -> Any:
    """Folds every adapter into its kernel and drops the adapter leaves.

    Returns a plain tree with exactly the original (pre-`init`, pre-`quantize`) structure,
    shapes and dtypes (quantized kernels dequantized, with or without an adapter):
    ``W + gamma * A @ B`` (RaSA: ``W_i + A_i diag(d) B_i + A_S diag(d) B_S``; DoRA:
    ``m * (W + gamma*A@B) / ||W + gamma*A@B||``), computed in float32 and cast once. Jit-able
    (``config`` static) and donation-friendly; sharded inputs stay sharded (the product
    ``A @ B`` takes A's input-axis and B's output-axis sharding, which is the kernel's).

    Args:
      params: a tree with adapters (as returned by `init`).
      config: the config the adapters were built with.
      return_column_scales: also return ``{path: c}``, the column rescales of methods that
        have them (DoRA), which `unmerge` needs.
      safe_merge: PEFT's ``merge(safe_merge=True)``: check that the adapters and the merged
        kernels hold only finite values, and raise naming the paths that do not. It reads the
        values, so it needs concrete arrays: call `merge` outside `jax.jit` with it (the merge
        itself is still compiled once per structure), or jit ``merge`` and check its result
        with `rslora_jax.ops.finite.check_finite`.

    Returns:
      The merged parameter tree (and the column scales, if asked).

    Raises:
      ValueError: if a factor's shape or rank does not fit its kernel and config; with
        ``safe_merge``, a `~rslora_jax.ops.finite.NonFiniteError` (a ValueError) naming the
        adapter leaves or merged kernels that hold NaN or Inf, or a ValueError when called
        on traced values.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cfg = LoraConfig(rank=1, alpha=2.0)
      >>> p = {"d": {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1)),
      ...            "lora_b": jnp.ones((1, 2))}}
      >>> merge(p, cfg)["d"]["kernel"].tolist()  # 2/sqrt(1) * ones
      [[2.0, 2.0], [2.0, 2.0]]
      >>> import numpy as np
      >>> p["d"]["lora_b"] = jnp.array([[1.0, np.nan]])
      >>> merge(p, cfg, safe_merge=True)
      Traceback (most recent call last):
      ...
      rslora_jax.ops.finite.NonFiniteError: merge(safe_merge=True): the adapter leaves hold NaN or Inf values at d/lora_b; nothing was merged
    """
    if safe_merge:
        return _safe_merge(params, config, return_column_scales)
    shared = global_entries(params)
    scales: dict[str, jax.Array] = {}

    def fold(path: str, holder: Mapping[str, Any]) -> dict[str, Any]:
        site = _site(config, path, holder)
        _, v, c = site_update(holder, site, config, shared)
        if c is not None:
            v = v * c[..., None, :]
            scales[path] = c
        out = {k: val for k, val in holder.items() if not is_adapter_key(k)}
        out[KERNEL] = site.layout.to_kernel(v).astype(holder[KERNEL].dtype)
        return out

    merged = rebuild(params, fold)
    merged = jax.tree.map(
        lambda x: dequantize(x) if is_quantized(x) else x, merged, is_leaf=is_quantized
    )
    return (merged, scales) if return_column_scales else merged


def _traced(tree: PyTree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _safe_merge(params: PyTree, config: LoraConfig, return_column_scales: bool) -> Any:
    """`merge` with PEFT's safe_merge checks: finite adapters before, finite kernels after."""
    where = "merge(safe_merge=True)"
    if _traced(params):
        raise ValueError(
            f"{where} reads the values and cannot run inside jax.jit: call merge(..., "
            "safe_merge=True) outside jit, or jit merge and check its output with "
            "rslora_jax.ops.finite.check_finite"
        )
    adapters, _ = split(params)
    bad = nonfinite_paths(adapters)
    if bad:
        raise NonFiniteError(
            f"{where}: the adapter leaves hold NaN or Inf values at {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}; nothing was merged"
        )
    merged, scales = merge(params, config, return_column_scales=True)
    adapted = {path for path, _ in adapted_holders(params)}
    kernels = {path: holder[KERNEL] for path, holder in adapted_holders(combine(adapters, merged))}
    bad = [p for p in nonfinite_paths(kernels) if p in adapted]
    if bad:
        raise NonFiniteError(
            f"{where}: merging gives NaN or Inf values in the kernels at "
            f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''} (the base kernel holds "
            "them, or the update overflows the kernel's dtype); the adapters seem broken"
        )
    return (merged, scales) if return_column_scales else merged


def unmerge(
    merged: PyTree,
    adapters: PyTree,
    config: LoraConfig,
    *,
    column_scales: Mapping[str, Any] | None = None,
) -> PyTree:
    """Recovers the base from `merge`'s output: ``W = W' / c - gamma * A @ B`` (float32, cast once).

    Exact up to float rounding (the round trip is not bit-exact in reduced precision).

    Args:
      merged: the merged tree (no adapter leaves).
      adapters: the adapters (first output of `split`, or a full tree holding them).
      config: the config used to merge.
      column_scales: for methods that rescale columns (DoRA), the scales `merge` returned with
        ``return_column_scales=True``.

    Returns:
      The base tree (no adapter leaves).

    Raises:
      ValueError: if the method rescales columns and `column_scales` misses a path.

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = LoraConfig(rank=1, alpha=1.0)
      >>> ad = {"d": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}}
      >>> unmerge({"d": {"kernel": jnp.ones((2, 2))}}, ad, cfg)["d"]["kernel"].tolist()
      [[0.0, 0.0], [0.0, 0.0]]
    """
    adapters, _ = split(adapters)
    full = combine(adapters, merged)
    shared = global_entries(full)
    method = config.method

    def unfold(path: str, holder: Mapping[str, Any]) -> dict[str, Any]:
        site = _site(config, path, holder)
        method.check_leaves(adapter_leaves(holder), site, config, shared)
        a, b, scale = method.pair(adapter_leaves(holder), path, config, shared)
        f32 = jnp.float32
        w = site.layout.from_kernel(dense(holder[KERNEL], f32))
        if method.rescales_columns:
            if column_scales is None or path not in column_scales:
                raise ValueError(
                    f"unmerge of {method.title} at {path!r} needs the column scales of the "
                    "merge: the merged kernel m * V / ||V|| (V = W + gamma*A@B) keeps only the "
                    "direction of each column of V; pass column_scales=... from "
                    "merge(..., return_column_scales=True)"
                )
            w = w / jnp.asarray(column_scales[path], f32)[..., None, :]
        ab = jnp.matmul(a.astype(f32), b.astype(f32), precision=_HIGHEST)
        out = {k: v for k, v in holder.items() if not is_adapter_key(k)}
        out[KERNEL] = site.layout.to_kernel(w - f32(scale) * ab).astype(holder[KERNEL].dtype)
        return out

    return rebuild(full, unfold)


def merged_kernels(params: PyTree, config: LoraConfig, paths: set[str]) -> PyTree:
    """Like `merge`, but only for `paths`; other adapters (and top-level entries) stay."""
    shared = global_entries(params)

    def fold(path: str, holder: Mapping[str, Any]) -> dict[str, Any]:
        if path not in paths:
            return dict(holder)
        out = {k: v for k, v in holder.items() if not is_adapter_key(k)}
        out[KERNEL] = updated_kernel(holder, path, config, shared).astype(holder[KERNEL].dtype)
        return out

    return rebuild(params, fold, drop_adapters=False)


__all__ = ["merge", "merged_kernels", "site_update", "unmerge", "updated_kernel"]
