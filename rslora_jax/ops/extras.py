"""The extras beyond the adapters (`rslora_jax.core.extras`): creating them, writing them over
the base before a forward pass, and folding them in when merging.

- `init_extras`: the extras' entries for a params tree (copies and rows read the base's
  values, in ``config.dtype``; embedding factors as PEFT draws them: A zero, B ~ N(0, 1); the
  bias on B zero), so the model's output is unchanged at first.
- `substitute`: the trained copies and rows written over the base leaves they replace (cast to
  the base leaf's dtype), and their entries removed; differentiable, so gradients reach exactly
  the copies and rows. The embedding factors and the bias on B stay for the forward pass.
- `fold`: everything folded in (float32, cast once): `substitute`, then ``E + gamma * A @ B``
  for each adapted embedding table and ``bias + gamma * b`` for each bias on B. The method's
  own leaves are left to `rslora_jax.ops.merge`.
- `unfold`: the inverse of `fold` where one exists (embedding LoRA, bias on B); trained copies
  and rows replace the base's values, which a merged tree no longer holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core import extras as ex
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.sites import path_key
from rslora_jax.core.tree import has_shape, is_adapter_key, join_path, set_in
from rslora_jax.execution.quant import is_quantized

_HIGHEST = jax.lax.Precision.HIGHEST
# Keys derived for the extras do not disturb the method's draws.
_EXTRAS_SALT = 0x5EED


def _get(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _values(leaf: Any, what: str) -> Any:
    if is_quantized(leaf):
        raise ValueError(
            f"{what} is quantized; a trained copy or token rows need its float values: leave it "
            "out of rslora_jax.quantize (exclude=...)"
        )
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ValueError(
            f"{what} copies the base's values, but the params are abstract "
            "(jax.ShapeDtypeStruct); pass arrays, or trace with the params as an argument "
            "(jax.eval_shape(lambda p: rslora_jax.init_adapters(p, config, key), params))"
        )
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"{what} is not a float array ({leaf.dtype}); it cannot be trained")
    return leaf


def _copy(tree: Mapping[str, Any], dtype: Any, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in tree.items():
        if is_adapter_key(key):
            continue
        if isinstance(val, Mapping):
            sub = _copy(val, dtype, f"{where}/{key}")
            if sub:
                out[key] = sub
        elif has_shape(val):
            out[key] = jnp.array(_values(val, f"{where}/{key}"), dtype=dtype)
    return out


def init_extras(
    params: PyTree, config: LoraConfig, key: PRNGKey, plan: ex.Plan | None = None
) -> PyTree:
    """The extras' entries for `params` (an adapter tree; `combine` puts them in place).

    Args:
      params: the base tree (arrays; copies and rows read its values).
      config: the config.
      key: a PRNG key (embedding factors).
      plan: `rslora_jax.core.extras.plan` of `params` and `config`, if already made.

    Returns:
      Nested dicts with ``lora_full`` / ``lora_tokens`` sub-trees and ``lora_embedding_a`` /
      ``lora_embedding_b`` / ``lora_bias`` leaves where the config asks for them.

    Raises:
      ValueError: as `rslora_jax.core.extras.plan`; and abstract or non-float leaves to copy.

    Example:
      >>> p = {"embed": {"embedding": jnp.arange(12.0).reshape(6, 2)},
      ...      "q": {"kernel": jnp.ones((2, 2))}}
      >>> out = init_extras(p, LoraConfig(rank=1, trainable_token_indices=[4]), jax.random.key(0))
      >>> out["embed"]["lora_tokens"]["embedding"].tolist()
      [[8.0, 9.0]]
    """
    plan = plan if plan is not None else ex.plan(params, config)
    dtype = config.dtype
    key = jax.random.fold_in(key, _EXTRAS_SALT)
    out: dict[str, Any] = {}
    for m in plan.saved:
        copy = _copy(_get(params, m.keys), dtype, m.path or "<root>")
        set_in(out, (*m.keys, ex.FULL), copy)
    for m in plan.biases:
        bias = _values(_get(params, m.keys)[ex.BIAS_LEAF], f"{m.path}/bias")
        set_in(out, (*m.keys, ex.FULL, ex.BIAS_LEAF), jnp.array(bias, dtype=dtype))
    for t in plan.tokens:
        table = _values(_get(params, t.keys)[t.leaf], f"{t.path}/{t.leaf}")
        rows = jnp.take(table, jnp.asarray(t.ids, jnp.int32), axis=t.axis).astype(dtype)
        set_in(out, (*t.keys, ex.TOKENS, t.leaf), rows)
    for e in plan.embeddings:
        set_in(out, (*e.keys, ex.EMBEDDING_A), jnp.zeros((e.vocab, e.rank), dtype))
        b = jax.random.normal(path_key(key, e.path), (e.rank, e.dim), jnp.float32)
        set_in(out, (*e.keys, ex.EMBEDDING_B), b.astype(dtype))
    if plan.lora_bias:
        for s in plan.sites:
            shape = (*s.layout.layer_shape, s.layout.d_out)
            set_in(out, (*s.keys, ex.BIAS), jnp.zeros(shape, dtype))
    return out


# ---------------------------------------------------------------------------- forward
def token_ids(config: LoraConfig, path: str, leaf: str) -> tuple[int, ...]:
    """The token ids of the rows stored for `path`/`leaf` (the list form names the embedding).

    Raises:
      ValueError: the config has no ids for that table.
    """
    spec = config.trainable_token_indices
    ids = config.token_indices_for(path)
    if ids is None and spec and isinstance(spec[0], int) and leaf == ex.EMBEDDING:
        ids = spec
    if ids is None:
        raise ValueError(
            f"{path}/{ex.TOKENS} holds trainable token rows, but LoraConfig."
            f"trainable_token_indices={spec!r} gives no token ids for {path!r}: build the "
            "config the adapters were made with"
        )
    return ids


def _token_axis(config: LoraConfig, path: str, leaf: str, table: Any) -> int:
    if leaf == ex.EMBEDDING:
        return 0
    return config.axes_for(path, table.shape).index("o")


def _write_rows(table: Any, rows: Any, ids: tuple[int, ...], axis: int, where: str) -> Any:
    want = list(table.shape)
    want[axis] = len(ids)
    if tuple(rows.shape) != tuple(want):
        raise ValueError(
            f"{where}: trainable token rows have shape {tuple(rows.shape)}, expected "
            f"{tuple(want)} for {len(ids)} token ids of a table {tuple(table.shape)}"
        )
    index = jnp.asarray(ids, jnp.int32)
    moved = jnp.moveaxis(table, axis, 0)
    written = moved.at[index].set(jnp.moveaxis(rows, axis, 0).astype(table.dtype))
    return jnp.moveaxis(written, 0, axis)


def _replace(base: Any, copy: Any, where: str) -> Any:
    if isinstance(copy, Mapping):
        if not isinstance(base, Mapping):
            raise ValueError(f"{where}: a trained copy of a module where the base has a leaf")
        out = dict(base)
        for key, val in copy.items():
            if key not in base:
                raise ValueError(
                    f"{where}/{key}: a trained copy of a leaf the base does not have; keys "
                    f"there: {sorted(map(str, base))}"
                )
            out[key] = _replace(base[key], val, f"{where}/{key}")
        return out
    if not has_shape(base) or tuple(base.shape) != tuple(copy.shape):
        raise ValueError(
            f"{where}: the trained copy has shape {tuple(copy.shape)}, the base leaf "
            f"{tuple(getattr(base, 'shape', ()))}"
        )
    return copy.astype(base.dtype)


def substitute(params: PyTree, config: LoraConfig) -> PyTree:
    """`params` with every trained copy and token row written over the base leaf it replaces
    (cast to that leaf's dtype), their entries removed. Trees without them come back as they are.

    Raises:
      ValueError: a copy or rows that do not fit the base leaf, or rows without token ids in
        `config`.

    Example:
      >>> p = {"n": {"scale": jnp.ones(2), "lora_full": {"scale": jnp.full(2, 3.0)}}}
      >>> substitute(p, LoraConfig())["n"]["scale"].tolist()
      [3.0, 3.0]
    """
    if not _has_keys(params, (ex.FULL, ex.TOKENS)):
        return params
    return _substitute(params, config, ())


def _has_keys(tree: Any, keys: tuple[str, ...]) -> bool:
    if not isinstance(tree, Mapping):
        return False
    return any(k in keys or _has_keys(v, keys) for k, v in tree.items())


def _substitute(tree: Any, config: LoraConfig, prefix: tuple) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    path = join_path(prefix)
    out = {
        k: (v if is_adapter_key(k) else _substitute(v, config, (*prefix, k)))
        for k, v in tree.items()
        if k not in (ex.FULL, ex.TOKENS)
    }
    if ex.FULL in tree:
        out = _replace(out, tree[ex.FULL], f"{path}/{ex.FULL}")
    for leaf, rows in (tree.get(ex.TOKENS) or {}).items():
        if leaf not in out:
            raise ValueError(f"{path}/{ex.TOKENS}/{leaf}: the base has no {leaf!r} there")
        ids = token_ids(config, path, leaf)
        axis = _token_axis(config, path, leaf, out[leaf])
        out[leaf] = _write_rows(out[leaf], rows, ids, axis, f"{path}/{ex.TOKENS}/{leaf}")
    return out


# ---------------------------------------------------------------------------- merge
def embedding_update(holder: Mapping[str, Any], path: str, config: LoraConfig) -> jax.Array:
    """``E + gamma * A @ B`` (float32) for an adapted embedding table's dict.

    Raises:
      ValueError: factors that do not fit the table, or a rank other than the config's.
    """
    table = holder[ex.EMBEDDING]
    a, b = holder[ex.EMBEDDING_A], holder[ex.EMBEDDING_B]
    vocab, dim = table.shape
    r = config.rank_for(path)
    if a.shape != (vocab, r) or b.shape != (r, dim):
        raise ValueError(
            f"embedding adapter at {path!r}: lora_embedding_a {tuple(a.shape)}, lora_embedding_b "
            f"{tuple(b.shape)}; expected ({vocab}, {r}) and ({r}, {dim}) for the table "
            f"{tuple(table.shape)} at rank {r}"
        )
    f32 = jnp.float32
    ab = jnp.matmul(a.astype(f32), b.astype(f32), precision=_HIGHEST)
    return table.astype(f32) + f32(config.scale_for(path)) * ab


def bias_update(holder: Mapping[str, Any], path: str, config: LoraConfig, sign: float = 1.0):
    """``bias + sign * gamma * b`` (float32, the bias's shape) for a dict with a bias on B.

    Raises:
      ValueError: the layer has no bias to fold it into (as PEFT), or the shapes differ.
    """
    b = holder[ex.BIAS]
    if ex.BIAS_LEAF not in holder:
        raise ValueError(
            f"cannot merge the bias on B (lora_bias) at {path!r}: the layer has no bias to fold "
            "it into (PEFT refuses this merge too); keep the adapter unmerged, or train with "
            "lora_bias=False"
        )
    bias = holder[ex.BIAS_LEAF]
    if int(b.size) != int(bias.size):
        raise ValueError(
            f"lora_bias at {path!r} has shape {tuple(b.shape)}, the layer's bias {tuple(bias.shape)}"
        )
    f32 = jnp.float32
    delta = f32(sign * config.scale_for(path)) * b.astype(f32).reshape(bias.shape)
    return bias.astype(f32) + delta


def fold(params: PyTree, config: LoraConfig, *, embeddings: set[str] | None = None) -> PyTree:
    """`params` with every extra folded in (float32, cast once): trained copies and rows
    written, ``E + gamma*A@B`` for adapted embedding tables, ``bias + gamma*b`` for biases on
    B. The method's leaves (``lora_a``, ...) stay, for `rslora_jax.ops.merge`.

    Args:
      params: a tree with adapters and extras.
      config: the config.
      embeddings: only these embedding tables (all when None); copies, rows and biases on B are
        folded only when this is None.

    Raises:
      ValueError: as `substitute`, `embedding_update` and `bias_update`.

    Example:
      >>> p = {"e": {"embedding": jnp.zeros((3, 2)), "lora_embedding_a": jnp.ones((3, 1)),
      ...            "lora_embedding_b": jnp.ones((1, 2))}}
      >>> fold(p, LoraConfig(rank=1, alpha=2.0))["e"]["embedding"].tolist()
      [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    if embeddings is None:
        params = substitute(params, config)
    return _fold(params, config, (), embeddings)


def _fold(tree: Any, config: LoraConfig, prefix: tuple, only: set[str] | None) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    path = join_path(prefix)
    out = {
        k: (v if is_adapter_key(k) else _fold(v, config, (*prefix, k), only))
        for k, v in tree.items()
    }
    if ex.EMBEDDING_A in tree and (only is None or path in only):
        table = tree[ex.EMBEDDING]
        out[ex.EMBEDDING] = embedding_update(tree, path, config).astype(table.dtype)
        del out[ex.EMBEDDING_A], out[ex.EMBEDDING_B]
    if ex.BIAS in tree and only is None:
        out[ex.BIAS_LEAF] = bias_update(tree, path, config).astype(tree[ex.BIAS_LEAF].dtype)
        del out[ex.BIAS]
    return out


def unfold(full: PyTree, config: LoraConfig) -> PyTree:
    """The inverse of `fold` for a merged tree with the extras put back (`combine`): the
    embedding updates and biases on B are subtracted; their entries removed.

    Raises:
      ValueError: trained copies or token rows, which replaced values a merged tree no longer
        holds.
    """
    found = _find(full, (ex.FULL, ex.TOKENS), ())
    if found:
        raise ValueError(
            f"unmerge cannot recover the base values that trained copies or token rows replaced "
            f"(at {found[:5]}); keep the base tree (rslora_jax.split) instead of unmerging"
        )
    return _unfold(full, config, ())


def _find(tree: Any, keys: tuple[str, ...], prefix: tuple) -> list[str]:
    if not isinstance(tree, Mapping):
        return []
    out = [join_path((*prefix, k)) for k in tree if k in keys]
    for k, v in tree.items():
        if not is_adapter_key(k):
            out.extend(_find(v, keys, (*prefix, k)))
    return out


def _unfold(tree: Any, config: LoraConfig, prefix: tuple) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    path = join_path(prefix)
    out = {
        k: (v if is_adapter_key(k) else _unfold(v, config, (*prefix, k))) for k, v in tree.items()
    }
    if ex.EMBEDDING_A in tree:
        table = tree[ex.EMBEDDING]
        f32 = jnp.float32
        a, b = tree[ex.EMBEDDING_A].astype(f32), tree[ex.EMBEDDING_B].astype(f32)
        ab = jnp.matmul(a, b, precision=_HIGHEST)
        value = table.astype(f32) - f32(config.scale_for(path)) * ab
        out[ex.EMBEDDING] = value.astype(table.dtype)
        del out[ex.EMBEDDING_A], out[ex.EMBEDDING_B]
    if ex.BIAS in tree:
        out[ex.BIAS_LEAF] = bias_update(tree, path, config, -1.0).astype(tree[ex.BIAS_LEAF].dtype)
        del out[ex.BIAS]
    return out


def embedding_paths(params: PyTree) -> set[str]:
    """Paths of the dicts holding embedding adapters."""
    return {join_path(k) for k, d in ex.modules(params) if ex.EMBEDDING_A in d}


__all__ = [
    "bias_update",
    "embedding_paths",
    "embedding_update",
    "fold",
    "init_extras",
    "substitute",
    "token_ids",
    "unfold",
]
