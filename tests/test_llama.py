"""Tests of the Llama-family model: layouts, scan/remat equivalence, causality, GQA, dtypes.

Numerical references are second code paths written here (unscanned layers, MHA with repeated
K/V heads, merged kernels, a numpy cross-entropy); parity with transformers' PyTorch models is
in test_hf_checkpoint.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rslora_jax.models import (
    LlamaConfig,
    LlamaForCausalLM,
    RopeScaling,
    causal_lm_loss,
    convert_scan,
    init_params,
)
from tests._asserts import assert_close

CFG = LlamaConfig.tiny()  # 2 layers, D=32, 4 query heads, 2 K/V heads (GQA), V=64
B, S = 2, 10


def _perturb(params, seed, scale=0.1):
    """Non-trivial norms and biases: add host-side noise to every leaf."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype),
        params,
    )


@pytest.fixture(scope="module")
def params():
    return _perturb(init_params(CFG, jax.random.key(0)), seed=1)


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(2), (B, S), 0, CFG.vocab_size, jnp.int32)


def _logits(cfg, params, ids, positions=None):
    # Eager: on CPU, op-by-op dispatch of a tiny model is faster than compiling per config.
    return LlamaForCausalLM(cfg).apply({"params": params}, ids, positions)


@pytest.fixture(scope="module")
def logits(params, ids):
    return _logits(CFG, params, ids)


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_param_tree_scanned_layout(params):
    L, D, F, V, hd = 2, 32, 48, 64, 8
    layer = {
        "input_layernorm": {"scale": (L, D)},
        "post_attention_layernorm": {"scale": (L, D)},
        "self_attn": {
            "q_proj": {"kernel": (L, D, 4 * hd)},
            "k_proj": {"kernel": (L, D, 2 * hd)},
            "v_proj": {"kernel": (L, D, 2 * hd)},
            "o_proj": {"kernel": (L, 4 * hd, D)},
        },
        "mlp": {
            "gate_proj": {"kernel": (L, D, F)},
            "up_proj": {"kernel": (L, D, F)},
            "down_proj": {"kernel": (L, F, D)},
        },
    }
    expected = {
        "model": {"embed_tokens": {"embedding": (V, D)}, "layers": layer, "norm": {"scale": (D,)}},
        "lm_head": {"kernel": (D, V)},
    }
    assert _shapes(params) == expected
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_param_tree_unscanned_tied_qwen2_layout():
    cfg = LlamaConfig.tiny(
        model_type="qwen2", attention_bias=True, tie_word_embeddings=True, scan_layers=False
    )
    p = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert set(p) == {"model"}  # tied: no lm_head
    assert set(p["model"]["layers"]) == {"0", "1"}
    attn = _shapes(p["model"]["layers"]["1"]["self_attn"])
    assert attn == {
        "q_proj": {"kernel": (32, 32), "bias": (32,)},
        "k_proj": {"kernel": (32, 16), "bias": (16,)},
        "v_proj": {"kernel": (32, 16), "bias": (16,)},
        "o_proj": {"kernel": (32, 32)},  # Qwen2: no bias on o
    }
    llama_cfg = LlamaConfig.tiny(attention_bias=True, mlp_bias=True)
    llama = jax.eval_shape(lambda k: init_params(llama_cfg, k), jax.random.key(0))
    assert _shapes(llama["model"]["layers"]["self_attn"]["o_proj"]) == {
        "kernel": (2, 32, 32),
        "bias": (2, 32),
    }
    assert _shapes(llama["model"]["layers"]["mlp"]["down_proj"]) == {
        "kernel": (2, 48, 32),
        "bias": (2, 32),
    }


def test_scan_matches_unscanned(params, ids, logits):
    unscanned = convert_scan(params, to_scan=False)
    out = _logits(CFG.replace(scan_layers=False), unscanned, ids)
    assert_close(out, logits, rel=5e-6)  # two float32 code paths (measured: 3e-7)
    assert logits.shape == (B, S, CFG.vocab_size) and logits.dtype == jnp.float32


def test_convert_scan_round_trip(params):
    unscanned = convert_scan(params, to_scan=False)
    # Same structure as a model built unscanned.
    fresh = jax.eval_shape(
        lambda k: init_params(CFG.replace(scan_layers=False), k), jax.random.key(0)
    )
    assert jax.tree.structure(unscanned) == jax.tree.structure(fresh)
    assert _shapes(unscanned) == _shapes(fresh)
    # Layer i of the unscanned tree is slice i of the stacked one.
    np.testing.assert_array_equal(
        unscanned["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"],
        params["model"]["layers"]["mlp"]["up_proj"]["kernel"][1],
    )
    back = convert_scan(unscanned, to_scan=True)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    with pytest.raises(ValueError, match="already scanned"):
        convert_scan(params, to_scan=True)
    with pytest.raises(ValueError, match="already unscanned"):
        convert_scan(unscanned, to_scan=False)
    with pytest.raises(ValueError, match="model/layers"):
        convert_scan({"lm_head": {}}, to_scan=True)


