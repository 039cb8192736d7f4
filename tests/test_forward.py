"""lora(): factored == merged == the model on merge(params) == the test's own formula."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rslora_jax as rl
from tests import _models as M
from tests._asserts import assert_close
from tests._reference import gamma, merge_reference, randomize_b

KEY = jax.random.key(0)


def _setup(model, x, config, seed=1):
    params = M.init_model(model, x)
    adapted = rl.init(params, config, jax.random.key(seed))
    adapted = jax.tree.map(jnp.asarray, randomize_b(jax.tree.map(np.asarray, adapted), seed))
    return params, adapted


CASES = {
    "dense": (M.MLP(), (2, 5, 7), None),
    "dense_general": (M.GeneralAttn(), (2, 4, 6), {"qkv": "ioo", "o": "iio"}),
    "einsum": (M.EinsumAttn(), (2, 4, 6), {"q": "oio", "per_head": "lio", "o": "iio"}),
    "scan_remat": (M.Scanned(), (2, 3, 6), {"layers/q": "lio", "layers/o": "lio"}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model, shape, axes = CASES[request.param]
    x = jax.random.normal(jax.random.key(3), shape, jnp.float32)
    config = rl.LoraConfig(rank=2, alpha=3.0, kernel_axes=axes)
    params, adapted = _setup(model, x, config)
    return request.param, model, x, config, params, adapted


@pytest.mark.parametrize(
    ("mode", "jit"),
    [("factored", False), ("factored", True), ("fused", True), ("merged", True), ("auto", True)],
)
def test_forward_matches_reference_formula(case, mode, jit):
    name, model, x, config, _, adapted = case
    roles = config.kernel_axes or {}

    def roles_for(path):
        return dict(roles).get(path, "io")

    ref_params = merge_reference(
        jax.tree.map(np.asarray, adapted), lambda p: gamma(3.0, 2, "rslora"), roles_for
    )
    want = np.asarray(model.apply({"params": jax.tree.map(jnp.asarray, ref_params)}, x))
    apply = rl.lora(model.apply, config, mode=mode)
    if jit:
        apply = jax.jit(apply)
    got = np.asarray(apply({"params": adapted}, x))
    assert_close(got, want, rel=1e-5, what=f"{name}/{mode}")
    # The adapters must matter, or the test proves nothing.
    plain = np.asarray(model.apply({"params": rl.split(adapted)[1]}, x))
    assert np.abs(plain - want).max() > 1e-3


def test_factored_and_fused_equal_merged_gradients(case):
    _, model, x, config, _, adapted = case
    adapters, base = rl.split(adapted)

    def loss(ad, mode):
        y = rl.lora(model.apply, config, mode=mode)({"params": rl.combine(ad, base)}, x)
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_m = grad(adapters, "merged")
    for mode in ("factored", "fused"):
        g = grad(adapters, mode)
        assert jax.tree.structure(g) == jax.tree.structure(adapters)
        assert_close(g, g_m, rel=2e-5, what=mode)
        for path, a in jax.tree_util.tree_leaves_with_path(g):
            assert np.abs(np.asarray(a)).max() > 0, f"{mode} {jax.tree_util.keystr(path)}"


def test_init_leaves_model_output_unchanged(case):
    _, model, x, config, params, _ = case
    adapted = rl.init(params, config, KEY)
    want = model.apply({"params": params}, x)
    got = rl.lora(model.apply, config, mode="factored")({"params": adapted}, x)
    np.testing.assert_array_equal(got, want)


def test_single_dense_against_written_formula():
    """y = x @ W + b + alpha/sqrt(r) * (x @ A) @ B, written out in the test."""
    model = nn.Dense(6)
    x = jax.random.normal(KEY, (3, 5))
    params = model.init(KEY, x)["params"]
    cfg = rl.LoraConfig(rank=4, alpha=8.0)
    ad = rl.init(params, cfg, jax.random.key(2))
    ad["lora_b"] = jax.random.normal(jax.random.key(5), ad["lora_b"].shape)
    xn, w, b = (np.asarray(v, np.float64) for v in (x, ad["kernel"], ad["bias"]))
    a_, b_ = np.asarray(ad["lora_a"], np.float64), np.asarray(ad["lora_b"], np.float64)
    want = xn @ w + b + 8.0 / np.sqrt(4) * (xn @ a_) @ b_
    for mode in ("factored", "merged"):
        got = rl.lora(model.apply, cfg, mode=mode)({"params": ad}, x)
        assert_close(got, want, rel=1e-5, what=mode)


def test_auto_falls_back_to_merge_for_unknown_layers():
    model = M.WithConv()
    x = jax.random.normal(KEY, (2, 7, 4))
    cfg = rl.LoraConfig(rank=2, alpha=2.0, kernel_axes={"conv": "iio"})
    _, adapted = _setup(model, x, cfg)
    ref = merge_reference(
        jax.tree.map(np.asarray, adapted),
        lambda p: gamma(2.0, 2, "rslora"),
        lambda p: {"conv": "iio"}.get(p, "io"),
    )
    want = model.apply({"params": jax.tree.map(jnp.asarray, ref)}, x)
    got = jax.jit(rl.lora(model.apply, cfg, mode="auto"))({"params": adapted}, x)
    assert_close(got, want, rel=1e-5)
    with pytest.raises(
        ValueError, match=r"mode='factored' cannot compute the adapters at \['conv'\]"
    ):
        rl.lora(model.apply, cfg, mode="factored")({"params": adapted}, x)


def test_bf16_compute_keeps_bf16():
    model = M.MLP(dtype=jnp.bfloat16)
    x = jax.random.normal(KEY, (2, 7))
    params = M.init_model(model, x)
    cfg = rl.LoraConfig(rank=4)
    ad = rl.init(params, cfg, KEY)
    y = jax.jit(rl.lora(model.apply, cfg, mode="factored"))({"params": ad}, x)
    assert y.dtype == jnp.bfloat16


def test_dropout_only_with_rng_and_only_on_adapter_branch():
    model = M.MLP()
    x = jax.random.normal(KEY, (4, 7))
    cfg = rl.LoraConfig(rank=4, dropout=0.5)
    params, adapted = _setup(model, x, cfg)
    apply = rl.lora(model.apply, cfg, mode="factored")
    no_rng = apply({"params": adapted}, x)
    no_drop = rl.lora(model.apply, rl.LoraConfig(rank=4), mode="factored")({"params": adapted}, x)
    assert_close(no_rng, no_drop, rel=1e-6)
    d1 = apply({"params": adapted}, x, rngs={"lora_dropout": jax.random.key(1)})
    d2 = apply({"params": adapted}, x, rngs={"lora_dropout": jax.random.key(2)})
    assert np.abs(np.asarray(d1) - np.asarray(d2)).max() > 1e-4
    # With B = 0 the adapter branch is zero, so dropout must not change anything.
    zero = rl.init(params, cfg, KEY)
    assert_close(
        apply({"params": zero}, x, rngs={"lora_dropout": jax.random.key(1)}),
        model.apply({"params": params}, x),
        rel=1e-6,
    )
    with pytest.raises(ValueError, match="dropout needs the factored forward"):
        rl.lora(model.apply, cfg, mode="merged")({"params": adapted}, x, rngs={"lora_dropout": KEY})


def test_bad_mode_and_variables():
    with pytest.raises(ValueError, match="mode=.*'fast'"):
        rl.lora(M.MLP().apply, rl.LoraConfig(), mode="fast")
    with pytest.raises(ValueError, match="'params' collection"):
        rl.lora(M.MLP().apply, rl.LoraConfig())({"kernel": 1}, jnp.ones((1, 7)))


def test_infer_kernel_axes_reads_linen_modules():
    x = jnp.ones((2, 4, 6))
    for name in ("dense_general", "einsum", "scan_remat"):
        model, shape, axes = CASES[name]
        x = jnp.ones(shape)
        v = model.init(KEY, x)
        found = rl.infer_kernel_axes(model.apply, v, x)
        for path, roles in axes.items():
            assert found[path] == roles, (name, path, found)
