"""The pytree transform: add adapter factors to a parameter tree, split them off, put them back.

An adapted kernel's dict gains two leaves next to ``kernel``::

    {"kernel": W, "lora_a": A, "lora_b": B}     A: (*l, d_in, r)   B: (*l, r, d_out)

Every leaf whose path has a key starting with ``lora_`` is an adapter leaf; everything else is
base. `split` and `combine` move between the full tree and the pair ``(adapters, base)``: the
adapters tree holds only adapter leaves (and the dicts leading to them), the base tree is exactly
the original parameter tree.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.config import LoraConfig

ADAPTER_PREFIX = "lora_"
KERNEL = "kernel"


# ---------------------------------------------------------------------------- tree walking
def is_adapter_key(key: Any) -> bool:
    """Whether a dict key marks an adapter entry (it starts with ``lora_``)."""
    return isinstance(key, str) and key.startswith(ADAPTER_PREFIX)


def is_adapter_path(path: tuple[Any, ...]) -> bool:
    """Whether a `jax.tree_util` key path leads to an adapter leaf."""
    return any(is_adapter_key(getattr(k, "key", getattr(k, "name", None))) for k in path)


def _is_mapping(x: Any) -> bool:
    return isinstance(x, Mapping)


def _has_shape(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def join_path(keys: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in keys)


def iter_holders(tree: PyTree, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple, Mapping]]:
    """Yields ``(keys, dict)`` for every dict in `tree` that holds a ``kernel`` array."""
    if not _is_mapping(tree):
        return
    if KERNEL in tree and _has_shape(tree[KERNEL]):
        yield prefix, tree
    for key, val in tree.items():
        if _is_mapping(val) and not is_adapter_key(key):
            yield from iter_holders(val, (*prefix, key))


def adapted_holders(tree: PyTree) -> list[tuple[str, Mapping]]:
    """``(path, dict)`` for every dict of `tree` holding a kernel and ``lora_a``."""
    return [(join_path(k), d) for k, d in iter_holders(tree) if "lora_a" in d]


def _to_dict(tree: PyTree) -> PyTree:
    """Shallow-copies nested mappings into plain dicts (leaves are shared)."""
    if _is_mapping(tree):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _get(tree: PyTree, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


# ---------------------------------------------------------------------------- layout
class KernelLayout:
    """How a kernel's axes map onto the adapter factors (see `LoraConfig.axes_for`)."""

    def __init__(self, axes: str, shape: tuple[int, ...]):
        self.axes = axes
        self.shape = tuple(int(s) for s in shape)
        self.layer_idx = tuple(i for i, a in enumerate(axes) if a == "l")
        self.in_idx = tuple(i for i, a in enumerate(axes) if a == "i")
        self.out_idx = tuple(i for i, a in enumerate(axes) if a == "o")
        self.layer_shape = tuple(self.shape[i] for i in self.layer_idx)
        self.in_shape = tuple(self.shape[i] for i in self.in_idx)
        self.out_shape = tuple(self.shape[i] for i in self.out_idx)
        self.d_in = math.prod(self.in_shape)
        self.d_out = math.prod(self.out_shape)

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (*self.layer_shape, self.d_in, r)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (*self.layer_shape, r, self.d_out)

    def to_kernel(self, delta: jax.Array) -> jax.Array:
        """(*l, d_in, d_out) -> the kernel's own axis order and shape."""
        full = delta.reshape(*self.layer_shape, *self.in_shape, *self.out_shape)
        order = self.layer_idx + self.in_idx + self.out_idx
        inverse = np.argsort(order)
        return jnp.transpose(full, tuple(int(i) for i in inverse))

    def from_kernel(self, kernel: jax.Array) -> jax.Array:
        """The kernel as a (*l, d_in, d_out) matrix stack (inverse of `to_kernel`)."""
        order = self.layer_idx + self.in_idx + self.out_idx
        moved = jnp.transpose(kernel, order)
        return moved.reshape(*self.layer_shape, self.d_in, self.d_out)


def layout_for(config: LoraConfig, path: str, kernel: Any) -> KernelLayout:
    return KernelLayout(config.axes_for(path, kernel.shape), kernel.shape)


