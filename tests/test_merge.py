"""merge / unmerge: the formula, structure and dtypes, bf16 casting once, jit + donation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rslora_jax as rl
from tests._asserts import assert_close
from tests._reference import delta_kernel, gamma, randomize_b

KEY = jax.random.key(0)


def _params(dtype=jnp.float32):
    k = jax.random.split(KEY, 4)
    return {
        "blk": {
            "q": {
                "kernel": jax.random.normal(k[0], (12, 10)).astype(dtype),
                "bias": jnp.zeros(10, dtype),
            },
            "stack": {"kernel": jax.random.normal(k[1], (3, 12, 10)).astype(dtype)},
            "einsum": {"kernel": jax.random.normal(k[2], (2, 12, 5)).astype(dtype)},
        },
        "conv1d": {"kernel": jax.random.normal(k[3], (9, 12)).astype(dtype)},  # (out, in)
    }


ROLES = {"blk/q": "io", "blk/stack": "lio", "blk/einsum": "oio", "conv1d": "oi"}


def _config(scaling="rslora", **kw):
    return rl.LoraConfig(
        rank=3,
        alpha=5.0,
        scaling=scaling,
        kernel_axes={"blk/stack": "lio", "blk/einsum": "oio"},
        fan_in_fan_out="conv1d",
        rank_pattern={"einsum": 2},
        alpha_pattern={"conv1d": 7.0},
        **kw,
    )


def _adapted(config, dtype=jnp.float32):
    p = rl.init(_params(dtype), config, jax.random.key(1))
    return jax.tree.map(jnp.asarray, randomize_b(jax.tree.map(np.asarray, p)))


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


@pytest.mark.parametrize("scaling", ["rslora", "lora"])
@pytest.mark.parametrize("jit", [False, True])
def test_merge_equals_formula(scaling, jit):
    cfg = _config(scaling)
    p = _adapted(cfg)
    merge = jax.jit(rl.merge, static_argnums=1) if jit else rl.merge
    out = merge(p, cfg)
    ranks = {"blk/einsum": 2}
    alphas = {"conv1d": 7.0}
    for path, roles in ROLES.items():
        h = _get(p, path)
        s = gamma(alphas.get(path, 5.0), ranks.get(path, 3), scaling)
        want = np.asarray(h["kernel"], np.float64) + delta_kernel(
            h["lora_a"], h["lora_b"], s, roles, h["kernel"].shape
        )
        assert_close(_get(out, path)["kernel"], want, rel=1e-6, what=path)


def test_merge_returns_original_structure_shapes_dtypes():
    cfg = _config()
    base = _params(jnp.bfloat16)
    out = rl.merge(_adapted(cfg, jnp.bfloat16), cfg)
    assert jax.tree.structure(out) == jax.tree.structure(base)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(base)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_bf16_merge_is_computed_in_float32_and_cast_once():
    rng = np.random.default_rng(0)
    cfg = rl.LoraConfig(rank=2, alpha=float(np.sqrt(2.0)))  # scale exactly 1
    w = jnp.asarray(rng.uniform(1, 2, (16, 16)), jnp.bfloat16)
    # Factors on a 2**-6 grid: A @ B is exact in float32, so the reference below is exact.
    a = jnp.asarray(rng.integers(-4, 5, (16, 2)) * 2.0**-6, jnp.float32)
    b = jnp.asarray(rng.integers(-4, 5, (2, 16)) * 2.0**-6, jnp.float32)
    merged = rl.merge({"d": {"kernel": w, "lora_a": a, "lora_b": b}}, cfg)["d"]["kernel"]
    exact = np.asarray(w, np.float32) + np.asarray(a) @ np.asarray(b)
    np.testing.assert_array_equal(np.asarray(merged), exact.astype(jnp.bfloat16))
    # Accumulating the update into the bf16 kernel one rank term at a time loses terms
    # below half an ulp: the check above would catch an implementation that did that.
    naive = w
    for i in range(2):
        naive = naive + (a[:, i : i + 1] @ b[i : i + 1]).astype(jnp.bfloat16)
    assert (np.asarray(naive) != np.asarray(merged)).any()


def test_unmerge_recovers_base():
    cfg = _config()
    p = _adapted(cfg)
    adapters, base = rl.split(p)
    back = rl.unmerge(rl.merge(p, cfg), adapters, cfg)
    assert_close(back, base, rel=1e-6)  # float32 rounding of (W + d) - d


def test_merge_jit_with_donation():
    cfg = _config()
    p = _adapted(cfg)
    want = rl.merge(p, cfg)
    adapters, base = rl.split(jax.tree.map(jnp.copy, p))

    def merge_donating_base(base, adapters):
        return rl.merge(rl.combine(adapters, base), cfg)

    got = jax.jit(merge_donating_base, donate_argnums=0)(base, adapters)
    assert_close(got, want, rel=1e-6)
    # The kernels' buffers were taken over by the output (no second copy of the base).
    assert all(x.is_deleted() for x in jax.tree.leaves(base))


def test_merge_rejects_factors_that_do_not_fit():
    cfg = rl.LoraConfig(rank=2)
    p = {"d": {"kernel": jnp.ones((4, 6)), "lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 4))}}
    with pytest.raises(ValueError, match=r"adapter factors at 'd' do not fit its kernel \(4, 6\)"):
        rl.merge(p, cfg)
    p = {"d": {"kernel": jnp.ones((4, 6)), "lora_a": jnp.ones((4, 3)), "lora_b": jnp.ones((3, 6))}}
    with pytest.raises(ValueError, match=r"adapter at 'd' has rank 3, but the config says rank 2"):
        rl.merge(p, cfg)


@pytest.mark.parametrize("offset", [-29, 0, 8])  # ranks 3, 32 (fused sum) and 40 (matmul)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_is_exact_on_both_sides_of_the_fused_rank(offset, dtype):
    """Up to FUSED_MERGE_MAX_RANK the update is summed as outer products in one fused
    expression, above it by a float32 matmul: both accumulate in float32 and cast once. With
    factors on a 2**-6 grid and scale 1 the float32 result is exact, so both must equal the
    exact value rounded once to the kernel's dtype (stacked layers too)."""
    from rslora_jax.ops.merge import FUSED_MERGE_MAX_RANK

    rank = FUSED_MERGE_MAX_RANK + offset
    rng = np.random.default_rng(rank)
    cfg = rl.LoraConfig(rank=rank, alpha=float(np.sqrt(rank)), kernel_axes={"s": "lio"})
    w = np.round(rng.uniform(1, 2, (2, 48, 44)) * 2**10) * 2.0**-10  # every partial sum exact
    a = rng.integers(-4, 5, (2, 48, rank)) * 2.0**-6
    b = rng.integers(-4, 5, (2, rank, 44)) * 2.0**-6
    p = {
        "s": {
            "kernel": jnp.asarray(w, dtype),
            "lora_a": jnp.asarray(a, jnp.float32),
            "lora_b": jnp.asarray(b, jnp.float32),
        }
    }
    exact = np.asarray(p["s"]["kernel"], np.float64) + a @ b
    merged = jax.jit(rl.merge, static_argnums=1)(p, cfg)["s"]["kernel"]
    assert merged.dtype == dtype
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(jnp.asarray(exact, dtype)))
    back = rl.unmerge({"s": {"kernel": merged}}, p, cfg)["s"]["kernel"]
    if dtype == jnp.float32:  # W' - A@B recovers W up to the rounding of W'
        assert_close(back, np.asarray(p["s"]["kernel"]), rel=1e-6)
