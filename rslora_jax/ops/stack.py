"""Several adapters for one base, stacked: one batch serves many fine-tunes at once.

`stack_adapters` stacks ``N`` adapter trees (same method, targets and shapes) on a new adapter
axis; ``rslora_jax.lora(apply, config)(variables, x, adapter_index=rows)`` with the stacked
adapters combined into the base then computes row ``b`` of the batch with adapter ``rows[b]``
(factored: `rslora_jax.execution.dispatch.per_row_outputs`), as PEFT's ``adapter_names`` does.

Where the axis goes: a model sees each adapter leaf as one layer's slice when its layers are
scanned (``nn.scan`` slices the leading layer axes away), so the adapter axis goes right after a
leaf's layer axes: ``lora_a (*l, d_in, r)`` becomes ``(*l, N, d_in, r)``; the layer axes are
read off each leaf's layout (`rslora_jax.core.protocol.Leaf`). A method's top-level shared entry
(RaSA's pools) is never sliced: its leaves get the axis first. `stack_specs` inserts the same
(unsharded) axis into partition specs, so stacked adapters shard as a single one does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from rslora_jax._types import PyTree
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.tree import is_adapter_key, join_path, split

_LAYOUT_AXES = {"a": 2, "b": 2, "out": 1, "rank": 1}


def _adapters_of(tree: PyTree, i: int) -> PyTree:
    if not isinstance(tree, Mapping):
        raise ValueError(f"stack_adapters: tree {i} is a {type(tree).__name__}, not a dict")
    adapters, _ = split(tree)
    if not adapters:
        raise ValueError(f"stack_adapters: tree {i} holds no adapter leaves (keys 'lora_...')")
    return adapters


def _axis_of(config: LoraConfig, path: str, name: str, leaf: Any, shared: bool) -> int:
    """Where the adapter axis goes in one leaf (after its layer axes)."""
    if shared:
        return 0
    spec = config.method.leaves.get(name)
    if spec is None:
        raise ValueError(
            f"stack_adapters: {path}/{name} is not a leaf of the config's method "
            f"{config.method.title} (its leaves: {sorted(config.method.leaves)})"
        )
    axis = np.ndim(leaf) - _LAYOUT_AXES[spec.layout]
    if axis < 0:
        raise ValueError(
            f"stack_adapters: {path}/{name} has shape {tuple(np.shape(leaf))}, too few axes for "
            f"a {spec.layout!r} leaf"
        )
    return axis


def _walk(
    trees: Sequence[PyTree],
    config: LoraConfig,
    fn: Callable[[str, int, list[Any]], Any],
    prefix: tuple = (),
    shared: bool = False,
) -> Any:
    first = trees[0]
    if not isinstance(first, Mapping):
        path = join_path(prefix)
        leaf_name = str(prefix[-1]) if prefix else ""
        parent = join_path(prefix[:-1])
        return fn(path, _axis_of(config, parent, leaf_name, first, shared), list(trees))
    keys = set(first)
    for i, t in enumerate(trees[1:], 1):
        if not isinstance(t, Mapping) or set(t) != keys:
            other = sorted(map(str, t)) if isinstance(t, Mapping) else type(t).__name__
            raise ValueError(
                f"stack_adapters: adapter {i} differs from adapter 0 at {join_path(prefix)!r}: "
                f"{other} against {sorted(map(str, keys))}; the adapters must have the same "
                "targets and method"
            )
    return {
        k: _walk(
            [t[k] for t in trees],
            config,
            fn,
            (*prefix, k),
            shared or (not prefix and is_adapter_key(k) and isinstance(first[k], Mapping)),
        )
        for k in first
    }


def stack_adapters(trees: Sequence[PyTree], config: LoraConfig) -> PyTree:
    """Stacks ``N`` adapters of one base on a new adapter axis (see the module docstring).

    Args:
      trees: the adapters: adapter trees, or params trees with adapters (their base parts are
        ignored), all made with `config`'s method, targets and ranks.
      config: their config (`rslora_jax.lora` computes the stacked adapters with it).

    Returns:
      The stacked adapter tree (no base leaves): `rslora_jax.combine` it with the base.

    Raises:
      ValueError: if there are no trees, or they differ in paths, leaves or shapes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from rslora_jax import LoraConfig, combine, init_adapters, lora
      >>> base = {"d": {"kernel": jnp.ones((4, 3))}}
      >>> cfg = LoraConfig(rank=2)
      >>> two = [init_adapters(base, cfg, jax.random.key(i)) for i in range(2)]
      >>> stacked = stack_adapters(two, cfg)
      >>> stacked["d"]["lora_a"].shape
      (2, 4, 2)
    """
    trees = list(trees)
    if not trees:
        raise ValueError("stack_adapters: no adapters given")
    adapters = [_adapters_of(t, i) for i, t in enumerate(trees)]

    def stack(path: str, axis: int, leaves: list[Any]) -> Any:
        shapes = [tuple(np.shape(x)) for x in leaves]
        if len(set(shapes)) != 1:
            raise ValueError(
                f"stack_adapters: {path} has shapes {shapes} across the adapters; stacked "
                "adapters need equal shapes (the same targets and ranks)"
            )
        return jnp.stack([jnp.asarray(x) for x in leaves], axis=axis)

    return _walk(adapters, config, stack)


def stack_specs(specs: PyTree, adapters: PyTree, config: LoraConfig) -> PyTree:
    """Partition specs of stacked adapters from those of one: the adapter axis unsharded.

    Args:
      specs: the `PartitionSpec` tree of one adapter's tree (e.g. the adapter part of
        `rslora_jax.partition_specs`).
      adapters: one adapter tree (arrays or `jax.ShapeDtypeStruct`), for the leaves' ranks.
      config: the adapters' config.

    Returns:
      The specs of `stack_adapters`' result.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from rslora_jax import LoraConfig, init_adapters
      >>> cfg = LoraConfig(rank=2)
      >>> one = init_adapters({"d": {"kernel": jnp.ones((4, 3))}}, cfg, jax.random.key(0))
      >>> specs = {"d": {"lora_a": PartitionSpec("model"), "lora_b": PartitionSpec()}}
      >>> tuple(stack_specs(specs, one, cfg)["d"]["lora_a"])
      (None, 'model', None)
    """
    adapters = _adapters_of(adapters, 0)
    spec_of: dict[str, Any] = {
        join_path(tuple(getattr(k, "key", k) for k in path)): s
        for path, s in jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
    }

    def insert(path: str, axis: int, leaves: list[Any]) -> PartitionSpec:
        if path not in spec_of:
            raise ValueError(f"stack_specs: no spec for {path}")
        entries = list(spec_of[path]) + [None] * (np.ndim(leaves[0]) - len(spec_of[path]))
        return PartitionSpec(*entries[:axis], None, *entries[axis:])

    return _walk([adapters], config, insert)


__all__ = ["stack_adapters", "stack_specs"]