# ---------------------------------------------------------------------------- targets
def target_paths(params: PyTree, config: LoraConfig) -> list[str]:
    """The paths `config` adapts in `params`, in tree order.

    Raises:
      ValueError: if nothing matches (the message lists candidate paths), if a target already
        has adapters, or if a target's kernel axes or rank do not fit its kernel.
    """
    holders = list(iter_holders(params))
    chosen = []
    for keys, holder in holders:
        path = join_path(keys)
        if config.is_target(path, holder[KERNEL]):
            chosen.append((path, holder))
    if not chosen:
        candidates = [join_path(k) for k, _ in holders]
        shown = ", ".join(repr(c) for c in candidates[:30])
        more = f" (and {len(candidates) - 30} more)" if len(candidates) > 30 else ""
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}, exclude={config.exclude!r}) matched no "
            f"kernel. Candidate paths: {shown or 'none: the tree holds no kernel'}{more}"
        )
    for path, holder in chosen:
        if any(is_adapter_key(k) for k in holder):
            raise ValueError(f"{path!r} already has adapter leaves: {sorted(holder)}")
        layout = layout_for(config, path, holder[KERNEL])
        r = config.rank_for(path)
        if r > min(layout.d_in, layout.d_out):
            raise ValueError(
                f"rank {r} at {path!r} exceeds min(d_in, d_out) = "
                f"min({layout.d_in}, {layout.d_out}) of its kernel {layout.shape}: the update "
                "W + A@B cannot have rank above that; lower LoraConfig.rank or set a "
                "rank_pattern for this path"
            )
    return [p for p, _ in chosen]


def path_key(key: PRNGKey, path: str) -> PRNGKey:
    """A key for `path` that does not depend on the order of the tree's dicts."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init_factor_a(key: PRNGKey, shape: tuple[int, ...], d_in: int, config: LoraConfig):
    """Draws A: U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's kaiming_uniform(a=sqrt(5))) or N(0, 1/d_in)."""
    return _draw_a(key, shape, d_in, config.init, config.dtype)


def _draw_a(key: PRNGKey, shape: tuple[int, ...], d_in: int, init: str, dtype: Any):
    bound = 1.0 / math.sqrt(d_in)
    if init == "gaussian":
        return (jax.random.normal(key, shape, jnp.float32) * bound).astype(dtype)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


# ---------------------------------------------------------------------------- public API
def init_adapters(params: PyTree, config: LoraConfig, key: PRNGKey) -> PyTree:
    """Creates the adapter tree alone (the first output of `split` of `init`'s result).

    Only the kernels' shapes are read, so `params` may be abstract (`jax.ShapeDtypeStruct`
    leaves, e.g. from `jax.eval_shape`): build adapters for a model that is not materialised yet,
    or under `jax.jit` with ``out_shardings`` from `partition_specs`. Exceptions: DoRA
    (``use_dora``) reads the kernels' values for its magnitudes, and PiSSA/OLoRA inits change
    the base, so they need `init`. With ``config.rasa`` the tree holds RaSA's entries
    (`rslora_jax.rasa`).

    Args:
      params: the parameter tree (nested dicts).
      config: the adapter configuration.
      key: a PRNG key.

    Returns:
      Nested dicts holding ``lora_a`` / ``lora_b`` for each target path (and ``lora_magnitude``
      with DoRA; ``lora_d`` and the top-level ``lora_shared`` pools with RaSA).

    Raises:
      ValueError: as `init`, and for a base-modifying ``config.init`` (PiSSA, OLoRA).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}
      >>> ad = init_adapters(params, LoraConfig(rank=2), jax.random.key(0))
      >>> jax.tree.map(lambda x: x.shape, ad)
      {'dense': {'lora_a': (6, 2), 'lora_b': (2, 4)}}
    """
    if config.base_modifying_init:
        raise ValueError(
            f"LoraConfig.init={config.init!r} changes the base kernels (W - gamma*A@B), so "
            "init_adapters cannot return the adapters alone; use rslora_jax.init, or "
            "rslora_jax.variants.principal_init for the pair (adapters, base)"
        )
    if config.rasa:
        from rslora_jax import rasa  # rasa builds on this module

        return rasa.init_adapters(params, config, key)
    paths = target_paths(params, config)
    holders = {join_path(k): (k, h) for k, h in iter_holders(params)}
    plan = []
    for path in paths:
        keys, holder = holders[path]
        layout = layout_for(config, path, holder[KERNEL])
        r = config.rank_for(path)
        plan.append((path, tuple(keys), layout.a_shape(r), layout.b_shape(r), layout.d_in))
    out = _draw_factors(tuple(plan), config.init, config.dtype, key)
    if config.use_dora:
        from rslora_jax import variants  # variants builds on this module

        out = _merge_trees(out, variants.magnitudes(params, out, config))
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _draw_factors(plan: tuple, init: str, dtype: Any, key: PRNGKey) -> dict[str, Any]:
    """All factors in one compiled program, cached per (plan, init, dtype)."""
    out: dict[str, Any] = {}
    for path, keys, a_shape, b_shape, d_in in plan:
        node = out
        for k in keys:
            node = node.setdefault(k, {})
        node["lora_a"] = _draw_a(path_key(key, path), a_shape, d_in, init, dtype)
        node["lora_b"] = jnp.zeros(b_shape, dtype)
    return out


