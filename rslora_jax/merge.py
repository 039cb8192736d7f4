"""Merge adapters into the kernels (for serving) and take them out again.

``W' = W + gamma_r * A @ B`` is computed in float32 and cast to the kernel's dtype once, so a
bf16 base keeps small adapter updates that a bf16 accumulation would round away. The variants
merge the same way: RaSA ``W_i + A_i diag(d_priv) B_i + A_S diag(d_sh) B_S``
(`rslora_jax.rasa`), DoRA ``m * (W + gamma*A@B) / ||W + gamma*A@B||`` (`rslora_jax.variants`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax import rasa
from rslora_jax._types import PyTree
from rslora_jax.adapters import KERNEL, combine, is_adapter_key, join_path, layout_for, split
from rslora_jax.config import LoraConfig
from rslora_jax.variants import MAGNITUDE, dora_matrix

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


def _check_kind(holder: Mapping[str, Any], path: str, config: LoraConfig) -> None:
    is_rasa, is_dora = rasa.DIAG in holder, MAGNITUDE in holder
    if is_rasa != config.rasa:
        raise ValueError(
            f"adapter at {path!r} {'is' if is_rasa else 'is not'} a RaSA adapter ('lora_d'), but "
            f"the config says rasa={config.rasa}"
        )
    if is_dora != config.use_dora:
        raise ValueError(
            f"adapter at {path!r} {'has' if is_dora else 'has no'} DoRA magnitude "
            f"({MAGNITUDE!r}), but the config says use_dora={config.use_dora}"
        )


def updated_kernel(
    holder: Mapping[str, Any], path: str, config: LoraConfig, shared: Any = None
) -> jax.Array:
    """The merged kernel for one adapted dict, any variant, in float32 (not cast).

    Args:
      holder: the dict holding ``kernel`` and the adapter leaves.
      path: its path.
      config: the config.
      shared: the ``lora_shared`` subtree (RaSA only).

    Returns:
      ``W + gamma*A@B`` (LoRA), ``W + A_i diag(d) B_i + A_S diag(d) B_S`` (RaSA) or
      ``m * (W + gamma*A@B) / ||W + gamma*A@B||`` (DoRA; the norm is detached, as in the
      forward pass), float32, in the kernel's layout.

    Raises:
      ValueError: if the adapter's shapes or kind do not fit the kernel and config.
    """
    _check_kind(holder, path, config)
    kernel = holder[KERNEL]
    if config.rasa:
        return kernel.astype(jnp.float32) + rasa.delta(holder, path, config, shared)
    if config.use_dora:
        layout = layout_for(config, path, kernel)
        a, b, m = holder["lora_a"], holder["lora_b"], holder[MAGNITUDE]
        _check_factors(path, layout, a, b, config)
        if tuple(m.shape) != (*layout.layer_shape, layout.d_out):
            raise ValueError(
                f"DoRA magnitude at {path!r} has shape {tuple(m.shape)}, expected "
                f"{(*layout.layer_shape, layout.d_out)} (one entry per output feature)"
            )
        w = layout.from_kernel(kernel)
        return layout.to_kernel(dora_matrix(w, a, b, config.scale_for(path), m))
    return kernel.astype(jnp.float32) + delta(holder, path, config)


def _shared(params: Any) -> Any:
    return params.get(rasa.SHARED) if isinstance(params, Mapping) else None


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
    ``W + gamma * A @ B``, computed in float32 and cast once (RaSA and DoRA adapters: see
    `updated_kernel`). Jit-able (``config`` static) and
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

    shared = _shared(params)

    def fold(path: str, holder: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in holder.items() if not is_adapter_key(k)}
        kernel = holder[KERNEL]
        out[KERNEL] = updated_kernel(holder, path, config, shared).astype(kernel.dtype)
        return out

    return _rebuild(params, fold)


def unmerge(merged: PyTree, adapters: PyTree, config: LoraConfig) -> PyTree:
    """Recovers the base from `merge`'s output: ``W = W' - gamma * A @ B`` (float32, cast once).

    Exact up to float rounding (the round trip is not bit-exact in reduced precision). RaSA
    adapters unmerge the same way (``W_i = W'_i - A_i diag(d) B_i - A_S diag(d) B_S``).

    Args:
      merged: the merged tree (no adapter leaves).
      adapters: the adapters (first output of `split`, or a full tree holding them).
      config: the config used to merge.

    Returns:
      The base tree (no adapter leaves).

    Raises:
      ValueError: for DoRA adapters: ``m * V / ||V||`` with ``V = W + gamma*A@B`` loses the
        column norms of V, so W cannot be recovered from the merged kernel and the adapters
        (keep the base instead).

    Example:
      >>> import jax.numpy as jnp
      >>> cfg = LoraConfig(rank=1, alpha=1.0)
      >>> ad = {"d": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}}
      >>> unmerge({"d": {"kernel": jnp.ones((2, 2))}}, ad, cfg)["d"]["kernel"].tolist()
      [[0.0, 0.0], [0.0, 0.0]]
    """
    if config.use_dora:
        raise ValueError(
            "unmerge cannot undo a DoRA merge: m * V / ||V|| (V = W + gamma*A@B) keeps only the "
            "direction of each column of V, so W is not determined by the merged kernel and the "
            "adapters; keep the base parameters instead"
        )
    adapters, _ = split(adapters)
    full = combine(adapters, merged)
    shared = _shared(full)

    def unfold(path: str, holder: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in holder.items() if not is_adapter_key(k)}
        kernel = holder[KERNEL]
        _check_kind(holder, path, config)
        if config.rasa:
            change = rasa.delta(holder, path, config, shared)
        else:
            change = delta(holder, path, config)
        out[KERNEL] = (kernel.astype(jnp.float32) - change).astype(kernel.dtype)
        return out

    return _rebuild(full, unfold)


def merged_kernels(params: PyTree, config: LoraConfig, paths: set[str]) -> PyTree:
    """Like `merge`, but only for `paths`; other adapters (and RaSA pools) stay in the tree."""
    shared = _shared(params)

    def fold(path: str, holder: Mapping[str, Any]) -> dict[str, Any]:
        if path not in paths:
            return dict(holder)
        out = {k: v for k, v in holder.items() if not is_adapter_key(k)}
        kernel = holder[KERNEL]
        out[KERNEL] = updated_kernel(holder, path, config, shared).astype(kernel.dtype)
        return out

    def walk(tree: Any, prefix: tuple = ()) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        if KERNEL in tree and "lora_a" in tree:
            return fold(join_path(prefix), tree)
        return {k: walk(v, (*prefix, k)) for k, v in tree.items()}

    return walk(params)


__all__ = ["delta", "merge", "merged_kernels", "unmerge", "updated_kernel"]
