"""Shardings for adapters, derived from the base kernels' shardings.

A takes the base kernel's input-axes spec, B its output-axes spec, the rank axis is replicated,
layer axes keep their spec. So ``x @ A`` needs no more communication than ``x @ W`` does, and
adapters are sharded FSDP-style wherever the base is. Variants: DoRA's magnitude (one entry per
output feature) takes the output spec; RaSA's per-layer diagonal ``lora_d`` keeps the layer
axes' spec and is otherwise replicated, and each shared pool takes the spec of its module type's
kernels (the first member's, in tree order) without the layer axes: A_S the input spec, B_S the
output spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rslora_jax._types import PyTree
from rslora_jax.adapters import KERNEL, is_adapter_key, join_path, layout_for
from rslora_jax.config import LoraConfig
from rslora_jax.rasa import DIAG, SHARED
from rslora_jax.variants import MAGNITUDE

_DEFAULT = LoraConfig()


def _entries(spec: PartitionSpec, ndim: int) -> list[Any]:
    entries = list(spec)
    if len(entries) > ndim:
        raise ValueError(f"partition spec {spec} has more entries than the kernel's {ndim} axes")
    return entries + [None] * (ndim - len(entries))


def _flat_spec(entries: Sequence[Any]) -> Any:
    """The spec of a flattened group of axes: exact when only the first axis is sharded."""
    if not entries:
        return None
    if all(e is None for e in entries[1:]):
        return entries[0]
    return None  # not expressible on the flattened axis: replicate (correct, more memory)


def _roles(entries: list[Any], axes: str) -> tuple[list[Any], Any, Any]:
    layer = [e for e, r in zip(entries, axes) if r == "l"]
    ins = [e for e, r in zip(entries, axes) if r == "i"]
    outs = [e for e, r in zip(entries, axes) if r == "o"]
    return layer, _flat_spec(ins), _flat_spec(outs)


def factor_specs(kernel_spec: PartitionSpec, axes: str) -> tuple[PartitionSpec, PartitionSpec]:
    """PartitionSpecs of (lora_a, lora_b) for a kernel with spec `kernel_spec` and roles `axes`.

    Example:
      >>> factor_specs(PartitionSpec("fsdp", "tp"), "io")
      (P('fsdp', None), P(None, 'tp'))
    """
    layer, in_spec, out_spec = _roles(_entries(kernel_spec, len(axes)), axes)
    return PartitionSpec(*layer, in_spec, None), PartitionSpec(*layer, None, out_spec)


def partition_specs(params: PyTree, base_specs: PyTree, config: LoraConfig | None = None) -> PyTree:
    """Specs for a tree with adapters, given the specs of its base.

    Args:
      params: the tree with adapters (arrays or `jax.ShapeDtypeStruct`).
      base_specs: a tree with the base's structure (the original params) whose leaves are
        `PartitionSpec` or `NamedSharding`. Extra adapter entries in it are ignored.
      config: the adapter config (for ``kernel_axes`` / ``fan_in_fan_out``); defaults to
        ``LoraConfig()``, right for 2-D (in, out) kernels.

    Returns:
      A tree with the structure of `params`: base leaves keep their spec, ``lora_a`` /
      ``lora_b`` get `factor_specs` of their kernel's spec (as `NamedSharding` on the same mesh
      when the base leaves are shardings); DoRA's and RaSA's leaves as in the module docstring.

    Raises:
      ValueError: if `base_specs` misses a path of `params`.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"d": {"kernel": jnp.ones((4, 6)), "lora_a": jnp.ones((4, 2)),
      ...            "lora_b": jnp.zeros((2, 6))}}
      >>> partition_specs(p, {"d": {"kernel": PartitionSpec("x", "y")}})["d"]["lora_b"]
      P(None, 'y')
    """
    config = config or _DEFAULT
    pools: dict[str, tuple[Any, Any, Any]] = {}
    out = _specs(params, base_specs, config, (), pools)
    if isinstance(params, Mapping) and SHARED in params:
        out[SHARED] = _pool_specs(params[SHARED], pools, ())
    return out


def _pool_specs(tree: Any, pools: dict[str, tuple[Any, Any, Any]], prefix: tuple) -> Any:
    """Specs of the RaSA pools: A_S (d_in, L*k) and B_S (L*k, d_out)."""
    out: dict[Any, Any] = {}
    module = join_path(prefix)
    for key, val in tree.items():
        if key in ("lora_a", "lora_b") and not isinstance(val, Mapping):
            if module not in pools:
                raise ValueError(
                    f"no RaSA layer uses the pool {SHARED}/{module}: cannot derive its sharding"
                )
            in_spec, out_spec, mesh = pools[module]
            spec = (
                PartitionSpec(in_spec, None) if key == "lora_a" else PartitionSpec(None, out_spec)
            )
            out[key] = NamedSharding(mesh, spec) if mesh is not None else spec
        elif isinstance(val, Mapping):
            out[key] = _pool_specs(val, pools, (*prefix, key))
        else:
            raise ValueError(f"no sharding rule for {SHARED}/{join_path((*prefix, key))}")
    return out


def _specs(tree: Any, specs: Any, config: LoraConfig, prefix: tuple, pools: dict) -> Any:
    if not isinstance(tree, Mapping):
        return specs
    if not isinstance(specs, Mapping):
        raise ValueError(
            f"base_specs at {join_path(prefix)!r} is {specs!r}, but params hold a dict there"
        )
    out: dict[Any, Any] = {}
    for key, val in tree.items():
        if is_adapter_key(key):
            continue
        if key not in specs:
            raise ValueError(f"base_specs has no entry for {join_path((*prefix, key))!r}")
        out[key] = _specs(val, specs[key], config, (*prefix, key), pools)
    if KERNEL in tree and "lora_a" in tree:
        path = join_path(prefix)
        kernel_spec = specs[KERNEL]
        mesh = None
        if isinstance(kernel_spec, NamedSharding):
            mesh, kernel_spec = kernel_spec.mesh, kernel_spec.spec
        if kernel_spec is None:
            kernel_spec = PartitionSpec()
        axes = layout_for(config, path, tree[KERNEL]).axes
        a_spec, b_spec = factor_specs(kernel_spec, axes)
        layer, in_spec, out_spec = _roles(_entries(kernel_spec, len(axes)), axes)
        extra = {}
        if DIAG in tree:
            extra[DIAG] = PartitionSpec(*layer, None)
            pools.setdefault(config.rasa_module(path)[0], (in_spec, out_spec, mesh))
        if MAGNITUDE in tree:
            extra[MAGNITUDE] = PartitionSpec(*layer, out_spec)
        if mesh is not None:
            a_spec, b_spec = NamedSharding(mesh, a_spec), NamedSharding(mesh, b_spec)
            extra = {k: NamedSharding(mesh, v) for k, v in extra.items()}
        out["lora_a"], out["lora_b"] = a_spec, b_spec
        out.update(extra)
    for key in tree:
        if is_adapter_key(key) and key not in out and not (key == SHARED and not prefix):
            raise ValueError(
                f"no sharding rule for adapter leaf {join_path((*prefix, key))!r}; "
                "give its spec explicitly"
            )
    return out


def opt_state_specs(
    tx: optax.GradientTransformation, params: PyTree, param_specs: PyTree
) -> PyTree:
    """Specs for ``tx.init(params)``: each per-parameter state leaf takes its parameter's spec.

    Args:
      tx: the optimizer (e.g. from `rslora_jax.optimizer`).
      params: the tree the optimizer is initialised on (arrays or `jax.ShapeDtypeStruct`).
      param_specs: specs for `params` (e.g. from `partition_specs`).

    Returns:
      A tree of specs matching ``tx.init(params)``; scalars (step counts) are replicated.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"w": jnp.ones((4, 2))}
      >>> s = opt_state_specs(optax.adam(1e-3), p, {"w": PartitionSpec("x")})
      >>> s[0].mu["w"], s[0].count
      (P('x',), P())
    """
    state_shape = jax.eval_shape(tx.init, params)
    leaf_specs = jax.tree.leaves(
        param_specs, is_leaf=lambda x: isinstance(x, (PartitionSpec, NamedSharding))
    )
    replicated: Any = PartitionSpec()
    if leaf_specs and isinstance(leaf_specs[0], NamedSharding):
        replicated = NamedSharding(leaf_specs[0].mesh, PartitionSpec())
    # Per-parameter leaves are found by tree_map_params; the rest (counts, ...) are replicated.
    specs = optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        state_shape,
        param_specs,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (PartitionSpec, NamedSharding)),
    )
    return specs


__all__ = ["factor_specs", "opt_state_specs", "partition_specs"]
