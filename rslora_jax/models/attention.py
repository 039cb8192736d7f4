"""Attention for the built-in models: one function, every mask the families need.

`attention(q, k, v, ...)` computes grouped-query attention (``q`` has ``N`` heads, ``k``/``v``
``K`` heads, ``N % K == 0``) with, all optional:

- a causal mask (``causal=True``), from positions when given (``q_positions`` / ``k_positions``:
  a query at position p sees keys at positions <= p; needed when queries and keys are not aligned,
  e.g. decoding with a key/value cache);
- a sliding window (``window=w``: a query sees itself and the ``w - 1`` keys before it, as
  transformers' ``sliding_window``);
- segment ids (``q_segment_ids`` / ``k_segment_ids``, or ``segment_ids`` for both): several
  examples packed in one row never attend across a boundary; id 0 marks padding, which attends to
  nothing and is attended by nothing;
- ``k_valid`` (B, S) boolean: keys that exist (a partly filled cache);
- a logit soft cap (``softcap=c``: ``c * tanh(logits / c)``, Gemma 2) and the query scale
  (``scale``, default ``1/sqrt(head_dim)``).

With none of the extras (causal, no positions, no segments, no soft cap) it calls
`jax.nn.dot_product_attention` with ``is_causal=True`` (cuDNN flash attention on GPUs with
``impl="cudnn"``); otherwise it builds the boolean mask and calls the same function with
``mask=`` (``impl="xla"`` when a soft cap is asked for, which that function does not have: then the
logits are computed here, in float32).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax._types import Array


def attention_mask(
    q_positions: Array,
    k_positions: Array,
    *,
    causal: bool = True,
    window: int | None = None,
    q_segment_ids: Array | None = None,
    k_segment_ids: Array | None = None,
    k_valid: Array | None = None,
) -> Array:
    """The boolean mask (B, 1, T, S): True where query t may attend to key s.

    Example:
      >>> import jax.numpy as jnp
      >>> pos = jnp.arange(4)[None]
      >>> attention_mask(pos, pos, window=2)[0, 0].astype(int).tolist()
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
      >>> seg = jnp.array([[1, 1, 2, 2]])
      >>> attention_mask(pos, pos, q_segment_ids=seg, k_segment_ids=seg)[0, 0].astype(int).tolist()
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    qp = q_positions[:, :, None]
    kp = k_positions[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    if causal:
        mask = mask & (kp <= qp)
    if window is not None:
        mask = mask & (qp - kp < window)
    if q_segment_ids is not None or k_segment_ids is not None:
        qs = q_segment_ids if q_segment_ids is not None else k_segment_ids
        ks = k_segment_ids if k_segment_ids is not None else q_segment_ids
        mask = mask & (qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] > 0)
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    return mask[:, None]


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    q_positions: Array | None = None,
    k_positions: Array | None = None,
    segment_ids: Array | None = None,
    q_segment_ids: Array | None = None,
    k_segment_ids: Array | None = None,
    k_valid: Array | None = None,
    softcap: float | None = None,
    impl: str | None = None,
) -> Array:
    """Grouped-query attention (see the module docstring).

    Args:
      q: (B, T, N, H) queries.
      k: (B, S, K, H) keys.
      v: (B, S, K, H) values.
      scale: the logit scale (default ``H ** -0.5``).
      causal: mask future keys.
      window: sliding window length, or None.
      q_positions: (B, T) query positions (default ``arange(T)``).
      k_positions: (B, S) key positions (default ``arange(S)``).
      segment_ids: (B, T) ids of packed examples, for queries and keys (T == S).
      q_segment_ids: (B, T), overrides `segment_ids` for queries.
      k_segment_ids: (B, S), overrides `segment_ids` for keys.
      k_valid: (B, S) which keys exist.
      softcap: Gemma 2's logit soft cap, or None.
      impl: `jax.nn.dot_product_attention`'s ``implementation`` (None, ``"xla"``, ``"cudnn"``).

    Returns:
      (B, T, N, H) in q's dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
      >>> full = attention(q, k, v)
      >>> seg = jnp.array([[1, 1, 1, 2, 2]])
      >>> packed = attention(q, k, v, segment_ids=seg)
      >>> bool(jnp.allclose(packed[:, :3], full[:, :3], atol=1e-6))  # first example unchanged
      True
    """
    b, t = q.shape[:2]
    s = k.shape[1]
    q_seg = q_segment_ids if q_segment_ids is not None else segment_ids
    k_seg = k_segment_ids if k_segment_ids is not None else segment_ids
    plain = (
        causal
        and q_positions is None
        and k_positions is None
        and q_seg is None
        and k_seg is None
        and k_valid is None
        and softcap is None
    )
    # dot_product_attention promotes bf16 logits to float32 internally, which
    # jax_numpy_dtype_promotion="strict" would reject; the result keeps q's dtype.
    with jax.numpy_dtype_promotion("standard"):
        if plain:
            local = None if window is None else (window - 1, 0)
            return jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=True, local_window_size=local, implementation=impl
            )
        qp = q_positions if q_positions is not None else jnp.broadcast_to(jnp.arange(t), (b, t))
        kp = k_positions if k_positions is not None else jnp.broadcast_to(jnp.arange(s), (b, s))
        mask = attention_mask(
            qp,
            kp,
            causal=causal,
            window=window,
            q_segment_ids=q_seg,
            k_segment_ids=k_seg,
            k_valid=k_valid,
        )
        if softcap is not None:
            return _softcapped(q, k, v, mask, scale, softcap)
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, implementation=impl)
        # A query with no key at all (padding) gets zeros, not an average of masked keys.
        any_key = jnp.any(mask[:, 0], axis=-1)[:, :, None, None]
        return jnp.where(any_key, out, jnp.zeros_like(out))


def _softcapped(q: Array, k: Array, v: Array, mask: Array, scale: Any, cap: float) -> Array:
    """XLA attention with ``cap * tanh(logits / cap)`` logits, float32 softmax."""
    n, kh, h = q.shape[2], k.shape[2], q.shape[3]
    scale = h**-0.5 if scale is None else scale
    qg = q.reshape(*q.shape[:2], kh, n // kh, h).astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32)) * jnp.float32(scale)
    logits = jnp.float32(cap) * jnp.tanh(logits / jnp.float32(cap))
    m = mask[:, :, None]  # (B, 1, 1, T, S) against (B, K, G, T, S)
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(m, probs, 0.0)  # rows with no key at all (padding) give zeros
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(jnp.float32))
    return out.reshape(*q.shape).astype(q.dtype)


__all__ = ["attention", "attention_mask"]
