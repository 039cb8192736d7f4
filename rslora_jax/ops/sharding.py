"""Shardings for adapters, derived from the base kernels' shardings.

A takes the base kernel's input-axes spec, B its output-axes spec, the rank axis is replicated,
layer axes keep their spec. So ``x @ A`` needs no more communication than ``x @ W`` does, and
adapters are sharded FSDP-style wherever the base is. Every adapter leaf follows the layout its
method declares (`rslora_jax.core.Leaf`): ``"a"`` and ``"b"`` as A and B, ``"out"`` (one entry per
output feature, e.g. DoRA's magnitude) the output spec, ``"rank"`` (e.g. RaSA's diagonal) the
layer axes' spec and otherwise replicated. A method's top-level shared entry (RaSA's pools) gets
the specs its method derives from its members' (`Method.shared_specs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rslora_jax._types import PyTree
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.protocol import leaf_role
from rslora_jax.core.sites import layout_for
from rslora_jax.core.tree import (
    KERNEL,
    WeightRef,
    adapted_refs,
    global_entries,
    holder_view,
    is_adapter_key,
    join_path,
    sub_key,
)


def _default_config() -> LoraConfig:
    return LoraConfig()


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


def leaf_spec(layout: str, kernel_spec: PartitionSpec, axes: str) -> PartitionSpec:
    """The spec of an adapter leaf of `layout` (``"a"``, ``"b"``, ``"out"``, ``"rank"``).

    Example:
      >>> leaf_spec("out", PartitionSpec("fsdp", "tp"), "io")
      P('tp',)
    """
    layer, in_spec, out_spec = _roles(_entries(kernel_spec, len(axes)), axes)
    return {
        "a": PartitionSpec(*layer, in_spec, None),
        "b": PartitionSpec(*layer, None, out_spec),
        "out": PartitionSpec(*layer, out_spec),
        "rank": PartitionSpec(*layer, None),
    }[layout]


def partition_specs(params: PyTree, base_specs: PyTree, config: LoraConfig | None = None) -> PyTree:
    """Specs for a tree with adapters, given the specs of its base.

    Args:
      params: the tree with adapters (arrays or `jax.ShapeDtypeStruct`).
      base_specs: a tree with the base's structure (the original params) whose leaves are
        `PartitionSpec` or `NamedSharding`. Extra adapter entries in it are ignored.
      config: the adapter config (for ``kernel_axes`` / ``fan_in_fan_out`` and the method's
        shared entry); defaults to ``LoraConfig()``, right for 2-D (in, out) kernels.

    Returns:
      A tree with the structure of `params`: base leaves keep their spec, adapter leaves get the
      spec of their layout (as `NamedSharding` on the same mesh when the base leaves are
      shardings), the shared entry as its method says.

    Raises:
      ValueError: if `base_specs` misses a path of `params`, or an adapter leaf has no rule.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"d": {"kernel": jnp.ones((4, 6)), "lora_a": jnp.ones((4, 2)),
      ...            "lora_b": jnp.zeros((2, 6))}}
      >>> partition_specs(p, {"d": {"kernel": PartitionSpec("x", "y")}})["d"]["lora_b"]
      P(None, 'y')
    """
    config = config or _default_config()
    members: dict[str, tuple[Any, Any]] = {}
    meshes: list[Any] = []
    out = _specs(params, base_specs, config, (), members, meshes)
    for key, val in global_entries(params).items():
        method = config.method
        if method.shared_key != key:
            raise ValueError(
                f"no sharding rule for the top-level adapter entry {key!r} (the config's "
                f"method {method.name!r} does not own it); give its specs explicitly"
            )
        specs = method.shared_specs(val, members, config)
        mesh = meshes[0] if meshes else None
        out[key] = (
            jax.tree.map(
                lambda s, mesh=mesh: NamedSharding(mesh, s),
                specs,
                is_leaf=lambda x: isinstance(x, PartitionSpec),
            )
            if mesh is not None
            else specs
        )
    return out


def _specs(
    tree: Any, specs: Any, config: LoraConfig, prefix: tuple, members: dict, meshes: list
) -> Any:
    if not isinstance(tree, Mapping):
        return specs
    if not isinstance(specs, Mapping):
        raise ValueError(
            f"base_specs at {join_path(prefix)!r} is {specs!r}, but params hold a dict there"
        )
    refs = adapted_refs(tree, prefix)
    subs = {sub_key(r.name) for r in refs if not r.own}
    out: dict[Any, Any] = {}
    for key, val in tree.items():
        if is_adapter_key(key):
            continue
        if key not in specs:
            raise ValueError(f"base_specs has no entry for {join_path((*prefix, key))!r}")
        out[key] = _specs(val, specs[key], config, (*prefix, key), members, meshes)
    for ref in refs:
        holder = holder_view(tree, ref)
        leaves = _leaf_specs(holder, specs[ref.name], config, ref, members, meshes)
        if ref.own:
            out.update(leaves)
        else:
            out[sub_key(ref.name)] = leaves
    if prefix and not any(r.own for r in refs):
        for key in tree:
            if is_adapter_key(key) and key not in subs:
                raise ValueError(
                    f"no sharding rule for adapter leaf {join_path((*prefix, key))!r}; "
                    "give its spec explicitly"
                )
    return out


def _leaf_specs(
    holder: Mapping[str, Any],
    kernel_spec: Any,
    config: LoraConfig,
    ref: WeightRef,
    members: dict,
    meshes: list,
) -> dict[str, Any]:
    """Specs of one weight's adapter leaves, from the weight's spec and layout."""
    path = ref.path
    mesh = None
    if isinstance(kernel_spec, NamedSharding):
        mesh, kernel_spec = kernel_spec.mesh, kernel_spec.spec
        meshes.append(mesh)
    if kernel_spec is None:
        kernel_spec = PartitionSpec()
    axes = layout_for(config, path, holder[KERNEL]).axes
    _, in_spec, out_spec = _roles(_entries(kernel_spec, len(axes)), axes)
    members[path] = (in_spec, out_spec)
    out = {}
    for key in holder:
        if not is_adapter_key(key):
            continue
        role = leaf_role(key)
        if role is None:
            raise ValueError(
                f"no sharding rule for adapter leaf {join_path((*ref.leaf_keys, key))!r}; "
                "give its spec explicitly"
            )
        spec = leaf_spec(role.layout, kernel_spec, axes)
        out[key] = NamedSharding(mesh, spec) if mesh is not None else spec
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
    # Leaves a transformation keeps no state for (`rslora_jax.optimizer` over the whole tree:
    # the base, and frozen adapters) are `optax.MaskedNode`s in the state, and stay so.
    masked = optax.MaskedNode
    specs = optax.tree_map_params(
        tx,
        lambda state, spec: state if isinstance(state, masked) else spec,
        state_shape,
        param_specs,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (PartitionSpec, NamedSharding, masked)),
    )
    return specs


__all__ = ["factor_specs", "leaf_spec", "opt_state_specs", "partition_specs"]
