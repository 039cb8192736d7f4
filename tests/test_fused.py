"""The fused forward (merged kernel per call, low-rank custom VJP) against written formulas,
against the factored and merged forwards, and its routing under ``mode="auto"``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rslora_jax as rl
from rslora_jax.execution.fused import merged_matmul, prefers_fused
from rslora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss, init_params
from tests import _models as M
from tests._asserts import assert_close

T, D_IN, D1, D2, R1, R2 = 14, 6, 9, 5, 2, 3
S1, S2 = 0.7, 1.9


@pytest.fixture(scope="module")
def group():
    k = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(k[0], (2, T // 2, D_IN))
    ws = (jax.random.normal(k[1], (D_IN, D1)), jax.random.normal(k[2], (D_IN, D2)))
    fs = (
        (jax.random.normal(k[3], (D_IN, R1)), jax.random.normal(k[4], (R1, D1))),
        (jax.random.normal(k[5], (D_IN, R2)), jax.random.normal(k[6], (R2, D2))),
    )
    dys = (jax.random.normal(k[7], (2, T // 2, D1)), jax.random.normal(k[0], (2, T // 2, D2)))
    return x, ws, fs, dys


def _f64(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def test_outputs_and_gradients_match_written_formulas(group):
    """y_j = x (W_j + s_j A_j B_j); dx = sum dy_j W'_j^T; dW_j = x^T dy_j;
    dA_j = s_j x^T dy_j B_j^T; dB_j = s_j (x A_j)^T dy_j (float64 numpy)."""
    x, ws, fs, dys = group
    ys, vjp = jax.vjp(lambda x, ws, fs: merged_matmul(x, ws, fs, [S1, S2], jnp.float32), x, ws, fs)
    dx, dws, dfs = vjp(dys)
    xn, wn, fn, dyn = _f64((x, ws, fs, dys))
    x2 = xn.reshape(T, D_IN)
    want_dx = np.zeros_like(x2)
    for j, (s, w, (a, b), dy) in enumerate(zip((S1, S2), wn, fn, dyn)):
        dy2 = dy.reshape(T, -1)
        w_eff = w + s * a @ b
        assert_close(ys[j].reshape(T, -1), x2 @ w_eff, rel=1e-5, what=f"y{j}")
        want_dx += dy2 @ w_eff.T
        assert_close(dws[j], x2.T @ dy2, rel=1e-5, what=f"dW{j}")
        assert_close(dfs[j][0], s * x2.T @ (dy2 @ b.T), rel=1e-5, what=f"dA{j}")
        assert_close(dfs[j][1], s * (x2 @ a).T @ dy2, rel=1e-5, what=f"dB{j}")
    assert_close(dx.reshape(T, D_IN), want_dx, rel=1e-5, what="dx")
    assert dfs[0][0].dtype == jnp.float32 and ys[1].dtype == jnp.float32


def test_no_kernel_sized_gradient_when_only_adapters_are_trained():
    """x^T @ dy (the d_in x d_out kernel gradient, 2*T*d_in*d_out FLOPs) is computed only when
    it is asked for: XLA's own FLOP count of the compiled gradient shows it."""
    t, d_in, d_out, r = 256, 32, 48, 2
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (t, d_in))
    w = jax.random.normal(k[1], (d_in, d_out))
    fs = (jax.random.normal(k[2], (d_in, r)), jax.random.normal(k[3], (r, d_out)))

    def loss(fs, w, mode):
        a, b = fs
        if mode == "fused":
            (y,) = merged_matmul(x, [w], [(a, b)], [S1], jnp.float32)
        else:  # autodiff through the merged kernel: what mode="merged" does
            y = x @ (w + S1 * a @ b)
        return jnp.sum(jnp.sin(y))

    def flops(argnums, mode):
        fn = jax.jit(jax.grad(loss, argnums=argnums), static_argnums=2)
        cost = fn.lower(fs, w, mode).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    kernel_grad = 2 * t * d_in * d_out
    # x @ W', A @ B (forward and again backward), x @ A, dy @ B^T, x^T @ g, (x A)^T @ dy:
    low_rank = 2 * (2 * d_in * r * d_out) + 2 * (2 * t * d_in * r) + 2 * (2 * t * r * d_out)
    adapters_only = flops(0, "fused")
    assert adapters_only == pytest.approx(kernel_grad + low_rank, rel=0.03)
    # The count does see a kernel gradient where there is one.
    assert flops((0, 1), "fused") == pytest.approx(adapters_only + kernel_grad, rel=0.03)
    assert flops(0, "merged") >= adapters_only + kernel_grad - low_rank


def test_forward_mode_needs_the_factored_path(group):
    """The fused path is reverse-mode only (a custom VJP); mode="factored" serves jax.jvp."""
    x, ws, fs, _ = group
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: merged_matmul(x, ws, fs, [S1, S2], jnp.float32), (x,), (x,))
    model, x, cfg, adapters, base = _mlp_problem(40)
    params = rl.combine(adapters, base)

    def tangent(mode):
        apply = rl.lora(model.apply, cfg, mode=mode)
        return jax.jvp(lambda x: apply({"params": params}, x), (x,), (jnp.cos(x),))[1]

    assert_close(tangent("factored"), tangent("merged"), rel=2e-5)


