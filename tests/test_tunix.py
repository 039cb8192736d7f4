"""google-tunix's NNX models (Llama 3, Qwen 3, Gemma 3) with adapters on their own projections.

Their attention projections are tunix's ``Einsum`` modules with a weight ``w`` (Gemma 3: gemma's
``q_einsum`` ``(N, D, H)``, ``kv_einsum`` ``(2, K, D, H)`` holding k and v, ``qkv_einsum``
``(3, N, D, H)``, ``attn_vec_einsum``), their MLPs ``nnx.Linear``. Runs in the tunix environment
(``.venv-tunix``, made by scripts/test.sh: google-tunix pins its own transformers); skipped
where tunix is not installed. Tiny random configs; references are written here: the merged
delta of each weight is ``(alpha / sqrt(r)) A @ B`` laid out as the weight by hand.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

if not os.environ.get("RSLORA_REQUIRE_TUNIX"):  # scripts/test.sh requires it
    pytest.importorskip("tunix")

from flax import nnx
from tunix.models.gemma3 import model as gemma3
from tunix.models.llama3 import model as llama3
from tunix.models.qwen3 import model as qwen3

import rslora_jax as rl
from rslora_jax import nnx as rnnx
from rslora_jax.hf.peft import export_peft_mapped, tunix_module_map
from tests._asserts import assert_close

# Third-party model code (rope positions, masks) is not strict-promotion clean.
pytestmark = [pytest.mark.tunix, pytest.mark.loose_dtypes]

RANK, ALPHA = 2, 3.0
SCALE = ALPHA / np.sqrt(RANK)
B_, T_ = 2, 5


def _random_zero_weights(model):
    """tunix initialises some kernels (Gemma 3's and Qwen 3's MLPs) to zero, as its weights come
    from checkpoints: random ones instead, so that every projection matters."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    new = [
        0.2 * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 and not np.any(x) else x
        for k, x in zip(keys, leaves)
    ]
    rnnx.update_from_dict(model, jax.tree.unflatten(treedef, new))
    return model


def _llama(cls, module):
    cfg = module.ModelConfig(
        num_layers=2, vocab_size=64, embed_dim=16, hidden_dim=24, num_heads=4, head_dim=8,
        num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5,
    )  # fmt: skip
    return lambda: _random_zero_weights(cls(cfg, rngs=nnx.Rngs(0)))


def _gemma3(kv_heads):
    cfg = gemma3.ModelConfig(
        num_layers=2, num_embed=64, embed_dim=16, hidden_dim=24, num_heads=4, head_dim=8,
        num_kv_heads=kv_heads, sliding_window_size=4, param_dtype=jnp.float32,
    )  # fmt: skip
    return lambda: _random_zero_weights(gemma3.Gemma3(cfg, rngs=nnx.Rngs(0)))


MODELS = {
    "llama3": _llama(llama3.Llama3, llama3),
    "qwen3": _llama(qwen3.Qwen3, qwen3),
    "gemma3_gqa": _gemma3(2),  # q_einsum + kv_einsum (k, v stacked)
    "gemma3_mha": _gemma3(4),  # qkv_einsum (q, k, v stacked)
}
ATTN = {
    "llama3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma3_gqa": ("q_einsum", "kv_einsum", "attn_vec_einsum"),
    "gemma3_mha": ("qkv_einsum", "attn_vec_einsum"),
}
MLP = ("gate_proj", "up_proj", "down_proj")


def _inputs():
    tokens = (jnp.arange(B_ * T_, dtype=jnp.int32).reshape(B_, T_) * 7) % 64
    positions = jnp.broadcast_to(jnp.arange(T_, dtype=jnp.int32), (B_, T_))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T_, T_), bool)), (B_, T_, T_))
    return tokens, positions, mask


def _logits(model):
    tokens, positions, mask = _inputs()
    return model(tokens, positions, None, mask)[0]


@nnx.jit
def _jit_logits(model):
    return _logits(model)


def _config():
    return rl.LoraConfig(rank=RANK, alpha=ALPHA)


