"""Google's ``gemma`` library (linen Transformer) with adapters on its einsum projections.

Runs by hand in ``.venv-gemma`` (``bash scripts/gemma_env.sh``; gemma 4.0.1 needs Python 3.12 and
pulls tensorflow, too heavy for CI); skipped where gemma is not installed. CI covers the same
module shapes through tunix's Gemma 3 (tests/test_tunix.py) and the linen path through a
registered gemma-style layer (tests/test_einsum_layers.py). gemma's params are bfloat16: the
numbers are compared on a float32 copy, the zero-B check on the bfloat16 model.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("gemma")

from gemma import gm
from gemma.gm.nn import _config, _modules

import rslora_jax as rl
from rslora_jax.hf.peft import export_peft_mapped, gemma_module_map
from tests._asserts import assert_close

pytestmark = [pytest.mark.gemma_lib, pytest.mark.loose_dtypes]

RANK, ALPHA = 2, 3.0
SCALE = ALPHA / np.sqrt(RANK)
D, NH, H, F = 16, 2, 8, 24
TOKENS = (jnp.arange(10, dtype=jnp.int32).reshape(2, 5) * 5) % 64


def _model(kv_heads):
    cfg = _config.TransformerConfig(
        num_embed=64, embed_dim=D, hidden_dim=F, num_heads=NH, head_dim=H,
        num_kv_heads=kv_heads, final_logit_softcap=None, use_post_attn_norm=True,
        use_post_ffw_norm=True, sliding_window_size=4, use_qk_norm=True,
        attention_types=(_modules.AttentionType.GLOBAL, _modules.AttentionType.LOCAL_SLIDING),
    )  # fmt: skip
    model = gm.nn.Transformer(config=cfg, return_last_only=False)
    params = model.init(jax.random.key(0), TOKENS)["params"]
    return model, params


def _random(params, key=1):
    adapters, base = rl.split(params)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
    return rl.combine(jax.tree.unflatten(treedef, new), base)


EXPECTED = {  # kv_heads -> {projection: kernel axes}
    1: {"attn/q_einsum": "oio", "attn/kv_einsum": "loio"},
    2: {"attn/qkv_einsum": "loio"},
}


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["kv_einsum", "qkv_einsum"])
def test_gemma_transformer(kv_heads, tmp_path):
    model, params = _model(kv_heads)
    axes = rl.infer_kernel_axes(model.apply, {"params": params}, TOKENS)
    per_layer = {**EXPECTED[kv_heads], "attn/attn_vec_einsum": "iio", "mlp/gating_einsum": "lio",
                 "mlp/linear": "io"}  # fmt: skip
    assert axes == {f"layer_{i}/{p}": r for i in range(2) for p, r in per_layer.items()}
    cfg = rl.LoraConfig(rank=RANK, alpha=ALPHA, kernel_axes=axes)
    adapted = rl.init(params, cfg, jax.random.key(1))
    assert set(rl.adapter_paths(adapted)) == set(axes)  # embedder not adapted, no warning
    # Zero B: the bf16 model's output is unchanged (both jitted: the same compiled rounding).
    y0 = jax.jit(model.apply)({"params": params}, TOKENS).logits
    y = jax.jit(rl.lora(model.apply, cfg, "factored"))({"params": adapted}, TOKENS).logits
    np.testing.assert_array_equal(y, y0)

    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    full = _random(rl.init(f32, cfg, jax.random.key(1)))
    merged = rl.merge(full, cfg)
    own = jax.jit(model.apply)({"params": merged}, TOKENS).logits
    for mode in ("factored", "fused", "merged", "auto"):
        y = jax.jit(rl.lora(model.apply, cfg, mode))({"params": full}, TOKENS).logits
        assert_close(y, own, rel=1e-5)
    layer = full["layer_1"]
    for name, holder in layer["attn"].items():
        if "lora_a" not in holder:
            continue
        w0 = np.asarray(holder["w"], np.float64)
        a, b = (np.asarray(holder[k], np.float64) for k in ("lora_a", "lora_b"))
        if name == "attn_vec_einsum":  # (N, H, D)
            want = (a @ b).reshape(w0.shape)
        elif name == "q_einsum":  # (N, D, H)
            want = (a @ b).reshape(D, NH, H).transpose(1, 0, 2)
        else:  # (C, K, D, H): one adapter per member
            c, k = w0.shape[:2]
            want = np.stack([(a[i] @ b[i]).reshape(D, k, H).transpose(1, 0, 2) for i in range(c)])
        got = np.asarray(merged["layer_1"]["attn"][name]["w"], np.float64) - w0
        assert_close(got, SCALE * want, rel=1e-5)
    gating = layer["mlp"]["lora_gating_einsum"]
    got = np.asarray(merged["layer_1"]["mlp"]["gating_einsum"], np.float64)
    got = got - np.asarray(layer["mlp"]["gating_einsum"], np.float64)
    a, b = (np.asarray(gating[k], np.float64) for k in ("lora_a", "lora_b"))
    assert_close(got, SCALE * np.stack([a[0] @ b[0], a[1] @ b[1]]), rel=1e-5)

    # A jitted step trains only the adapters; Adam keeps two moments per adapter element.
    adapters, base = rl.split(full)
    tx = rl.optimizer(optax.adam(1e-2), full)
    apply = rl.lora(model.apply, cfg)

    @jax.jit
    def step(adapters, opt_state):
        def loss(ad):
            logits = apply({"params": rl.combine(ad, base)}, TOKENS).logits
            return jnp.mean(jnp.square(logits))

        grads = jax.grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    opt_state = tx.init(adapters)
    new, opt_state = step(adapters, opt_state)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.any(x != y)), new, adapters)))
    n = sum(x.size for x in jax.tree.leaves(adapters))
    assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0) == 2 * n

    # PEFT export with Hugging Face module names (members: k_proj / v_proj, gate_proj / up_proj).
    export_peft_mapped(tmp_path, full, cfg, gemma_module_map(full))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