def test_convert_scan_carries_extra_leaves(params):
    p = jax.tree.map(lambda x: x, params)
    q = dict(p["model"]["layers"]["self_attn"]["q_proj"])
    q["lora_a"] = jnp.arange(2 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 3)
    p["model"]["layers"]["self_attn"]["q_proj"] = q
    u = convert_scan(p, to_scan=False)
    np.testing.assert_array_equal(
        u["model"]["layers"]["1"]["self_attn"]["q_proj"]["lora_a"], q["lora_a"][1]
    )


def _loss_and_grads(cfg, params, ids):
    def loss(p):
        return causal_lm_loss(LlamaForCausalLM(cfg).apply({"params": p}, ids[:, :-1]), ids[:, 1:])

    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_same_logits_and_grads(params, ids, logits):
    remat_cfg = CFG.replace(remat=True)
    assert_close(_logits(remat_cfg, params, ids), logits, rel=5e-6, what="scanned")
    unscanned = convert_scan(params, to_scan=False)
    assert_close(
        _logits(remat_cfg.replace(scan_layers=False), unscanned, ids),
        logits,
        rel=5e-6,
        what="unscanned",
    )
    l0, g0 = _loss_and_grads(CFG, params, ids)
    l1, g1 = _loss_and_grads(remat_cfg, params, ids)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert_close(g1, g0, rel=1e-5)
    # The gradient is not trivially zero anywhere.
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g0))


def test_remat_policy_validated():
    cfg = LlamaConfig.tiny(remat=True, remat_policy="nothing_saveable")
    assert cfg.remat_policy == "nothing_saveable"
    with pytest.raises(ValueError, match="remat_policy"):
        LlamaConfig.tiny(remat_policy="not_a_policy")


def test_bf16_compute(params, ids, logits):
    cfg = CFG.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = _logits(cfg, p16, ids)
    assert out.dtype == jnp.bfloat16
    out32 = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out32).all()
    # bf16 has 8 mantissa bits: agree with float32 to a few percent of the logit scale.
    assert_close(out32, logits, rel=0.05, norm="max")
    # Mixed precision training: float32 params, bf16 compute, float32 loss and grads.
    # JAX 0.10's lowering of dot_product_attention's bf16 backward pass calls promote_types
    # (float32, bfloat16), which "strict" promotion rejects: compile under "standard".
    with jax.numpy_dtype_promotion("standard"):
        loss, grads = _loss_and_grads(CFG.replace(dtype="bfloat16"), params, ids)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_causal(params, ids, logits):
    t = 6
    changed = ids.at[:, t].set((ids[:, t] + 1) % CFG.vocab_size)
    out = _logits(CFG, params, changed)
    assert_close(out[:, :t], logits[:, :t], rel=1e-6)
    assert float(jnp.abs(out[:, t:] - logits[:, t:]).max()) > 1e-3


def test_gqa_matches_mha_with_repeated_kv_heads(params, ids, logits):
    """2 K/V heads shared by 4 query heads == 4 K/V heads where each is repeated."""
    groups = CFG.num_attention_heads // CFG.num_key_value_heads
    hd = CFG.head_dim

    def repeat_heads(kernel):  # (L, D, K*hd) -> (L, D, K*G*hd), kv head h -> heads h*G..
        L, D, _ = kernel.shape
        k = kernel.reshape(L, D, CFG.num_key_value_heads, hd)
        return np.repeat(np.asarray(k), groups, axis=2).reshape(L, D, -1)

    mha = jax.tree.map(lambda x: x, params)
    attn = dict(mha["model"]["layers"]["self_attn"])
    for name in ("k_proj", "v_proj"):
        attn[name] = {"kernel": jnp.asarray(repeat_heads(attn[name]["kernel"]))}
    mha["model"]["layers"]["self_attn"] = attn
    mha_cfg = CFG.replace(num_key_value_heads=CFG.num_attention_heads)
    out = _logits(mha_cfg, mha, ids)
    assert_close(out, logits, rel=1e-5)


