"""The key/value cache of the built-in models: decoding one token at a time after a prefill.

A `KVCache` holds every layer's keys and values, ``(L, B, S, K, hd)`` (layers, batch rows, cache
slots, K/V heads, head size), in the compute dtype. Slot ``s`` of a row holds the token at
position ``s``: a prompt is written at slots ``0 .. n-1`` (`init_cache` + one model call over
the prompt, the prefill), then each decoded token at its position. Rows of one batch may be at
different positions (prompts of different lengths, right-padded): attention is causal by
position (`rslora_jax.models.attention.attention` with ``q_positions`` / ``k_positions``), so a
query at position ``p`` sees slots ``0 .. p`` only. Those hold that row's real tokens: a padding
slot past a short prompt is written again by that row's next decoded token before any query
reaches it. A row therefore computes exactly what it computes alone.

A model call with a cache (``model.apply(variables, ids, positions, cache=cache)``) writes the
new tokens' keys and values (`update_cache`, one helper for every layer) and attends over the
whole cache (`attend_cached`); the layers are scanned over the cache's leading axis.

LongRoPE (Phi-3) changes its frequencies once a sequence grows past the pre-training context
(``original_max_position_embeddings``): every key and value computed before, in every layer,
is then stale. A caller decoding across that point runs the prefill again over the whole
sequence, as transformers does (`rslora_jax.generate` does so; `needs_refill` tells when).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rslora_jax._types import Array
from rslora_jax.models.attention import attention
from rslora_jax.models.rope import is_dynamic


class KVCache(NamedTuple):
    """Keys and values of every layer (or of one layer, inside the scan over layers).

    Attributes:
      k: ``(L, B, S, K, hd)`` keys (``(B, S, K, hd)`` for one layer), RoPE applied.
      v: values, same shape.
    """

    k: Array
    v: Array

    @property
    def length(self) -> int:
        """The number of slots (the longest sequence the cache holds)."""
        return int(self.k.shape[-3])

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values."""
        return int(self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize)

    def layer(self, i: int) -> KVCache:
        """Layer `i`'s cache."""
        return KVCache(self.k[i], self.v[i])


def init_cache(config: Any, batch: int, length: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch` rows of up to `length` tokens.

    Args:
      config: the model config (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``,
        ``dtype``).
      batch: rows.
      length: slots per row (prompt plus new tokens).
      dtype: the cache's dtype (default: the model's compute dtype).

    Returns:
      A zero `KVCache` of shape ``(L, batch, length, K, hd)``.

    Example:
      >>> from rslora_jax.models.llama import LlamaConfig
      >>> init_cache(LlamaConfig.tiny(), 2, 10).k.shape
      (2, 2, 10, 2, 8)
    """
    shape = (
        config.num_hidden_layers,
        batch,
        length,
        config.num_key_value_heads,
        config.head_dim,
    )
    dtype = jnp.dtype(dtype if dtype is not None else config.dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def update_cache(cache: KVCache, k: Array, v: Array, positions: Array) -> KVCache:
    """One layer's cache with the new keys and values written at their positions.

    Args:
      cache: the layer's cache, ``(B, S, K, hd)``.
      k: ``(B, T, K, hd)`` new keys.
      v: ``(B, T, K, hd)`` new values.
      positions: ``(B, T)`` their positions (= slots), each below ``S``.

    Returns:
      The updated cache. One new token per row (decoding) is a select against the slot index,
      which shards like the cache; several (the prefill) a scatter.
    """
    k = k.astype(cache.k.dtype)
    v = v.astype(cache.v.dtype)
    if k.shape[1] == 1:
        slots = jnp.arange(cache.k.shape[1], dtype=positions.dtype)
        hit = (slots[None, :] == positions)[:, :, None, None]  # (B, S, 1, 1)
        return KVCache(jnp.where(hit, k, cache.k), jnp.where(hit, v, cache.v))
    rows = jnp.arange(k.shape[0])[:, None]
    return KVCache(cache.k.at[rows, positions].set(k), cache.v.at[rows, positions].set(v))


def attend_cached(
    q: Array, k: Array, v: Array, cache: KVCache, positions: Array, **kwargs: Any
) -> tuple[Array, KVCache]:
    """Attention of the new queries over the cache, after writing the new keys and values.

    Args:
      q: ``(B, T, N, hd)`` queries of the new tokens.
      k: ``(B, T, K, hd)`` their keys.
      v: ``(B, T, K, hd)`` their values.
      cache: the layer's cache.
      positions: ``(B, T)`` positions of the new tokens.
      **kwargs: passed to `rslora_jax.models.attention.attention` (``window``, ``softcap``,
        ``scale``, ``impl``).

    Returns:
      ``(output (B, T, N, hd), updated cache)``.

    Example:
      >>> import jax
      >>> from rslora_jax.models.llama import LlamaConfig
      >>> cache = init_cache(LlamaConfig.tiny(), 1, 6).layer(0)
      >>> q = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
      >>> kv = jax.random.normal(jax.random.key(1), (1, 4, 2, 8))
      >>> out, cache = attend_cached(q, kv, kv, cache, jnp.arange(4)[None])
      >>> bool(jnp.allclose(out, attention(q, kv, kv), atol=1e-6))
      True
    """
    new = update_cache(cache, k, v, positions)
    b, s = new.k.shape[:2]
    slots = jnp.broadcast_to(jnp.arange(s, dtype=positions.dtype), (b, s))
    out = attention(q, new.k, new.v, q_positions=positions, k_positions=slots, **kwargs)
    return out, new


def needs_refill(config: Any, positions: Array) -> Array:
    """Whether decoding the tokens at `positions` crosses a LongRoPE switch point: a row whose
    sequence grows from ``original_max_position_embeddings`` tokens to one more (its cache,
    filled with the short frequencies, must be recomputed with the long ones). False for
    every model without LongRoPE.

    Args:
      config: the model config (``arch.ropes``).
      positions: ``(B,)`` positions of the tokens about to be decoded.

    Returns:
      ``(B,)`` booleans.

    Example:
      >>> from rslora_jax.models.phi3 import Phi3Config
      >>> cfg = Phi3Config.tiny(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4,
      ...     "long_factor": [2.0] * 4, "original_max_position_embeddings": 8})
      >>> needs_refill(cfg, jnp.array([7, 8, 9])).tolist()
      [False, True, False]
    """
    switch = [
        r.scaling.original_max_position_embeddings for r in config.arch.ropes if is_dynamic(r)
    ]
    out = jnp.zeros(positions.shape, bool)
    for n in sorted(set(switch)):
        out = out | (positions == n)
    return out


def constrain_cache(cache: KVCache, mesh: Any, batch_axes: Any, head_axis: Any) -> KVCache:
    """The cache with a sharding constraint: rows over `batch_axes`, K/V heads over `head_axis`
    (None: not split), for decoding on a device mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    spec = PartitionSpec(None, batch_axes, None, head_axis, None)
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), cache)


__all__ = [
    "KVCache",
    "attend_cached",
    "constrain_cache",
    "init_cache",
    "needs_refill",
    "update_cache",
]
