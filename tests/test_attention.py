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


# ------------------------------------------------------------------------------- blocked (CPU)
TB = 21  # not a multiple of the blocks below: the last block is shorter


@pytest.fixture(scope="module")
def qkv_long():
    keys = jax.random.split(jax.random.key(1), 4)
    shape_q, shape_kv = (B, TB, N, H), (B, TB, K, H)
    return (
        jax.random.normal(keys[0], shape_q),
        jax.random.normal(keys[1], shape_kv),
        jax.random.normal(keys[2], shape_kv),
        jax.random.normal(keys[3], shape_q),  # a cotangent
    )


def _window_mask(t, window):
    pos = np.arange(t)
    allowed = _causal(t, t)
    if window is not None:
        allowed = allowed & (pos[:, None] - pos[None, :] < window)
    return allowed


@pytest.mark.parametrize(
    ("block", "chunk", "window"),
    [(8, 1, None), (8, B * K, None), (5, 2, 4), (32, 1, 9), (4, 4, 2)],
)
def test_blocked_matches_reference_values_and_gradients(qkv_long, block, chunk, window):
    """Values against the numpy formula; gradients against XLA's attention (another code path):
    blocks shorter than the sequence, a last short block, windows within and across blocks, one
    head group per loop step and all at once."""
    from rslora_jax.models.attention import blocked_attention

    q, k, v, dout = qkv_long

    def blocked(q, k, v):
        return blocked_attention(q, k, v, window=window, block=block, chunk=chunk)

    got = jax.jit(blocked)(q, k, v)
    assert_close(got, _reference(q, k, v, _window_mask(TB, window)), rel=1e-5)

    def xla(q, k, v):
        return attention(q, k, v, window=window, impl="xla")

    grads = jax.jit(lambda *a: jax.vjp(blocked, *a)[1](dout))(q, k, v)
    want = jax.jit(lambda *a: jax.vjp(xla, *a)[1](dout))(q, k, v)
    for name, g, w in zip("qkv", grads, want):
        assert_close(g, w, rel=1e-5, what=f"d{name}")


def test_blocked_scale_and_bf16(qkv_long):
    from rslora_jax.models.attention import blocked_attention

    q, k, v, _ = qkv_long
    ref = _reference(q, k, v, _causal(TB, TB), scale=0.3)
    assert_close(blocked_attention(q, k, v, scale=0.3, block=8), ref, rel=1e-5)
    # A traced scale multiplies q instead of being a static constant.
    traced = jax.jit(lambda s: blocked_attention(q, k, v, scale=s, block=8))(jnp.float32(0.3))
    assert_close(traced, ref, rel=1e-5)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = blocked_attention(q16, k16, v16, scale=0.3, block=8)
    assert got.dtype == jnp.bfloat16
    ref16 = _reference(q16.astype(jnp.float32), k16.astype(jnp.float32), v16, _causal(TB, TB), 0.3)
    assert_close(got, ref16, rel=2e-2)
    g = jax.grad(lambda q: blocked_attention(q, k16, v16, block=8).astype(jnp.float32).sum())(q16)
    assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())


def test_cpu_default_is_blocked_from_the_threshold_and_xla_stays(qkv_long, monkeypatch):
    import rslora_jax.models.attention as attention_module
    from rslora_jax.models.attention import materialises_scores

    q, k, v, _ = qkv_long
    assert jax.default_backend() == "cpu"

    def uses_blocked(**kw):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, **kw))(q, k, v))
        return "custom_vjp_call" in jaxpr  # the blocked kernel's custom VJP

    assert TB < attention_module.BLOCKED_MIN_LENGTH and not uses_blocked()
    assert materialises_scores(None, TB) and not materialises_scores(None, 4096)
    assert uses_blocked(impl="blocked") and not materialises_scores("blocked", TB)
    monkeypatch.setattr(attention_module, "BLOCKED_MIN_LENGTH", TB)
    assert uses_blocked() and not uses_blocked(impl="xla")
    assert materialises_scores("xla") and not materialises_scores("cudnn")
    # The masked cases keep the masked path whatever impl says.
    seg = jnp.ones((B, TB), jnp.int32)
    got = attention(q, k, v, segment_ids=seg, impl="blocked")
    assert_close(got, _reference(q, k, v, _causal(TB, TB)), rel=1e-5)


def test_blocked_rejects_bad_shapes_and_chunks(qkv_long):
    from rslora_jax.models.attention import blocked_attention

    q, k, v, _ = qkv_long
    with pytest.raises(ValueError, match=r"chunk dividing batch x key/value heads = 4"):
        blocked_attention(q, k, v, chunk=3)
    with pytest.raises(ValueError, match=r"N divisible by K"):
        blocked_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))


def test_llama_blocked_attention_matches_xla_loss_and_grads():
    from rslora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss, init_params

    cfg = LlamaConfig.tiny(max_position_embeddings=64)
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 41), 0, cfg.vocab_size)

    def loss(p, impl):
        model = LlamaForCausalLM(cfg.replace(attention_impl=impl))
        return causal_lm_loss(model.apply({"params": p}, ids[:, :-1]), ids[:, 1:])

    got = jax.jit(jax.value_and_grad(lambda p: loss(p, "blocked")))(params)
    want = jax.jit(jax.value_and_grad(lambda p: loss(p, "xla")))(params)
    assert_close(got[0], want[0], rel=1e-6)
    assert_close(got[1], want[1], rel=1e-5)
