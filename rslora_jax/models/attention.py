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

``impl="blocked"`` (what ``impl=None`` picks when the default backend is the CPU, from
`BLOCKED_MIN_LENGTH` positions on) computes that
plain causal case (with or without a window) block by block instead: `blocked_attention`, a
flash-attention-style computation in plain JAX. Each block of queries meets only the keys it can
see (the masked upper triangle is never computed), one group of heads at a time so that a block
of scores stays in the CPU's cache, and its backward pass recomputes each block's probabilities
from the saved log-sum-exp (a custom VJP) instead of keeping ``(B, N, T, S)`` probabilities or
recomputing the whole forward pass. XLA's CPU attention materialises the full scores (and, under
the models' ``jax.checkpoint``, recomputes them): on one core, the tiny Llama's floor at 4 x 512
tokens went from 832 to ... ms per step (``benchmarks/README.md``). Other cases (segments, key
validity, positions, soft cap) take the masked path whatever ``impl`` says; GPUs keep XLA's or
cuDNN's kernels.
"""

from __future__ import annotations

import functools
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
      impl: None (``"blocked"`` for the plain causal case of `BLOCKED_MIN_LENGTH` positions or
        more when the default backend is the CPU, else `jax.nn.dot_product_attention`'s own
        choice), ``"xla"``, ``"cudnn"`` (that
        function's ``implementation``) or ``"blocked"`` (`blocked_attention`; plain causal case
        only, the masked path otherwise).

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
    if plain and t == s and _use_blocked(impl, t):
        return blocked_attention(q, k, v, scale=scale, window=window)
    if impl == "blocked":
        impl = None
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


# --------------------------------------------------------------------------------------------
# Blocked (flash-style) attention for the CPU

IMPLS = (None, "xla", "cudnn", "blocked")
# Bytes of one block of scores (queries x keys x heads, float32) that a loop step aims at: the
# size of a CPU core's L2 cache, where the block's exp, products and backward terms then stay.
_BLOCK_BYTES = 1 << 20


# impl=None takes the blocked path on CPUs from this sequence length on; shorter sequences are one
# block, where XLA's attention (scores recomputed under jax.checkpoint) measured as fast.
BLOCKED_MIN_LENGTH = 256


def _use_blocked(impl: str | None, length: int | None = None) -> bool:
    if impl == "blocked":
        return True
    if impl is not None or jax.default_backend() != "cpu":
        return False
    return length is None or length >= BLOCKED_MIN_LENGTH


def materialises_scores(impl: str | None, length: int | None = None, masked: bool = False) -> bool:
    """Whether causal `attention` with ``impl`` over ``length`` positions keeps ``(B, N, T, S)``
    probabilities for its backward pass on the default backend (XLA's kernel), so that
    recomputing it in the backward pass (``jax.checkpoint``) saves memory. False for cuDNN and for
    `blocked_attention`, which keep only the output and a log-sum-exp per query; ``masked`` (the
    call has segment ids, positions or key validity) takes XLA's masked path whatever ``impl``.

    Example:
      >>> materialises_scores("cudnn"), materialises_scores("blocked"), materialises_scores("xla")
      (False, False, True)
      >>> materialises_scores("blocked", masked=True)
      True
    """
    if impl == "cudnn":
        return False
    return masked or not _use_blocked(impl, length)


def block_plan(groups: int, heads_per_group: int, length: int, devices: int = 1) -> tuple[int, int]:
    """``(query block, head groups per loop step)`` of `blocked_attention`.

    The query block is 128 rows, or 64 where 128 rows of scores for one group of heads would
    exceed the cache budget; the groups (batch x key/value heads) are taken a few at a time, as
    many as fit the budget, in a loop (one step for all of them when the computation may be
    sharded over several devices, where a loop over a sharded batch axis would gather it).

    Args:
      groups: batch size x key/value heads.
      heads_per_group: query heads per key/value head.
      length: sequence length (queries = keys).
      devices: devices the computation may be spread over.

    Returns:
      ``(block, chunk)``: query rows per block, and groups per loop step (a divisor of `groups`).

    Example:
      >>> block_plan(16, 2, 512)
      (128, 2)
      >>> block_plan(16, 2, 512, devices=8)
      (128, 16)
    """
    row = heads_per_group * length * 4  # bytes of one query row of scores for one group
    block = 128 if 128 * row <= _BLOCK_BYTES else 64
    block = min(block, length)
    if devices > 1:
        return block, groups
    fit = max(1, _BLOCK_BYTES // (block * row))
    chunk = max(c for c in range(1, groups + 1) if groups % c == 0 and c <= fit)
    return block, chunk


def _key_range(start: int, stop: int, window: int | None) -> int:
    """First key any query in ``[start, stop)`` may see."""
    return 0 if window is None else max(0, start - window + 1)


def _visible(start: int, stop: int, lo: int, window: int | None) -> Array:
    """(stop - start, stop - lo) mask: query ``start + i`` sees key ``lo + j``."""
    qp = jnp.arange(start, stop)[:, None]
    kp = jnp.arange(lo, stop)[None, :]
    mask = kp <= qp
    if window is not None:
        mask = mask & (qp - kp < window)
    return mask


def _forward_blocks(q, k, v, block, window, scale):
    """One loop step's output ``(c, g, T, H)`` (float32) and log-sum-exp ``(c, g, T)``.

    q: (c, g, T, H); k, v: (c, S, H), S == T.
    """
    f32 = jnp.float32
    # float32 throughout (XLA's CPU matmuls have no bf16 x bf16 -> f32 form for all of these).
    q, k, v = (x.astype(f32) for x in (q, k, v))
    t = q.shape[2]
    outs, lses = [], []
    for start in range(0, t, block):
        stop = min(start + block, t)
        lo = _key_range(start, stop, window)
        logits = jnp.einsum("cgth,csh->cgts", q[:, :, start:stop], k[:, lo:stop]) * f32(scale)
        logits = jnp.where(_visible(start, stop, lo, window), logits, -jnp.inf)
        peak = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        pv = jnp.einsum("cgts,csh->cgth", p, v[:, lo:stop])
        outs.append(pv / total)
        lses.append((peak + jnp.log(total))[..., 0])
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _backward_blocks(q, k, v, out, lse, dout, block, window, scale):
    """Gradients ``(dq, dk, dv)`` (float32) of one loop step; shapes as `_forward_blocks`.

    Each block's scores are recomputed transposed, keys x (heads, queries): then ``dv = p^T dout``
    and ``dk = ds^T q`` read them in the layout XLA's CPU matmuls take without a copy, and ``dq``
    is computed transposed too (``k^T ds^T``), so that only small blocks are ever transposed.
    """
    f32 = jnp.float32
    q, k, v, out, dout = (x.astype(f32) for x in (q, k, v, out, dout))
    t = q.shape[2]
    delta = jnp.sum(dout * out, axis=-1)  # (c, g, T)
    dqs = []
    dk = jnp.zeros(k.shape, f32)
    dv = jnp.zeros(v.shape, f32)
    for start in range(0, t, block):
        stop = min(start + block, t)
        lo = _key_range(start, stop, window)
        qb, db = q[:, :, start:stop], dout[:, :, start:stop]
        kb, vb = k[:, lo:stop], v[:, lo:stop]
        logits_t = jnp.einsum("csh,cgth->csgt", kb, qb)
        p_t = jnp.exp(logits_t * f32(scale) - lse[:, None, :, start:stop])
        p_t = jnp.where(_visible(start, stop, lo, window).T[:, None, :], p_t, f32(0))
        dv = dv.at[:, lo:stop].add(jnp.einsum("csgt,cgth->csh", p_t, db))
        dp_t = jnp.einsum("csh,cgth->csgt", vb, db)
        ds_t = p_t * (dp_t - delta[:, None, :, start:stop]) * f32(scale)
        # (c, H, g, t): XLA then transposes the small key block, not the scores.
        dqs.append(jnp.einsum("csh,csgt->chgt", kb, ds_t))
        dk = dk.at[:, lo:stop].add(jnp.einsum("csgt,cgth->csh", ds_t, qb))
    return jnp.concatenate(dqs, axis=3).transpose(0, 2, 3, 1), dk, dv


def _in_steps(fn, chunk, *arrays):
    """``fn`` over the leading (group) axis, ``chunk`` groups per loop step."""
    groups = arrays[0].shape[0]
    if chunk >= groups:
        return fn(*arrays)
    split = [a.reshape(groups // chunk, chunk, *a.shape[1:]) for a in arrays]
    outs = jax.lax.map(lambda xs: fn(*xs), split)
    return tuple(o.reshape(groups, *o.shape[2:]) for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _blocked(q, k, v, block, chunk, window, scale):
    return _blocked_fwd(q, k, v, block, chunk, window, scale)[0]


def _blocked_fwd(q, k, v, block, chunk, window, scale):
    def step(q, k, v):
        return _forward_blocks(q, k, v, block, window, scale)

    out, lse = _in_steps(step, chunk, q, k, v)
    out = out.astype(q.dtype)
    return out, (q, k, v, out, lse)


def _blocked_bwd(block, chunk, window, scale, res, dout):
    q, k, v, _, _ = res

    def step(q, k, v, out, lse, dout):
        return _backward_blocks(q, k, v, out, lse, dout, block, window, scale)

    dq, dk, dv = _in_steps(step, chunk, *res, dout)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: Any = None,
    window: int | None = None,
    block: int | None = None,
    chunk: int | None = None,
) -> Array:
    """Causal grouped-query attention computed block by block (flash-attention style), for CPUs.

    Queries and keys are aligned (``T == S``, position ``i`` sees keys ``<= i``, and with a
    window the ``window - 1`` before it too). Blocks of queries meet only the keys they can see;
    each block's softmax is taken whole (float32 logits, max-subtracted), so the forward pass
    needs no running rescale; the custom VJP saves the output and the log-sum-exp and recomputes
    each block's probabilities. Heads are processed in groups (a `jax.lax.map`) so that a block of
    scores stays in cache; see `block_plan`.

    Args:
      q: (B, T, N, H) queries.
      k: (B, T, K, H) keys, ``N % K == 0``.
      v: (B, T, K, H) values.
      scale: the logit scale (default ``H ** -0.5``); a traced scale multiplies ``q`` instead.
      window: sliding window length, or None.
      block: query rows per block (default from `block_plan`).
      chunk: key/value head groups (of the ``B * K``) per loop step (default from `block_plan`;
        must divide ``B * K``).

    Returns:
      (B, T, N, H) in q's dtype.

    Raises:
      ValueError: if the shapes do not fit (``S != T``, ``N % K``), or `chunk` does not divide
        ``B * K``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 6, 2, 4))
      >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      >>> bool(jnp.allclose(blocked_attention(q, k, v, block=4), ref, atol=1e-5))
      True
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    if k.shape[:2] != (b, t) or v.shape != k.shape or n % kh or k.shape[3] != h:
        raise ValueError(
            f"blocked_attention: q {q.shape}, k {k.shape}, v {v.shape}: expected (B, T, N, H) "
            "queries and (B, T, K, H) keys and values with N divisible by K"
        )
    g = n // kh
    groups = b * kh
    plan = block_plan(groups, g, t, devices=jax.device_count())
    block = plan[0] if block is None else int(block)
    chunk = plan[1] if chunk is None else int(chunk)
    if block < 1 or chunk < 1 or groups % chunk:
        raise ValueError(
            f"blocked_attention: block={block}, chunk={chunk}: expected positive values, chunk "
            f"dividing batch x key/value heads = {groups}"
        )
    scale = h**-0.5 if scale is None else scale
    if not isinstance(scale, int | float):
        q = q * jnp.asarray(scale, q.dtype)
        scale = 1.0
    # (B, T, N, H) -> (B*K, G, T, H); keys and values (B, T, K, H) -> (B*K, T, H).
    qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(groups, g, t, h)
    kg = k.transpose(0, 2, 1, 3).reshape(groups, t, h)
    vg = v.transpose(0, 2, 1, 3).reshape(groups, t, h)
    out = _blocked(qg, kg, vg, block, chunk, window, float(scale))
    return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


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


__all__ = [
    "BLOCKED_MIN_LENGTH",
    "IMPLS",
    "attention",
    "attention_mask",
    "block_plan",
    "blocked_attention",
    "materialises_scores",
]
