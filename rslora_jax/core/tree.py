"""Tree operations on parameter trees with adapters: walking, `split` and `combine`.

An adapted kernel's dict gains adapter leaves next to ``kernel``; every key that starts with
``lora_`` marks adapter state (a leaf, or a subtree such as RaSA's top-level ``lora_shared``
pools). `split` and `combine` move between the full tree and the pair ``(adapters, base)``: the
adapters tree holds only adapter entries (and the dicts leading to them), the base tree is exactly
the original parameter tree.

Weights not named ``kernel`` (Google's ``gemma`` library: ``w``, ``gating_einsum``, ``linear``;
tunix's NNX ``Einsum``: ``w``) are weights too: a dict's *weights* are its ``kernel`` and its
other non-adapter arrays with two or more axes (``bias`` and ``scale`` excepted, see
`weight_names`). Each weight has a path and a place for its adapter leaves (`WeightRef`):

- a ``kernel``, or the only weight of a dict below the top level: the path is the dict's path
  and the adapter leaves sit next to the weight (``{"w": W, "lora_a": A, "lora_b": B}``), as for ``kernel`` always;
- one of several weights in one dict (gemma's feed-forward keeps ``gating_einsum`` and
  ``linear`` in one scope), or a top-level one: the path is ``<dict path>/<name>`` and the leaves sit in a sub-dict
  ``lora_<name>`` next to it (``{"linear": W, "lora_linear": {"lora_a": A, ...}}``).

The functions that read one weight with its leaves see a *holder*: a dict with the weight under
``kernel`` and its adapter leaves beside it (`holder_view`), whatever the weight is called, so
merge, sharding, PEFT export and the methods read every weight the same way. Which weights are
adapted is the config's business (`rslora_jax.core.sites`): a weight not named ``kernel`` is only
adapted when the config says how the model uses it (its kernel axes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from rslora_jax._types import PyTree

ADAPTER_PREFIX = "lora_"
KERNEL = "kernel"
# Arrays that are never weights, whatever their rank (norm scales stacked by nn.scan are 2-D).
NOT_WEIGHTS = frozenset({"bias", "scale"})


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


def weight_names(tree: Mapping[Any, Any]) -> list[Any]:
    """The keys of the weights directly in one dict (see the module docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> weight_names({"w": jnp.ones((2, 3)), "bias": jnp.ones((2, 3)), "s": jnp.ones(3)})
      ['w']
    """
    out = []
    for key, val in tree.items():
        if is_adapter_key(key) or not has_shape(val):
            continue
        if key == KERNEL or (key not in NOT_WEIGHTS and len(val.shape) >= 2):
            out.append(key)
    return out


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """Where one weight is and where its adapter leaves go.

    Attributes:
      keys: the keys of the dict holding the weight.
      name: the weight's key in that dict (``kernel``, ``w``, ...).
      own: whether the adapter leaves sit in that dict (a ``kernel``, or the dict's only
        weight) rather than in a ``lora_<name>`` sub-dict.

    Example:
      >>> ref = WeightRef(("layer_0", "mlp"), "linear", own=False)
      >>> ref.path, ref.leaf_keys
      ('layer_0/mlp/linear', ('layer_0', 'mlp', 'lora_linear'))
    """

    keys: tuple[Any, ...]
    name: Any
    own: bool

    @property
    def path_keys(self) -> tuple[Any, ...]:
        return self.keys if self.own else (*self.keys, self.name)

    @property
    def path(self) -> str:
        """The weight's path: targets, rank patterns and kernel axes are matched against it."""
        return join_path(self.path_keys)

    @property
    def leaf_keys(self) -> tuple[Any, ...]:
        """The keys of the dict holding its adapter leaves."""
        return self.keys if self.own else (*self.keys, sub_key(self.name))


def sub_key(name: Any) -> str:
    """The key of the sub-dict holding the adapter leaves of weight `name` when its dict holds
    several weights (``lora_<name>``)."""
    return f"{ADAPTER_PREFIX}{name}"


def weight_refs(tree: Mapping[Any, Any], prefix: tuple[Any, ...] = ()) -> list[WeightRef]:
    """`WeightRef` of each weight directly in one dict."""
    names = weight_names(tree)
    # A lone weight shares its dict's path, except at the top level (the path would be empty).
    alone = len(names) == 1 and bool(prefix)
    return [WeightRef(prefix, n, own=n == KERNEL or alone) for n in names]


def holder_view(tree: Mapping[Any, Any], ref: WeightRef) -> dict[Any, Any]:
    """The holder of one weight: ``{"kernel": weight, **its adapter leaves}`` (plus the dict's
    other entries when the leaves sit in the weight's own dict)."""
    if ref.own:
        return {KERNEL if k == ref.name else k: v for k, v in tree.items()}
    sub = tree.get(sub_key(ref.name))
    return {KERNEL: tree[ref.name], **(dict(sub) if isinstance(sub, Mapping) else {})}


def _write_back(out: dict, ref: WeightRef, holder: Mapping[Any, Any]) -> None:
    """Inverse of `holder_view`: puts a holder's entries back into the dict `out`."""
    if ref.own:
        for k, v in holder.items():
            out[ref.name if k == KERNEL else k] = v
        return
    out[ref.name] = holder[KERNEL]
    leaves = {k: v for k, v in holder.items() if k != KERNEL}
    if leaves:
        out[sub_key(ref.name)] = leaves


def iter_weights(tree: PyTree, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[WeightRef, dict]]:
    """Yields ``(WeightRef, holder)`` for every weight of `tree` (any name), in tree order."""
    if not isinstance(tree, Mapping):
        return
    for ref in weight_refs(tree, prefix):
        yield ref, holder_view(tree, ref)
    for key, val in tree.items():
        if isinstance(val, Mapping) and not is_adapter_key(key):
            yield from iter_weights(val, (*prefix, key))


def weight_at(tree: PyTree, path: str) -> Any:
    """The weight (any name) whose path is `path`.

    Raises:
      ValueError: if `tree` has no weight there.

    Example:
      >>> import jax.numpy as jnp
      >>> weight_at({"mlp": {"linear": jnp.ones((2, 3)), "w": jnp.ones((3, 2))}}, "mlp/w").shape
      (3, 2)
    """
    for ref, holder in iter_weights(tree):
        if ref.path == path:
            return holder[KERNEL]
    raise ValueError(f"no weight at {path!r} in the parameter tree")


def replace_weights(tree: PyTree, weights: Mapping[str, Any], prefix: tuple = ()) -> PyTree:
    """A copy of `tree` (nested dicts) with the weights at the paths of `weights` replaced."""
    if not isinstance(tree, Mapping):
        return tree
    out = {k: replace_weights(v, weights, (*prefix, k)) for k, v in tree.items()}
    for ref in weight_refs(tree, prefix):
        if ref.path in weights:
            out[ref.name] = weights[ref.path]
    return out


def iter_holders(tree: PyTree, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple, Mapping]]:
    """Yields ``(keys, holder)`` for every ``kernel`` and every adapted weight of another name;
    ``join_path(keys)`` is the weight's path and ``holder[KERNEL]`` the weight."""
    for ref, holder in iter_weights(tree, prefix):
        if ref.name == KERNEL or is_adapted(holder):
            yield ref.path_keys, holder


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