def _random_adapters(model, key):
    """Random values for every adapter leaf of `model` (B too), as a pure dict."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, new)


def _adapted(name, mode="auto", key=1):
    model = MODELS[name]()
    rnnx.add_adapters(model, _config(), jax.random.key(0), mode=mode)
    rnnx.update_from_dict(model, _random_adapters(model, jax.random.key(key)))
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_all_linear_adapts_attention_and_mlp_and_leaves_embeddings_and_head(name):
    model = MODELS[name]()
    y0 = _logits(model)  # eager: op by op, so compiled fusions cannot differ in rounding
    rnnx.add_adapters(model, _config(), jax.random.key(0), mode="factored")
    params = rnnx.to_params(model)
    expected = {
        f"layers/{i}/{block}/{proj}"
        for i in range(2)
        for block, projs in (("attn", ATTN[name]), ("mlp", MLP))
        for proj in projs
    }
    assert set(rl.adapter_paths(params)) == expected
    # Zero B leaves the output exactly unchanged (the layer's own call plus an exact zero).
    np.testing.assert_array_equal(_logits(model), y0)


def _layer_weight(name, proj, w, a, b):
    """The merged delta of one weight, laid out by hand as the model stores it."""
    ab = lambda i=None: (a if i is None else a[i]) @ (b if i is None else b[i])  # noqa: E731
    if proj in ("q_proj", "k_proj", "v_proj"):  # (D, N, H): 'BTD,DNH->BTNH'
        return ab().reshape(w.shape)
    if proj in ("o_proj", "attn_vec_einsum", "down_proj", "gate_proj", "up_proj"):
        return ab().reshape(w.shape)  # (N, H, D) / (d_in, d_out): inputs first
    if proj == "q_einsum":  # (N, D, H): 'BTD,NDH->BTNH'
        n, d, h = w.shape
        return ab().reshape(d, n, h).transpose(1, 0, 2)
    if proj in ("kv_einsum", "qkv_einsum"):  # (C, K, D, H): one adapter per member c
        c, k, d, h = w.shape
        return np.stack([ab(i).reshape(d, k, h).transpose(1, 0, 2) for i in range(c)])
    raise AssertionError(proj)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_factored_fused_merged_and_model_on_merged_tree_agree(name):
    base = MODELS[name]()
    factored = _adapted(name, "factored")
    fused = _adapted(name, "fused")
    y_factored = _jit_logits(factored)
    y_fused = _jit_logits(fused)
    merged = rnnx.merge(factored)
    assert type(merged.layers[0].attn).__name__ == "Attention"
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    y_merged = _jit_logits(merged)
    # The model's own apply on the core merge of the pure dict.
    cfg = _config().replace(kernel_axes=rnnx.kernel_axes(base))
    tree = rl.merge(rnnx.to_params(factored), cfg)
    rnnx.update_from_dict(base, tree)
    y_own = _jit_logits(base)
    scale = float(jnp.abs(y_own).max())
    assert scale > 0
    for y in (y_factored, y_fused, y_merged):
        assert_close(y, y_own, rel=1e-5)
    # Each merged weight is W + (alpha/sqrt(r)) A @ B, laid out as the weight.
    before = rnnx.to_params(MODELS[name]())
    after = rnnx.to_params(merged)
    adapters = rnnx.to_params(factored)
    for i in range(2):
        for block, projs in (("attn", ATTN[name]), ("mlp", MLP)):
            for proj in projs:
                holder = adapters["layers"][i][block][proj]
                key = "kernel" if "kernel" in holder else "w"
                w0 = np.asarray(before["layers"][i][block][proj][key], np.float64)
                w1 = np.asarray(after["layers"][i][block][proj][key], np.float64)
                a = np.asarray(holder["lora_a"], np.float64)
                b = np.asarray(holder["lora_b"], np.float64)
                assert_close(w1 - w0, SCALE * _layer_weight(name, proj, w0, a, b), rel=1e-5)


@pytest.mark.parametrize("name", ["gemma3_gqa", "qwen3"])
def test_jitted_step_trains_only_the_adapters(name):
    model = MODELS[name]()
    rnnx.add_adapters(model, _config(), jax.random.key(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    frozen = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    lora0 = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))

    @nnx.jit
    def step(model, opt):
        def loss(m):
            return jnp.mean(jnp.square(_logits(m)))

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return value

    for _ in range(2):
        step(model, opt)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, after, frozen)
    lora1 = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    moved = jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != y)), lora1, lora0)
    assert all(jax.tree.leaves(moved))  # every adapter leaf (A and B) trained
    # Adam's state: two moments per adapter element, nothing for the frozen weights.
    n_adapters = rnnx.num_adapter_params(model)
    moments = [
        x
        for x in jax.tree.leaves(nnx.state(opt))
        if hasattr(x, "shape") and x.ndim > 0 and x.size > 1
    ]
    assert sum(x.size for x in moments) == 2 * n_adapters


def test_peft_export_names_members_as_hf_modules(tmp_path):
    model = _adapted("gemma3_gqa")
    cfg = _config()
    params = rnnx.to_params(model)
    export_peft_mapped(tmp_path, params, cfg.replace(kernel_axes=rnnx.kernel_axes(model)),
                       tunix_module_map(params))  # fmt: skip
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert meta["use_rslora"] is True and meta["r"] == RANK
    tensors = safetensors.numpy.load_file(os.fspath(tmp_path / "adapter_model.safetensors"))
    kv = params["layers"][1]["attn"]["kv_einsum"]
    prefix = "base_model.model.model.layers.1.self_attn"
    for c, proj in enumerate(("k_proj", "v_proj")):
        np.testing.assert_array_equal(
            tensors[f"{prefix}.{proj}.lora_A.weight"], np.asarray(kv["lora_a"][c]).T
        )
        np.testing.assert_array_equal(
            tensors[f"{prefix}.{proj}.lora_B.weight"], np.asarray(kv["lora_b"][c]).T
        )
    assert len(tensors) == 2 * 2 * 7  # A and B, 2 layers, q k v o gate up down


def test_targets_naming_an_unadaptable_module_say_what_is_there():
    model = MODELS["llama3"]()
    with pytest.raises(ValueError, match=r"cannot adapt: 'embedder' \(64, 16\)"):
        rnnx.add_adapters(model, rl.LoraConfig(targets=["embedder", "q_proj"]), jax.random.key(0))
