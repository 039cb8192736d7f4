"""Tree operations on parameter trees with adapters: walking, `split` and `combine`.

An adapted kernel's dict gains adapter leaves next to ``kernel``; every key that starts with
``lora_`` marks adapter state (a leaf, or a subtree such as RaSA's top-level ``lora_shared``
pools). `split` and `combine` move between the full tree and the pair ``(adapters, base)``: the
adapters tree holds only adapter entries (and the dicts leading to them), the base tree is exactly
the original parameter tree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from rslora_jax._types import PyTree

ADAPTER_PREFIX = "lora_"
KERNEL = "kernel"


def is_adapter_key(key: Any) -> bool:
    """Whether a dict key marks an adapter entry (it starts with ``lora_``).

    Example:
      >>> is_adapter_key("lora_b"), is_adapter_key("kernel")
      (True, False)
    """
    return isinstance(key, str) and key.startswith(ADAPTER_PREFIX)


def is_adapter_path(path: tuple[Any, ...]) -> bool:
    """Whether a `jax.tree_util` key path leads to an adapter leaf.

    Example:
      >>> import jax
      >>> [is_adapter_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      ...     {"d": {"kernel": 0, "lora_a": 0}})]
      [False, True]
    """
    return any(is_adapter_key(getattr(k, "key", getattr(k, "name", None))) for k in path)


def join_path(keys: tuple[Any, ...]) -> str:
    """The '/'-joined path of a chain of dict keys (``("model", 0, "q")`` -> ``"model/0/q"``)."""
    return "/".join(str(k) for k in keys)


def has_shape(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def iter_holders(tree: PyTree, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple, Mapping]]:
    """Yields ``(keys, dict)`` for every dict in `tree` that holds a ``kernel`` array."""
    if not isinstance(tree, Mapping):
        return
    if KERNEL in tree and has_shape(tree[KERNEL]):
        yield prefix, tree
    for key, val in tree.items():
        if isinstance(val, Mapping) and not is_adapter_key(key):
            yield from iter_holders(val, (*prefix, key))


def is_adapted(holder: Any) -> bool:
    """Whether a dict holds a kernel and adapter leaves next to it (any method's).

    Example:
      >>> import jax.numpy as jnp
      >>> is_adapted({"kernel": jnp.ones((2, 2)), "lora_b": jnp.ones((1, 2))})
      True
    """
    return (
        isinstance(holder, Mapping)
        and KERNEL in holder
        and any(is_adapter_key(k) and not isinstance(v, Mapping) for k, v in holder.items())
    )


def adapted_holders(tree: PyTree) -> list[tuple[str, Mapping]]:
    """``(path, dict)`` for every dict of `tree` holding a kernel and adapter leaves."""
    return [(join_path(k), d) for k, d in iter_holders(tree) if is_adapted(d)]


def adapter_leaves(holder: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter entries of one kernel's dict."""
    return {k: v for k, v in holder.items() if is_adapter_key(k)}


def global_entries(params: PyTree) -> dict[str, Any]:
    """Top-level adapter subtrees that belong to no kernel (e.g. RaSA's ``lora_shared`` pools).

    Adapter leaves at the top level belong to a kernel there (a model that is a single layer).
    """
    if not isinstance(params, Mapping):
        return {}
    return {k: v for k, v in params.items() if is_adapter_key(k) and isinstance(v, Mapping)}


def get(tree: PyTree, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def set_in(tree: dict, keys: tuple[Any, ...], value: Any) -> None:
    """``tree[k0][k1]...[kn] = value``, creating the dicts on the way."""
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def merge_disjoint(a: PyTree, b: PyTree) -> PyTree:
    """Union of two nested dicts whose leaves do not collide."""
    out = dict(a)
    for key, val in b.items():
        out[key] = merge_disjoint(out[key], val) if key in out else val
    return out


def rebuild(tree: Any, fn: Any, prefix: tuple = (), *, drop_adapters: bool = True) -> Any:
    """Copies nested dicts, replacing each adapted kernel's dict by ``fn(path, dict)``.

    Other adapter entries (e.g. global pools) are dropped when `drop_adapters` is set.
    """
    if not isinstance(tree, Mapping):
        return tree
    if is_adapted(tree):
        return fn(join_path(prefix), tree)
    return {
        k: rebuild(v, fn, (*prefix, k), drop_adapters=drop_adapters)
        for k, v in tree.items()
        if not (drop_adapters and is_adapter_key(k))
    }


def split(params: PyTree) -> tuple[PyTree, PyTree]:
    """Splits a tree into ``(adapters, base)``; `combine` is its exact inverse.

    Args:
      params: a tree with adapter leaves (keys starting with ``lora_``).

    Returns:
      ``adapters``: nested dicts holding only the adapter leaves; ``base``: everything else,
      with exactly the original structure.

    Raises:
      ValueError: if `params` is not a dict.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"d": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1)),
      ...            "lora_b": jnp.zeros((1, 2))}}
      >>> adapters, base = split(p)
      >>> sorted(adapters["d"]), sorted(base["d"])
      (['lora_a', 'lora_b'], ['kernel'])
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"split expects a nested dict of parameters, got {type(params)}")
    adapters: dict[Any, Any] = {}
    base: dict[Any, Any] = {}
    for key, val in params.items():
        if is_adapter_key(key):
            adapters[key] = val
        elif isinstance(val, Mapping):
            sub_a, sub_b = split(val)
            if sub_a:
                adapters[key] = sub_a
            base[key] = sub_b
        else:
            base[key] = val
    return adapters, base


def combine(adapters: PyTree, base: PyTree) -> PyTree:
    """Inverse of `split`: puts the adapter leaves back into the base tree.

    Raises:
      ValueError: if an adapter's path is missing from `base` or collides with a base leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> base = {"d": {"kernel": jnp.ones((2, 2))}}
      >>> sorted(combine({"d": {"lora_a": jnp.ones((2, 1))}}, base)["d"])
      ['kernel', 'lora_a']
    """
    return _combine(adapters, base, ())


def _combine(adapters: PyTree, base: PyTree, prefix: tuple) -> PyTree:
    if not isinstance(base, Mapping):
        raise ValueError(
            f"adapters at {join_path(prefix)!r} have no matching dict in the base tree "
            f"(found {type(base).__name__})"
        )
    out = dict(base)
    for key, val in adapters.items():
        if is_adapter_key(key):
            if key in base:
                raise ValueError(f"{join_path((*prefix, key))!r} is in both adapters and base")
            out[key] = val
        elif key in base:
            out[key] = _combine(val, base[key], (*prefix, key))
        else:
            raise ValueError(
                f"adapter path {join_path((*prefix, key))!r} does not exist in the base tree; "
                f"keys there: {sorted(map(str, base))}"
            )
    return out


def adapter_paths(params: PyTree) -> list[str]:
    """Paths of the kernels' dicts that hold adapters in `params`.

    Example:
      >>> import jax.numpy as jnp
      >>> adapter_paths({"a": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1))},
      ...                "b": {"kernel": jnp.ones((2, 2))}})
      ['a']
    """
    return [p for p, _ in adapted_holders(params)]


def num_adapter_params(params: PyTree) -> int:
    """Total number of adapter elements in `params`.

    Example:
      >>> import jax.numpy as jnp
      >>> num_adapter_params({"d": {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 2)),
      ...                           "lora_b": jnp.ones((2, 4))}})
      16
    """
    adapters, _ = split(params)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


__all__ = [
    "KERNEL",
    "adapted_holders",
    "adapter_leaves",
    "adapter_paths",
    "combine",
    "global_entries",
    "is_adapted",
    "is_adapter_key",
    "is_adapter_path",
    "iter_holders",
    "join_path",
    "num_adapter_params",
    "split",
]
