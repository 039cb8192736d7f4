"""transformers 4.x Flax models, unmodified: FlaxLlamaForCausalLM and FlaxGPT2LMHeadModel.

transformers 5 dropped its Flax classes, so these tests run in the transformers<5 environment
(`scripts/test.sh` makes it: .venv-tf4); `tests/conftest.py` deselects them elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rslora_jax as rl
from tests._asserts import assert_close
from tests._reference import gamma, merge_reference, randomize_b

pytestmark = [pytest.mark.hf_flax, pytest.mark.loose_dtypes]

import transformers  # noqa: E402  (a missing import must fail, not skip)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.FlaxLlamaForCausalLM(cfg, seed=0)
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, 97)

    def call(apply, params):
        mask = jnp.ones_like(ids)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return apply({"params": params}, ids, mask, pos).logits

    return model, ids, call


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = transformers.FlaxGPT2LMHeadModel(cfg, seed=0)
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, 97)

    def call(apply, params):
        mask = jnp.ones_like(ids)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return apply({"params": params}, ids, mask, pos).logits

    return model, ids, call


MODELS = {
    # name: (builder, config, roles of the adapted kernels)
    "llama": (_llama, rl.LoraConfig(rank=4, alpha=8.0, targets=LLAMA_TARGETS), "io"),
    "gpt2": (
        _gpt2,
        rl.LoraConfig(rank=4, alpha=8.0, targets=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        "oi",
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf(request):
    build, cfg, roles = MODELS[request.param]
    model, ids, call = build()
    params = rl.init(model.params, cfg, jax.random.key(1))
    params = jax.tree.map(jnp.asarray, randomize_b(jax.tree.map(np.asarray, params), std=0.05))
    return request.param, model, ids, call, cfg, roles, params


def test_factored_merged_and_merged_params_agree(hf):
    name, model, _, call, cfg, roles, params = hf
    n_adapted = len(rl.adapter_paths(params))
    assert n_adapted == (14 if name == "llama" else 8)
    ref = merge_reference(
        jax.tree.map(np.asarray, params), lambda p: gamma(8.0, 4, "rslora"), lambda p: roles
    )
    want = np.asarray(call(model.module.apply, jax.tree.map(jnp.asarray, ref)))
    for mode in ("factored", "merged", "auto"):
        got = call(jax.jit(rl.lora(model.module.apply, cfg, mode=mode)), params)
        assert_close(got, want, rel=1e-5, what=f"{name}/{mode}")
    served = call(model.module.apply, rl.merge(params, cfg))
    assert_close(served, want, rel=1e-5, what=f"{name}/served")
    plain = np.asarray(call(model.module.apply, rl.split(params)[1]))
    assert np.abs(plain - want).max() > 1e-3  # the adapters matter
    # The merged tree is exactly the model's own structure: its __call__ takes it as is.
    out = model(np.asarray(hf[2]), params=rl.merge(params, cfg)).logits
    assert_close(out, want, rel=1e-5, what=f"{name}/__call__")


def test_training_moves_only_adapters_and_lowers_loss(hf):
    _, model, ids, call, cfg, _, params = hf
    adapters, base = rl.split(params)
    opt = rl.optimizer(optax.adam(3e-2), params)
    apply = rl.lora(model.module.apply, cfg, mode="factored")

    def loss(ad):
        logits = call(apply, rl.combine(ad, base))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    @jax.jit
    def step(ad, state):
        value, g = jax.value_and_grad(loss)(ad)
        upd, state = opt.update(g, state, ad)
        return optax.apply_updates(ad, upd), state, value

    state = opt.init(adapters)
    losses = []
    for _ in range(25):
        adapters, state, value = step(adapters, state)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.1, losses  # one fixed batch: deterministic descent
    merged = rl.merge(rl.combine(adapters, base), cfg)
    assert_close(
        call(model.module.apply, merged), call(apply, rl.combine(adapters, base)), rel=1e-5
    )