def _merge_trees(a: PyTree, b: PyTree) -> PyTree:
    """Union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for key, val in b.items():
        out[key] = _merge_trees(out[key], val) if key in out else val
    return out


def init(params: PyTree, config: LoraConfig, key: PRNGKey) -> PyTree:
    """Adds rsLoRA adapters to every kernel `config` targets.

    The returned tree is `params` with ``lora_a`` (shape ``(*l, d_in, r)``) and ``lora_b``
    (``(*l, r, d_out)``, zeros) added to each targeted kernel's dict, so the model's output is
    unchanged. Keys are derived per path, so the result does not depend on dict order.

    Variants, chosen by `config`: RaSA (``rasa=True``, `rslora_jax.rasa`), DoRA (``use_dora``:
    adds ``lora_magnitude``), and PiSSA / OLoRA (``init="pissa"``, ``"pissa_niter_<n>"``,
    ``"olora"``): these also replace the targeted kernels by ``W - gamma * A @ B``, so the
    model's output is still unchanged (see `rslora_jax.variants`).

    Args:
      params: a Flax parameter tree (nested dicts; the ``params`` collection, not the whole
        variables dict).
      config: what to adapt and how.
      key: a PRNG key.

    Returns:
      The same tree with adapters added (leaves of `params` are shared, not copied, except the
      kernels that PiSSA/OLoRA change).

    Raises:
      ValueError: if nothing is targeted (listing candidate paths), if a target already has
        adapters, if the rank exceeds a kernel's dimensions, or if a kernel's axes are unknown.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"q_proj": {"kernel": jnp.ones((8, 8))}, "lm_head": {"kernel": jnp.ones((8, 3))}}
      >>> out = init(params, LoraConfig(rank=4), jax.random.key(0))
      >>> sorted(out["q_proj"]), sorted(out["lm_head"])
      (['kernel', 'lora_a', 'lora_b'], ['kernel'])
    """
    if config.base_modifying_init:
        from rslora_jax import variants  # variants builds on this module

        adapters, base = variants.principal_init(params, config, key)
        return combine(adapters, base)
    return combine(init_adapters(params, config, key), params)


def split(params: PyTree) -> tuple[PyTree, PyTree]:
    """Splits a tree into ``(adapters, base)``; `combine` is its exact inverse.

    Args:
      params: a tree with adapter leaves (keys starting with ``lora_``).

    Returns:
      ``adapters``: nested dicts holding only the adapter leaves; ``base``: everything else,
      with exactly the original structure.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"d": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1)),
      ...            "lora_b": jnp.zeros((1, 2))}}
      >>> adapters, base = split(p)
      >>> sorted(adapters["d"]), sorted(base["d"])
      (['lora_a', 'lora_b'], ['kernel'])
    """
    if not _is_mapping(params):
        raise ValueError(f"split expects a nested dict of parameters, got {type(params)}")
    adapters: dict[Any, Any] = {}
    base: dict[Any, Any] = {}
    for key, val in params.items():
        if is_adapter_key(key):
            adapters[key] = val
        elif _is_mapping(val):
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
    if not _is_mapping(base):
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
    """Paths of the dicts that hold ``lora_a`` in `params`."""
    return [p for p, _ in adapted_holders(params)]


def num_adapter_params(params: PyTree) -> int:
    """Total number of adapter elements in `params`."""
    adapters, _ = split(params)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


__all__ = [
    "adapter_paths",
    "combine",
    "init",
    "init_adapters",
    "is_adapter_key",
    "is_adapter_path",
    "num_adapter_params",
    "split",
]