def adapted_refs(tree: Mapping[Any, Any], prefix: tuple[Any, ...] = ()) -> list[WeightRef]:
    """The weights directly in one dict that have adapter leaves (any name)."""
    return [r for r in weight_refs(tree, prefix) if is_adapted(holder_view(tree, r))]


def adapted_holders(tree: PyTree) -> list[tuple[str, Mapping]]:
    """``(path, holder)`` for every weight of `tree` with adapter leaves."""
    return [(ref.path, h) for ref, h in iter_weights(tree) if is_adapted(h)]


def adapter_leaves(holder: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter entries of one kernel's dict."""
    return {k: v for k, v in holder.items() if is_adapter_key(k)}


def global_entries(params: PyTree) -> dict[str, Any]:
    """Top-level adapter subtrees that belong to no kernel (e.g. RaSA's ``lora_shared`` pools).

    Adapter leaves at the top level belong to a kernel there (a model that is a single layer).
    """
    if not isinstance(params, Mapping):
        return {}
    subs = {sub_key(r.name) for r in weight_refs(params) if not r.own}
    return {
        k: v
        for k, v in params.items()
        if is_adapter_key(k) and isinstance(v, Mapping) and k not in subs
    }


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
    """Copies nested dicts, replacing each adapted weight's holder by ``fn(path, holder)``.

    `fn` gets the weight's holder (`holder_view`: the weight under ``kernel``) and returns the
    new holder, which is written back under the weight's own name. Other adapter entries (e.g.
    global pools) are dropped when `drop_adapters` is set.
    """
    if not isinstance(tree, Mapping):
        return tree
    refs = adapted_refs(tree, prefix)
    own = next((r for r in refs if r.own), None)
    if own is not None and own.name == KERNEL:
        return fn(join_path(prefix), tree)  # as always: the kernel's dict is its holder
    consumed = {sub_key(r.name) for r in refs if not r.own}
    out: dict[Any, Any] = {}
    for k, v in tree.items():
        if k in consumed or (own is not None and (k == own.name or is_adapter_key(k))):
            continue  # written back below
        if drop_adapters and is_adapter_key(k):
            continue
        out[k] = rebuild(v, fn, (*prefix, k), drop_adapters=drop_adapters)
    for ref in refs:
        _write_back(out, ref, fn(ref.path, holder_view(tree, ref)))
    return out


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
    "NOT_WEIGHTS",
    "WeightRef",
    "adapted_holders",
    "adapted_refs",
    "adapter_leaves",
    "adapter_paths",
    "combine",
    "global_entries",
    "holder_view",
    "is_adapted",
    "is_adapter_key",
    "is_adapter_path",
    "iter_holders",
    "iter_weights",
    "join_path",
    "num_adapter_params",
    "replace_weights",
    "split",
    "sub_key",
    "weight_at",
    "weight_names",
    "weight_refs",
]
