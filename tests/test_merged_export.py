"""Merged export: trained adapters -> `merge` -> `save_pretrained` -> transformers on PyTorch.

Reference: transformers' own ``AutoModelForCausalLM.from_pretrained`` (eager attention) on the
directory we write must give the logits of our factored forward pass (adapters not merged):
float32 to 1e-5 of the logit scale (measured: 4e-7 to 8e-7). A bfloat16 export must hold exactly
the bfloat16 rounding of the float32 merged weights (checked to 1e-5 against our forward on
those rounded weights: measured 3e-7 to 5e-7) and stay close to the float32 result (measured:
0.8e-2 to 1.3e-2 relative).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import rslora_jax as rl
from rslora_jax.hf import load_pretrained, save_pretrained
from rslora_jax.models import LlamaForCausalLM
from tests._asserts import assert_close, rel_error
from tests._torch_ref import IDS, TINY, torch_logits, torch_model

RTOL = 1e-5  # max |ours - transformers| / max |transformers logits|
BF16_RTOL = 5e-2  # bf16 weights against the float32 result


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Tiny saved checkpoints: Llama (biases on q/k/v/o), Qwen2 (q/k/v bias, tied embeddings)."""
    out = {}
    for name, hf_config in (
        ("llama", transformers.LlamaConfig(**TINY, attention_bias=True)),
        ("qwen2", transformers.Qwen2Config(**TINY, tie_word_embeddings=True)),
    ):
        model = torch_model(hf_config)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = SimpleNamespace(name=name, model=model, dir=directory)
    return out


def _reload(directory, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), attn_implementation="eager", **kwargs
    )
    return model.eval()


def _trained(params, lora_config: rl.LoraConfig, seed: int):
    """Adapters as after training: `init`'s structure, random A and B (B = 0 hides bugs)."""
    shapes = jax.eval_shape(lambda p: rl.init_adapters(p, lora_config, jax.random.key(0)), params)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        std = 0.1 if path[-1].key == "lora_b" else 1.0 / np.sqrt(leaf.shape[-2])
        return jnp.asarray(rng.standard_normal(leaf.shape) * std, leaf.dtype)

    return rl.combine(jax.tree_util.tree_map_with_path(fill, shapes), params)


def _apply(config, lora_config, params) -> np.ndarray:
    fn = LlamaForCausalLM(config).apply
    if lora_config is not None:
        fn = rl.lora(fn, lora_config, mode="factored")
    return np.asarray(fn({"params": params}, jnp.asarray(IDS, jnp.int32)), np.float32)


@pytest.mark.parametrize(
    ("name", "scan"), [("llama", True), ("llama", False), ("qwen2", False)], ids=str
)
def test_merged_export_matches_factored_forward(families, tmp_path, name, scan):
    family = families[name]
    config, base = load_pretrained(family.dir, scan_layers=scan)
    lcfg = rl.LoraConfig(
        rank=3,
        alpha=5.0,
        rank_pattern={"v_proj": 2, "down_proj": 4},
        alpha_pattern={"o_proj": 7.0},
        kernel_axes="lio" if scan else None,
    )
    params = _trained(base, lcfg, seed=1)
    ours = _apply(config, lcfg, params)  # factored: the adapters are never merged here

    save_pretrained(tmp_path, rl.merge(params, lcfg), config)
    reloaded = _reload(tmp_path)
    ref = torch_logits(reloaded)
    assert rel_error(ref, torch_logits(family.model), norm="max") > 1e-2  # the adapters matter
    assert_close(ours, ref, rel=RTOL, norm="max")
    # The stored weight is W + s * A @ B in (out, in) layout, written out here (float64).
    layers = params["model"]["layers"]
    q = layers["self_attn"]["q_proj"] if scan else layers["1"]["self_attn"]["q_proj"]
    w, a, b = (np.asarray(q[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
    if scan:
        w, a, b = w[1], a[1], b[1]
    path = "model/layers/self_attn/q_proj" if scan else "model/layers/1/self_attn/q_proj"
    want = (w + lcfg.scale_for(path) * a @ b).T
    got = reloaded.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    assert_close(got, want, rel=1e-6)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_merged_export_bf16(families, tmp_path, name):
    config, base = load_pretrained(families[name].dir, scan_layers=False)
    lcfg = rl.LoraConfig(rank=3, alpha=5.0, rank_pattern={"v_proj": 2})
    params = _trained(base, lcfg, seed=2)
    ours = _apply(config, lcfg, params)
    merged = rl.merge(params, lcfg)
    save_pretrained(tmp_path, merged, config, dtype="bfloat16")

    with open(tmp_path / "config.json", encoding="utf-8") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # transformers loads it (as float32 here: CPU bf16 matmuls would add their own rounding).
    reloaded = _reload(tmp_path, dtype=torch.float32)
    ref = torch_logits(reloaded)
    # Exactly the bf16 rounding of the float32 merged weights...
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), merged)
    assert_close(_apply(config, None, rounded), ref, rel=RTOL, norm="max")
    # ... and close to the float32 model.
    assert_close(ref, ours, rel=BF16_RTOL, norm="max", what="bf16 export")
    # Also loads in bfloat16 as a server would.
    native = _reload(tmp_path)
    assert native.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert_close(torch_logits(native), ours, rel=BF16_RTOL, norm="max", what="bf16 load")