def test_no_kernel_sized_residual():
    """W + s A B is recomputed in the backward pass, not kept: what reverse mode keeps (the
    residuals of jax.linearize) is no more than the factored forward keeps."""
    t, d_in, d_out, r = 64, 32, 48, 2
    k = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(k[0], (t, d_in))
    w = jax.random.normal(k[1], (d_in, d_out))
    a, b = jax.random.normal(k[2], (d_in, r)), jax.random.normal(k[3], (r, d_out))

    def kept_bytes(f):
        """Bytes of the residuals reverse mode keeps, beyond the arrays that exist anyway."""
        _, f_lin = jax.linearize(f, x, a, b)
        leaves = [v for v in jax.tree.leaves(f_lin) if hasattr(v, "nbytes")]
        return sum(v.nbytes for v in leaves if not any(v is u for u in (x, w, a, b)))

    fused = kept_bytes(lambda x, a, b: merged_matmul(x, [w], [(a, b)], [S1], jnp.float32)[0])
    factored = kept_bytes(lambda x, a, b: x @ w + S1 * (x @ a) @ b)
    merged = kept_bytes(lambda x, a, b: x @ (w + S1 * a @ b))  # keeps W + s A B
    assert fused <= factored < d_in * d_out * 4 <= merged


def test_bf16_compute(group):
    x, ws, fs, _dys = group
    ys = merged_matmul(x, ws, fs, [S1, S2], jnp.bfloat16)
    assert all(y.dtype == jnp.bfloat16 for y in ys)
    grads = jax.grad(
        lambda fs: sum(
            jnp.sum(y.astype(jnp.float32)) for y in merged_matmul(x, ws, fs, [S1, S2], "bfloat16")
        )
    )(fs)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # the factors' dtype
    want = [
        np.asarray(x, np.float64) @ _f64(w + s * a @ b) for w, (a, b), s in zip(ws, fs, (S1, S2))
    ]
    for j, (y, w) in enumerate(zip(ys, want)):
        assert_close(y, w, rel=3e-2, what=f"y{j}")  # bfloat16 inputs and product (measured 3e-3)


def test_bad_shapes_name_the_projection(group):
    x, ws, fs, _ = group
    with pytest.raises(
        ValueError, match=r"projection 1: .*got kernel \(6, 9\), lora_a \(6, 3\), lora_b \(3, 5\)"
    ):
        merged_matmul(x, (ws[0], ws[0]), fs, [S1, S2], jnp.float32)
    with pytest.raises(ValueError, match="2 kernels, 2 factor pairs, 1 scales"):
        merged_matmul(x, ws, fs, [S1], jnp.float32)


# --------------------------------------------------------------------------- through lora()
def _mlp_problem(tokens: int):
    model = M.MLP()
    x = jax.random.normal(jax.random.key(3), (tokens, 7))
    params = M.init_model(model, x)
    cfg = rl.LoraConfig(rank=3, alpha=4.0)
    adapted = rl.init(params, cfg, jax.random.key(1))
    adapters, base = rl.split(adapted)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)
    return model, x, cfg, adapters, base


def _loss_grads(model, x, cfg, adapters, base, mode, **kwargs):
    def loss(ad):
        y = rl.lora(model.apply, cfg, mode=mode)({"params": rl.combine(ad, base)}, x, **kwargs)
        return jnp.sum(jnp.sin(y))

    return jax.jit(jax.value_and_grad(loss))(adapters)


@pytest.mark.parametrize("tokens", [2, 40])
def test_dense_layers_fused_equal_factored_and_merged(tokens):
    model, x, cfg, adapters, base = _mlp_problem(tokens)
    ref_v, ref_g = _loss_grads(model, x, cfg, adapters, base, "merged")
    for mode in ("fused", "factored", "auto"):
        v, g = _loss_grads(model, x, cfg, adapters, base, mode)
        assert_close(v, ref_v, rel=1e-5, what=mode)
        assert_close(g, ref_g, rel=2e-5, what=mode)


def _uses_fused_rule(mode: str, tokens: int) -> bool:
    model, x, cfg, adapters, base = _mlp_problem(tokens)
    apply = rl.lora(model.apply, cfg, mode=mode)
    jaxpr = jax.make_jaxpr(lambda ad: apply({"params": rl.combine(ad, base)}, x))(adapters)
    return "custom_vjp" in str(jaxpr)


