"""`rslora_jax.models.attention` against attention written out in numpy (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rslora_jax.models.attention import attention
from tests._asserts import assert_close

B, T, N, K, H = 2, 7, 4, 2, 8


def _reference(q, k, v, allowed, scale=None, softcap=None):
    """softmax(q k^T * scale [capped]) v over the allowed (b, t, s) keys; GQA by repeating."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    allowed = allowed[:, None]
    logits = np.where(allowed, logits, -np.inf)
    mx = np.max(logits, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    w = np.where(allowed, np.exp(logits - mx), 0.0)
    den = w.sum(-1, keepdims=True)
    w = np.divide(w, den, out=np.zeros_like(w), where=den > 0)
    return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.fixture(scope="module")
def qkv():
    keys = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(keys[0], (B, T, N, H)),
        jax.random.normal(keys[1], (B, T, K, H)),
        jax.random.normal(keys[2], (B, T, K, H)),
    )


def _causal(t, s, offset=0):
    qp = np.arange(t)[:, None] + offset
    return np.broadcast_to(np.arange(s)[None, :] <= qp, (B, t, s))


def test_causal_and_window(qkv):
    q, k, v = qkv
    assert_close(attention(q, k, v), _reference(q, k, v, _causal(T, T)), rel=1e-5)
    pos = np.arange(T)
    window = _causal(T, T) & (pos[:, None] - pos[None, :] < 3)
    assert_close(attention(q, k, v, window=3), _reference(q, k, v, window), rel=1e-5)


def test_packed_segments_never_cross_and_padding_is_zero(qkv):
    q, k, v = qkv
    seg = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 2, 2, 2, 2, 3, 3]])
    allowed = _causal(T, T) & (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    got = attention(q, k, v, segment_ids=jnp.asarray(seg))
    assert_close(got, _reference(q, k, v, allowed), rel=1e-5)
    assert float(jnp.abs(got[0, 6]).max()) == 0.0  # padding attends to nothing


def test_decode_queries_against_a_partly_filled_cache(qkv):
    q, k, v = qkv
    # two new tokens at positions 4 and 5 against a cache of 7 slots of which 6 are filled
    qp = jnp.broadcast_to(jnp.array([4, 5]), (B, 2))
    kp = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = jnp.broadcast_to(jnp.arange(T) < 6, (B, T))
    got = attention(q[:, :2], k, v, q_positions=qp, k_positions=kp, k_valid=valid)
    allowed = _causal(2, T, offset=4) & np.asarray(valid)[:, None, :]
    assert_close(got, _reference(q[:, :2], k, v, allowed), rel=1e-5)


def test_softcap_and_scale(qkv):
    q, k, v = qkv
    got = attention(q, k, v, softcap=2.0, scale=0.3)
    assert_close(got, _reference(q, k, v, _causal(T, T), scale=0.3, softcap=2.0), rel=1e-5)
