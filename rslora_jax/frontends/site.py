"""One adapted layer, from a frontend's view: ask the method, then the dispatch.

Shared by the linen interceptor (`rslora_jax.frontends.linen`), the NNX layers
(`rslora_jax.frontends.nnx`) and the built-in models' grouped projections: a frontend describes
the layer as a `rslora_jax.execution.dispatch.Contraction`, `method_inputs` gets the factor pair
and column rescale from the config's method, and `rslora_jax.execution.dispatch` computes. A bias on B (PEFT's ``lora_bias``,
`rslora_jax.core.extras`) is taken out of the leaves before the method sees them and added to
the output: ``y + gamma * b`` (`split_bias`, `add_bias`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax.core import extras as ex
from rslora_jax.core.claim import Claims
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.layout import KernelLayout
from rslora_jax.core.protocol import check_leaf_names
from rslora_jax.core.tree import adapter_leaves
from rslora_jax.execution.dispatch import Contraction, adapted_group
from rslora_jax.execution.quant import dense

DROPOUT_RNG = "lora_dropout"


def method_inputs(
    config: LoraConfig,
    leaves: Mapping[str, Any],
    path: str,
    shared: Mapping[str, Any] | None,
    lin: Contraction,
    rows: Any = None,
) -> tuple[tuple[Any, Any, float], Any]:
    """``((A, B, scale), c)`` for the adapted layer `lin` at `path`: the config's method's factor
    pair and column rescale (None unless the method has one), checked against the kernel as this
    call sees it (one layer's slice inside ``nn.scan``).

    With `rows` (several adapters in one batch), every leaf and the shared entries carry a
    leading adapter axis of ``N`` adapters (after the layer axes ``nn.scan`` slices away: see
    `rslora_jax.ops.stack.stack_adapters`); A, B and c then have that axis too (the method is
    applied to each adapter, `jax.vmap`).

    Raises:
      ValueError: if the leaves are not the method's, or do not fit the kernel.
    """
    if rows is not None:
        return _stacked_inputs(config, leaves, path, shared, lin)
    method = config.method
    check_leaf_names(method, leaves, path)
    a, b, scale = method.pair(leaves, path, config, shared)
    roles = lin.roles
    lay = KernelLayout(roles, lin.kernel.shape)
    if (
        a.shape[-2] != lay.d_in
        or b.shape[-1] != lay.d_out
        or a.shape[-1] != b.shape[-2]
        or tuple(a.shape[:-2]) != lay.layer_shape
    ):
        raise ValueError(
            f"adapter at {path!r} (kernel {tuple(lin.kernel.shape)} with axes {roles!r} in this "
            f"call) expects lora_a ({', '.join(map(str, (*lay.layer_shape, lay.d_in)))}, r) and "
            f"lora_b (..., r, {lay.d_out}); got {tuple(a.shape)} and {tuple(b.shape)}. Check "
            f"LoraConfig.kernel_axes / fan_in_fan_out for this path (here: {roles!r})"
        )
    col = None
    if method.rescales_columns:
        w = lay.from_kernel(dense(lin.kernel, lin.kernel.dtype))  # a quantized base: this layer's
        col = method.column_scale(leaves, path, config, w, a, b, scale)
    return (a, b, scale), col


def split_bias(leaves: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """``(the method's leaves, the bias on B or None)`` of one adapted layer's leaves."""
    rest = {k: v for k, v in leaves.items() if k != ex.BIAS}
    return rest, leaves.get(ex.BIAS)


def add_bias(y: jax.Array, bias: Any, scale: float, path: str) -> jax.Array:
    """``y + scale * bias`` over `y`'s trailing output axes (a no-op for a None bias).

    Raises:
      ValueError: the bias does not match the output's trailing axes.
    """
    if bias is None:
        return y
    size = int(bias.shape[-1])
    n, total = 0, 1
    while total < size and n < y.ndim:
        n += 1
        total *= int(y.shape[y.ndim - n])
    if total != size:
        raise ValueError(
            f"lora_bias at {path!r} has {size} entries, which do not match the trailing axes of "
            f"the layer's output {tuple(y.shape)}"
        )
    b = bias.reshape(y.shape[y.ndim - n :]).astype(jnp.float32) * jnp.float32(scale)
    return y + b.astype(y.dtype)


def _stacked_inputs(
    config: LoraConfig,
    leaves: Mapping[str, Any],
    path: str,
    shared: Mapping[str, Any] | None,
    lin: Contraction,
) -> tuple[tuple[Any, Any, float], Any]:
    """`method_inputs` of stacked adapters (a leading adapter axis on every leaf)."""
    sizes = {name: (leaf.shape[0] if leaf.ndim else None) for name, leaf in leaves.items()}
    sizes.update(
        {f"{key}/...": x.shape[0] if x.ndim else None for key, x in _flat(shared or {}).items()}
    )
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            f"stacked adapters at {path!r}: every adapter leaf (and shared entry) needs the same "
            f"leading adapter axis; got leading sizes {sizes}. Stack the adapter trees with "
            "rslora_jax.ops.stack.stack_adapters"
        )
    first = jax.tree.map(lambda t: t[0], (dict(leaves), dict(shared or {})))
    (_, _, scale), _ = method_inputs(config, first[0], path, first[1] or None, lin)  # checks

    def one(lv: Any, sh: Any) -> tuple[Any, Any, Any]:
        (a, b, _), col = method_inputs(config, lv, path, sh or None, lin)
        return a, b, col

    a, b, col = jax.vmap(one)(dict(leaves), dict(shared or {}))
    return (a, b, scale), col


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def linen_dropout(module: Any, rate: float) -> Callable[[jax.Array], jax.Array] | None:
    """The adapter-input dropout of a linen call, or None when inactive (no rate, or no
    ``rngs={"lora_dropout": key}`` stream). Each call of the result draws a new mask."""
    if rate <= 0.0 or not module.has_rng(DROPOUT_RNG):
        return None

    def drop(x: jax.Array) -> jax.Array:
        keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))

    return drop


def group_output(
    claims: Claims,
    x: jax.Array,
    entries: Sequence[tuple[str, Mapping[str, Any], Contraction, Callable | None]],
    dropout: Callable[[], Callable | None] | None = None,
) -> list[jax.Array]:
    """Outputs of claimed projections that read the same input `x` (a model's fast path).

    Args:
      claims: the running `rslora_jax.core.claim.Claims`.
      x: the shared input.
      entries: ``(path, params dict, contraction, base call)`` per projection.
      dropout: makes each projection's dropout (called once per projection), or None.

    Returns:
      One output per entry.
    """
    pairs, cols, lins, bases, drops, biases = [], [], [], [], [], []
    for path, holder, lin, base in entries:
        leaves, bias = split_bias(adapter_leaves(holder))
        if bias is not None and claims.rows is not None:
            raise ValueError(
                f"adapter_index: the adapters at {path!r} carry a lora_bias, which per-row "
                "(stacked) adapters do not support; serve them one adapter per batch"
            )
        pair, col = method_inputs(claims.config, leaves, path, claims.shared, lin, claims.rows)
        biases.append((bias, path))
        pairs.append(pair)
        cols.append(col)
        lins.append(lin)
        bases.append(base)
        drops.append(dropout() if dropout is not None else None)
    ys = adapted_group(
        x,
        lins,
        pairs,
        bases=bases,
        cols=cols,
        mode=claims.mode,
        dropouts=drops,
        rows=claims.rows,
    )
    return [add_bias(y, b, claims.config.scale_for(path), path) for y, (b, path) in zip(ys, biases)]


__all__ = [
    "DROPOUT_RNG",
    "add_bias",
    "group_output",
    "linen_dropout",
    "method_inputs",
    "split_bias",
]
