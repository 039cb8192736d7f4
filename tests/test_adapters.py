"""init / split / combine: shapes, initial distributions, key derivation, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rslora_jax as rl

KEY = jax.random.key(0)


def _tree(d_in=64, d_out=48):
    return {
        "model": {
            "layers": {
                str(i): {
                    "self_attn": {
                        "q_proj": {"kernel": jnp.ones((d_in, d_out)), "bias": jnp.zeros(d_out)},
                        "v_proj": {"kernel": jnp.ones((d_in, d_out))},
                    },
                    "norm": {"scale": jnp.ones(d_in)},
                }
                for i in range(3)
            },
            "embed": {"embedding": jnp.ones((10, d_in))},
        },
        "lm_head": {"kernel": jnp.ones((d_in, 10))},
    }


def test_init_adds_factors_with_shapes_and_zero_b():
    params = _tree()
    out = rl.init(params, rl.LoraConfig(rank=4, targets=["q_proj"]), KEY)
    for i in range(3):
        q = out["model"]["layers"][str(i)]["self_attn"]["q_proj"]
        assert q["lora_a"].shape == (64, 4) and q["lora_b"].shape == (4, 48)
        assert q["lora_a"].dtype == jnp.float32
        np.testing.assert_array_equal(q["lora_b"], 0)
        assert "lora_a" not in out["model"]["layers"][str(i)]["self_attn"]["v_proj"]
    assert rl.adapter_paths(out) == [f"model/layers/{i}/self_attn/q_proj" for i in range(3)]
    # Base leaves are the same objects (no copies of the base).
    assert out["lm_head"]["kernel"] is params["lm_head"]["kernel"]


def test_all_linear_default_skips_lm_head_and_non_kernels():
    out = rl.init(_tree(), rl.LoraConfig(rank=2), KEY)
    assert len(rl.adapter_paths(out)) == 6
    assert "lora_a" not in out["lm_head"]


@pytest.mark.parametrize("r", [4, 64])
def test_kaiming_uniform_matches_peft_bound_and_variance(r):
    d_in = 256
    params = {"d": {"kernel": jnp.zeros((d_in, 128))}}
    a = np.asarray(rl.init(params, rl.LoraConfig(rank=min(r, 128)), KEY)["d"]["lora_a"])
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on (r, d_in): gain*sqrt(3/fan_in)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.95 * bound
    np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.15)


def test_gaussian_variance_does_not_depend_on_rank():
    params = {"d": {"kernel": jnp.zeros((512, 512))}}
    variances = []
    for r in (4, 64, 256):
        a = rl.init(params, rl.LoraConfig(rank=r, init="gaussian"), KEY)["d"]["lora_a"]
        variances.append(float(jnp.var(a)))
    np.testing.assert_allclose(variances, 1 / 512, rtol=0.2)


def test_keys_derive_from_paths_not_dict_order():
    params = _tree()
    reordered = {"lm_head": params["lm_head"], "model": dict(reversed(params["model"].items()))}
    cfg = rl.LoraConfig(rank=4)
    a = rl.init(params, cfg, KEY)
    b = rl.init(reordered, cfg, KEY)
    for path in rl.adapter_paths(a):
        ka = a
        kb = b
        for k in path.split("/"):
            ka, kb = ka[k], kb[k]
        np.testing.assert_array_equal(ka["lora_a"], kb["lora_a"])
    q0 = a["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"]
    q1 = a["model"]["layers"]["1"]["self_attn"]["q_proj"]["lora_a"]
    assert not np.allclose(q0, q1)


def test_adapter_dtype_and_abstract_params():
    cfg = rl.LoraConfig(rank=4, dtype=jnp.bfloat16)
    abstract = jax.eval_shape(lambda: _tree())
    ad = rl.init_adapters(abstract, cfg, KEY)
    leaves = jax.tree.leaves(ad)
    assert len(leaves) == 12 and all(x.dtype == jnp.bfloat16 for x in leaves)


def test_stacked_kernels_get_stacked_factors():
    params = {"layers": {"q": {"kernel": jnp.ones((5, 16, 8))}}}
    out = rl.init(params, rl.LoraConfig(rank=2, kernel_axes="lio"), KEY)
    assert out["layers"]["q"]["lora_a"].shape == (5, 16, 2)
    assert out["layers"]["q"]["lora_b"].shape == (5, 2, 8)
    # Each layer draws its own A.
    a = np.asarray(out["layers"]["q"]["lora_a"])
    assert not np.allclose(a[0], a[1])


def test_fan_in_fan_out_kernels():
    params = {"c_attn": {"kernel": jnp.ones((24, 8))}}  # stored (out, in) like GPT-2's Conv1D
    out = rl.init(params, rl.LoraConfig(rank=2, fan_in_fan_out=True), KEY)
    assert out["c_attn"]["lora_a"].shape == (8, 2) and out["c_attn"]["lora_b"].shape == (2, 24)


def test_split_combine_are_exact_inverses():
    full = rl.init(_tree(), rl.LoraConfig(rank=2), KEY)
    adapters, base = rl.split(full)
    assert jax.tree.structure(base) == jax.tree.structure(_tree())
    assert all(
        k.startswith("lora_")
        for p, _ in jax.tree_util.tree_leaves_with_path(adapters)
        for k in [p[-1].key]
    )
    again = rl.combine(adapters, base)
    assert jax.tree.structure(again) == jax.tree.structure(full)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(full)):
        assert x is y
    a2, b2 = rl.split(again)
    assert jax.tree.structure(a2) == jax.tree.structure(adapters)
    assert jax.tree.structure(b2) == jax.tree.structure(base)


def test_combine_errors_name_the_path():
    base = {"a": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"adapter path 'b' does not exist in the base tree"):
        rl.combine({"b": {"lora_a": jnp.ones((2, 1))}}, base)
    with pytest.raises(ValueError, match=r"'a/lora_a' is in both adapters and base"):
        rl.combine({"a": {"lora_a": 1}}, {"a": {"kernel": 1, "lora_a": 2}})


def test_no_match_lists_candidates():
    with pytest.raises(
        ValueError, match=r"matched no kernel. Candidate paths: 'model/layers/0/self_attn/q_proj'"
    ):
        rl.init(_tree(), rl.LoraConfig(targets=["k_proj"]), KEY)


def test_rank_too_large_names_path_and_shape():
    with pytest.raises(
        ValueError, match=r"rank 64 at 'd' exceeds min\(d_in, d_out\) = min\(16, 8\)"
    ):
        rl.init({"d": {"kernel": jnp.ones((16, 8))}}, rl.LoraConfig(rank=64), KEY)


def test_nd_kernel_without_axes_is_an_error():
    with pytest.raises(ValueError, match=r"kernel at 'q' has shape \(4, 16, 8\): with 3 axes"):
        rl.init({"q": {"kernel": jnp.ones((4, 16, 8))}}, rl.LoraConfig(rank=2), KEY)
    with pytest.raises(
        ValueError, match=r"gives 'io' for 'q', but its kernel has shape \(4, 16, 8\)"
    ):
        rl.init(
            {"q": {"kernel": jnp.ones((4, 16, 8))}},
            rl.LoraConfig(rank=2, kernel_axes={"q": "io"}),
            KEY,
        )


def test_double_init_is_an_error():
    once = rl.init({"d": {"kernel": jnp.ones((4, 4))}}, rl.LoraConfig(rank=2), KEY)
    with pytest.raises(ValueError, match=r"'d' already has adapter leaves"):
        rl.init(once, rl.LoraConfig(rank=2), KEY)