def test_dense_general_trailing_axes_are_fused_others_factored():
    """GeneralAttn: DenseGeneral (d) -> (2, 3) and (2, 3) -> 5 contract x's trailing axes; a
    DenseGeneral over a middle axis needs a transpose and stays factored."""

    class Middle(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(4, axis=1, name="mid")(x)  # x (b, d, t): contracts d

    for model, shape, axes, fused in (
        (M.GeneralAttn(), (2, 4, 6), {"qkv": "ioo", "o": "iio"}, True),
        (Middle(), (2, 6, 3), None, False),
    ):
        x = jax.random.normal(jax.random.key(0), shape)
        cfg = rl.LoraConfig(rank=2, alpha=3.0, kernel_axes=axes)
        params = M.init_model(model, x)
        adapted = jax.tree.map(lambda a: a + 0.1, rl.init(params, cfg, jax.random.key(1)))
        apply = rl.lora(model.apply, cfg, mode="fused")
        jaxpr = str(jax.make_jaxpr(apply)({"params": adapted}, x))
        assert ("custom_vjp" in jaxpr) is fused
        want = rl.lora(model.apply, cfg, mode="merged")({"params": adapted}, x)
        assert_close(jax.jit(apply)({"params": adapted}, x), want, rel=1e-5)


def test_auto_fuses_large_token_counts_only():
    # MLP: 7 -> 16 -> 12 -> 8; the rule fuses layer (d_in, d_out) from d_in*d_out/(d_in+d_out)
    # tokens on: at most 6.9, so 40 tokens fuse every layer and 2 tokens none.
    assert prefers_fused(40, 16, 12) and not prefers_fused(2, 7, 16)
    assert _uses_fused_rule("auto", 40) and not _uses_fused_rule("auto", 2)
    assert _uses_fused_rule("fused", 2) and not _uses_fused_rule("factored", 40)


def test_dropout_stays_factored_under_fused():
    model, x, cfg, adapters, base = _mlp_problem(40)
    cfg = rl.LoraConfig(rank=3, alpha=4.0, dropout=0.5)
    rngs = {"rngs": {"lora_dropout": jax.random.key(9)}}
    v_fused, _ = _loss_grads(model, x, cfg, adapters, base, "fused", **rngs)
    v_fact, _ = _loss_grads(model, x, cfg, adapters, base, "factored", **rngs)
    v_none, _ = _loss_grads(model, x, cfg, adapters, base, "factored")
    assert_close(v_fused, v_fact, rel=1e-6)
    assert abs(float(v_fused) - float(v_none)) > 1e-3  # dropout did act


def test_unknown_layers_are_merged_under_fused():
    model = M.WithConv()
    x = jax.random.normal(jax.random.key(0), (2, 7, 4))
    cfg = rl.LoraConfig(rank=2, alpha=2.0, kernel_axes={"conv": "iio"})
    params = M.init_model(model, x)
    adapted = jax.tree.map(lambda a: a + 0.1, rl.init(params, cfg, jax.random.key(1)))
    want = rl.lora(model.apply, cfg, mode="merged")({"params": adapted}, x)
    got = jax.jit(rl.lora(model.apply, cfg, mode="fused"))({"params": adapted}, x)
    assert_close(got, want, rel=1e-5)


# --------------------------------------------------------------------------- built-in Llama
LLAMA = LlamaConfig.tiny(attention_bias=True, mlp_bias=True)  # biases added after the matmul
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_llama_fused_equals_factored():
    """Built-in Llama (native q/k/v and gate/up groups, biases): loss and adapter gradients of
    the fused forward, with and without per-layer remat, against the factored forward."""
    params = init_params(LLAMA, jax.random.key(0))
    lcfg = rl.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=TARGETS,
        kernel_axes={"model/layers/.*": "lio"},
        rank_pattern={"v_proj": 2},
    )
    adapters = rl.init_adapters(params, lcfg, jax.random.key(1))
    adapters = jax.tree.map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), adapters
    )
    ids = jax.random.randint(jax.random.key(3), (2, 9), 0, 64)

    def run(mode, remat=False):
        apply = rl.lora(LlamaForCausalLM(LLAMA.replace(remat=remat)).apply, lcfg, mode=mode)

        def loss(ad):
            return causal_lm_loss(
                apply({"params": rl.combine(ad, params)}, ids[:, :-1]), ids[:, 1:]
            )

        return jax.jit(jax.value_and_grad(loss))(adapters)

    ref_v, ref_g = run("factored")
    for mode, remat in (("fused", False), ("fused", True)):
        v, g = run(mode, remat)
        assert_close(v, ref_v, rel=1e-5, what=f"{mode} remat={remat}")
        assert_close(g, ref_g, rel=2e-5, what=f"{mode} remat={remat}")
        assert all(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(g))


def test_llama_bf16_fused_close_to_float32():
    cfg = LLAMA.replace(dtype="bfloat16")
    params = init_params(LLAMA, jax.random.key(0))
    lcfg = rl.LoraConfig(rank=4, alpha=8.0, targets=TARGETS, kernel_axes={"model/layers/.*": "lio"})
    adapters = rl.init_adapters(params, lcfg, jax.random.key(1))
    adapted = rl.combine(jax.tree.map(lambda a: a + 0.05, adapters), params)
    ids = jax.random.randint(jax.random.key(3), (2, 9), 0, 64)
    want = rl.lora(LlamaForCausalLM(LLAMA).apply, lcfg, mode="merged")({"params": adapted}, ids)
    got = jax.jit(rl.lora(LlamaForCausalLM(cfg).apply, lcfg, mode="fused"))(
        {"params": adapted}, ids
    )
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, rel=5e-2, norm="max")  # bfloat16 compute (measured 5e-3)