def test_sliding_window(params, ids, logits):
    mistral = CFG.replace(model_type="mistral")
    wide = _logits(mistral.replace(sliding_window=S), params, ids)
    assert_close(wide, logits, rel=1e-6)
    narrow = _logits(mistral.replace(sliding_window=3), params, ids)
    # Positions 0..2 see at most 3 tokens either way; later positions lose context.
    assert_close(narrow[:, :3], logits[:, :3], rel=1e-6)
    assert float(jnp.abs(narrow[:, 3:] - logits[:, 3:]).max()) > 1e-3


def test_positions_shift_changes_rope(params, ids, logits):
    same = _logits(CFG, params, ids, jnp.arange(S, dtype=jnp.int32))
    assert_close(same, logits, rel=1e-6)
    # RoPE is relative: a constant offset leaves attention scores (and logits) unchanged.
    shifted = _logits(CFG, params, ids, jnp.arange(S, dtype=jnp.int32)[None] + 7)
    assert_close(shifted, logits, rel=1e-5)  # sin/cos of other angles: float32 rounding
    scaled = _logits(CFG, params, ids, 2 * jnp.arange(S, dtype=jnp.int32)[None])
    assert float(jnp.abs(scaled - logits).max()) > 1e-3


def test_causal_lm_loss_matches_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(causal_lm_loss(jnp.asarray(logits), targets), nll.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        causal_lm_loss(jnp.asarray(logits), targets, mask),
        (nll * mask).sum() / mask.sum(),
        rtol=1e-6,
    )
    out = causal_lm_loss(jnp.asarray(logits, jnp.bfloat16), targets)
    assert out.dtype == jnp.float32


def test_extra_leaves_ignored_and_visible_to_interceptors(params, ids, logits):
    """lora_a/lora_b beside a kernel: plain apply ignores them; an interceptor can read them."""
    r, s = 3, 0.5
    a = 0.3 * jax.random.normal(jax.random.key(5), (2, 32, r))
    b = 0.3 * jax.random.normal(jax.random.key(6), (2, r, 32))
    adapted = jax.tree.map(lambda x: x, params)
    q = dict(adapted["model"]["layers"]["self_attn"]["q_proj"])
    q.update(lora_a=a, lora_b=b)
    adapted["model"]["layers"]["self_attn"]["q_proj"] = q
    assert_close(_logits(CFG, adapted, ids), logits, rel=1e-6)

    seen = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if isinstance(mod, nn.Dense) and context.method_name == "__call__":
            seen.append(mod.name)
            if mod.has_variable("params", "lora_a"):
                la = mod.get_variable("params", "lora_a")
                lb = mod.get_variable("params", "lora_b")
                out = out + s * (args[0] @ la) @ lb
        return out

    def apply(p, x):
        with nn.intercept_methods(interceptor):
            return LlamaForCausalLM(CFG).apply({"params": p}, x)

    out = apply(adapted, ids)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(
        seen
    )
    merged = jax.tree.map(lambda x: x, params)
    mq = dict(merged["model"]["layers"]["self_attn"]["q_proj"])
    mq["kernel"] = mq["kernel"] + s * jnp.einsum("ldr,lro->ldo", a, b)
    merged["model"]["layers"]["self_attn"]["q_proj"] = mq
    assert_close(out, _logits(CFG, merged, ids), rel=1e-5)
    assert float(jnp.abs(out - logits).max()) > 1e-3


def test_config_validation():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig.tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="qwen2"):
        LlamaConfig.tiny(model_type="qwen2")
    with pytest.raises(ValueError, match="mistral"):
        LlamaConfig.tiny(model_type="mistral", attention_bias=True)
    with pytest.raises(ValueError, match="sliding_window"):
        LlamaConfig.tiny(sliding_window=4)
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.tiny(model_type="gpt2")
    with pytest.raises(ValueError, match="attention_impl"):
        LlamaConfig.tiny(attention_impl="flash")
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig.tiny(hidden_size=0)
    with pytest.raises(ValueError, match="dtype"):
        LlamaConfig.tiny(dtype=jnp.int32)
    cfg = LlamaConfig.tiny(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    )
    assert isinstance(cfg.rope_scaling, RopeScaling)
    assert hash(cfg) == hash(LlamaConfig.tiny(rope_scaling=cfg.rope_scaling))
    assert LlamaConfig.tiny(head_dim=16).head_dim == 16


def test_input_validation(params):
    with pytest.raises(ValueError, match="input_ids"):
        LlamaForCausalLM(CFG).apply({"params": params}, jnp.zeros((4,), jnp.int32))
