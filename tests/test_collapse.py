"""The rsLoRA paper's collapse: at init, ||dL/dB|| ~ r^-1/2 under LoRA and flat under rsLoRA."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import rslora_jax as rl


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(512, name="fc1")(x))
        return nn.Dense(256, name="fc2")(h)


def _grad_b_norm(model, params, x, y, scaling, r):
    cfg = rl.LoraConfig(rank=r, alpha=16.0, scaling=scaling)
    adapted = rl.init(params, cfg, jax.random.key(r))
    adapters, base = rl.split(adapted)
    apply = rl.lora(model.apply, cfg)

    def loss(ad):
        out = apply({"params": rl.combine(ad, base)}, x)
        return jnp.mean((out - y) ** 2)

    g = jax.jit(jax.grad(loss))(adapters)
    sq = sum(jnp.sum(g[name]["lora_b"] ** 2) for name in ("fc1", "fc2"))
    grad_a = sum(float(jnp.abs(g[name]["lora_a"]).max()) for name in ("fc1", "fc2"))
    assert grad_a == 0.0  # B = 0 at init, so dL/dA = 0 exactly
    return float(jnp.sqrt(sq))


def test_gradient_norm_slope_matches_the_paper():
    model = TwoLayer()
    x = jax.random.normal(jax.random.key(0), (64, 256))
    y = jax.random.normal(jax.random.key(1), (64, 256))
    params = jax.jit(model.init)(jax.random.key(2), x)["params"]
    ranks = np.array([4, 16, 64, 256])
    slopes = {}
    for scaling in ("lora", "rslora"):
        norms = [_grad_b_norm(model, params, x, y, scaling, int(r)) for r in ranks]
        slopes[scaling] = np.polyfit(np.log(ranks), np.log(norms), 1)[0]
    # Theory (methods reference): ||grad B|| ~ gamma_r * sqrt(r): slope -1/2 (LoRA), 0 (rsLoRA).
    assert abs(slopes["lora"] + 0.5) < 0.08, slopes
    assert abs(slopes["rslora"]) < 0.08, slopes
