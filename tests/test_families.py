"""Gemma 2, Gemma 3 (text), Qwen3, Phi-3 and mixed-layer Qwen2, checked against transformers.

Reference: tiny random transformers models (PyTorch, CPU, eager attention, float32) saved with
``save_pretrained``; every feature that differs from Llama is switched on and made to matter at
this size (sliding windows of 5 on 12 tokens mixed with global layers, small soft caps, query
scales other than ``head_dim``, separate local/global RoPE bases, linear and LongRoPE scaling on
both sides of the pre-training length, partial rotation, tied embeddings, biases). Our logits
must equal theirs to 1e-5 of the logit scale (measured: 2e-7 to 1.5e-6), scanned and unscanned;
the merged export must load with ``AutoModelForCausalLM`` as the same class with the same logits;
PEFT adapters must export to and import from PEFT with PEFT's logits (Phi-3 through its fused
``qkv_proj``/``gate_up_proj``); the fine-tuning command must train and export Phi-3.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import rslora_jax as rl
from rslora_jax import data
from rslora_jax.hf import load_config, load_pretrained, save_pretrained
from rslora_jax.hf.peft import export_peft, import_peft
from rslora_jax.models import (
    DecoderForCausalLM,
    GemmaConfig,
    LlamaConfig,
    Phi3Config,
    Qwen3Config,
    causal_lm_loss,
    convert_scan,
    families,
    init_params,
)
from rslora_jax.models.rope import Rope, RopeScaling
from tests._asserts import assert_close
from tests._torch_ref import IDS, LONGROPE, torch_logits, torch_model
from tests._torch_ref import family_hf_config as _hf_config
from tests._torch_ref import sharpened as _sharpened

RTOL = 1e-5  # max |ours - transformers| / max |transformers logits|
SHORT = IDS[:, :7]  # within Phi-3's pre-training length (8) below: LongRoPE's short factors
CASES = ["gemma2", "gemma3", "qwen3", "phi3", "qwen2_mixed"]
ARCH = {
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen2_mixed": "Qwen2ForCausalLM",
}


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    name = request.param
    model = _sharpened(torch_model(_hf_config(name)))
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return SimpleNamespace(
        name=name,
        model=model,
        dir=directory,
        ref={ids.shape[1]: torch_logits(model, ids) for ids in (IDS, SHORT)},
    )


@functools.cache
def _forward(config, lora_config=None, mode="factored"):
    """The model's apply: jitted when scanned (one compile per config; an eager scan compiles
    its body on every call), eager when not (op-by-op, compiled once per shape for all)."""
    apply = DecoderForCausalLM(config).apply
    if lora_config is not None:
        apply = rl.lora(apply, lora_config, mode=mode)
    return jax.jit(apply) if config.scan_layers else apply


def _logits(config, params, ids=IDS) -> np.ndarray:
    out = _forward(config)({"params": params}, jnp.asarray(ids, jnp.int32))
    return np.asarray(out, np.float32)


def _close(ours, ref, what="logits") -> None:
    assert_close(ours, ref, rel=RTOL, norm="max", what=what)


def _differs(ours, ref) -> bool:
    return float(np.abs(ours - ref).max()) > 1e-3 * float(np.abs(ref).max())


# --------------------------------------------------------------------------------------------
# Loading: parity with transformers


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_load_matches_transformers(case, scan):
    config, params = load_pretrained(case.dir, scan_layers=scan)
    assert config.model_type == _hf_config(case.name).model_type
    assert config.scan_layers == scan
    for ids in (IDS, SHORT):
        _close(_logits(config, params, ids), case.ref[ids.shape[1]], f"logits ({ids.shape[1]})")
    if scan:
        return
    # The features under test matter at this size: without them the comparison would fail.
    ref = case.ref[IDS.shape[1]]
    off = {
        "gemma2": [
            dict(attn_logit_softcapping=None, final_logit_softcapping=None),
            dict(layer_types=None, sliding_window=None),
        ],
        "gemma3": [dict(rope_local_base_freq=1e6, rope_scaling=None)],
        "qwen3": [dict(layer_types=None, sliding_window=None)],
        "phi3": [dict(rope_scaling=None), dict(sliding_window=None)],
        "qwen2_mixed": [dict(layer_types=None, sliding_window=None)],
    }[case.name]
    for changes in off:
        assert _differs(_logits(config.replace(**changes), params), ref), changes
    arch = config.arch
    assert len(arch.kinds) == (1 if case.name == "phi3" else 2)
    if case.name == "phi3":  # LongRoPE: the long factors beyond 8 positions, the short within
        assert arch.kinds[0].window == 5 and arch.ropes[0].rotary_dim == 4
        short = _logits(config, params, SHORT)
        assert _differs(_logits(config.replace(rope_scaling=None), params, SHORT), short)


def test_load_layout_and_fused_split(case):
    _, params = load_pretrained(case.dir, scan_layers=False)
    sd = {k: v.numpy() for k, v in case.model.state_dict().items()}
    layer = params["model"]["layers"]["1"]
    attn, mlp = layer["self_attn"], layer["mlp"]
    if case.name == "phi3":  # rows of the fused tensors, q | k | v and gate | up
        qkv = sd["model.layers.1.self_attn.qkv_proj.weight"]
        np.testing.assert_array_equal(attn["q_proj"]["kernel"], qkv[:32].T)
        np.testing.assert_array_equal(attn["k_proj"]["kernel"], qkv[32:48].T)
        np.testing.assert_array_equal(attn["v_proj"]["kernel"], qkv[48:].T)
        gate_up = sd["model.layers.1.mlp.gate_up_proj.weight"]
        np.testing.assert_array_equal(mlp["gate_proj"]["kernel"], gate_up[:40].T)
        np.testing.assert_array_equal(mlp["up_proj"]["kernel"], gate_up[40:].T)
    else:
        np.testing.assert_array_equal(
            attn["k_proj"]["kernel"], sd["model.layers.1.self_attn.k_proj.weight"].T
        )
    if case.name in ("gemma3", "qwen3"):
        np.testing.assert_array_equal(
            attn["q_norm"]["scale"], sd["model.layers.1.self_attn.q_norm.weight"]
        )
    if case.name.startswith("gemma"):
        assert "lm_head" not in params  # tied
        np.testing.assert_array_equal(
            layer["post_feedforward_layernorm"]["scale"],
            sd["model.layers.1.post_feedforward_layernorm.weight"],
        )


@pytest.mark.parametrize("name", ["gemma3", "phi3"])
def test_sharded_checkpoint_loads(name, tmp_path):
    model = torch_model(_hf_config(name), seed=1)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    config, params = load_pretrained(tmp_path)
    _close(_logits(config, params), torch_logits(model))


def test_mixed_layers_scan_remat_and_gradients_agree():
    """Gemma 3's two layer kinds: through nn.scan (a traced kind, lax.switch per layer) and
    unscanned with remat (nn.remat traces the kind too), logits and gradients agree."""
    cfg = GemmaConfig.tiny()
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
        init_params(cfg, jax.random.key(0)),
    )
    ids = jnp.asarray(IDS % cfg.vocab_size)
    unscanned_cfg = cfg.replace(scan_layers=False, remat=True)

    def loss(c, p):
        logits = DecoderForCausalLM(c).apply({"params": p}, ids[:, :-1])
        return causal_lm_loss(logits, ids[:, 1:])

    l0, g0 = jax.jit(jax.value_and_grad(functools.partial(loss, cfg)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, unscanned_cfg)))(
        convert_scan(params, to_scan=False)
    )
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert_close(convert_scan(g1, to_scan=True), g0, rel=1e-5)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g0))
    assert_close(
        _logits(cfg.replace(scan_layers=False), convert_scan(params, False), ids),
        _logits(cfg, params, ids),
        rel=5e-6,
    )


# --------------------------------------------------------------------------------------------
# Configs, names


@pytest.mark.parametrize(
    "config",
    [
        GemmaConfig.tiny(model_type="gemma2"),
        GemmaConfig.tiny(num_hidden_layers=4, rope_scaling={"rope_type": "linear", "factor": 8.0}),
        GemmaConfig.tiny(
            rope_local_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False
        ),
        Qwen3Config.tiny(sliding_window=6, layer_types=("full_attention", "sliding_attention")),
        Qwen3Config.tiny(sliding_window=6, attention_bias=True),
        Phi3Config.tiny(sliding_window=7),
        Phi3Config.tiny(partial_rotary_factor=0.5, rope_scaling={**LONGROPE, "factor": 4.0}),
        LlamaConfig.tiny(
            model_type="qwen2",
            attention_bias=True,
            sliding_window=6,
            layer_types=("full_attention", "sliding_attention"),
        ),
    ],
    ids=["gemma2", "gemma3", "gemma3-local", "qwen3", "qwen3-all", "phi3", "phi3-long", "qwen2"],
)
def test_config_round_trip(config, tmp_path):
    hf = config.to_hf()
    fam = families.family_of(config)
    assert fam is families.family(hf.model_type)
    assert type(config).from_hf(hf) == config
    hf.save_pretrained(tmp_path)
    assert type(config).from_hf(load_config(tmp_path)) == config


def test_config_errors():
    with pytest.raises(ValueError, match="hidden_activation='relu2'"):
        GemmaConfig.from_hf(_hf_config("gemma2", hidden_activation="relu2"))
    mm = transformers.Gemma3Config(text_config=dict(_hf_config("gemma3").to_dict()))
    with pytest.raises(ValueError, match="model_type='gemma3' is the multimodal"):
        GemmaConfig.from_hf(mm)
    bidir = _hf_config("gemma3", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        GemmaConfig.from_hf(bidir)
    yarn = _hf_config("qwen3", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        Qwen3Config.from_hf(yarn)
    with pytest.raises(ValueError, match="layer_types has 3 entries"):
        Qwen3Config.tiny(sliding_window=4, layer_types=("sliding_attention",) * 3)
    with pytest.raises(ValueError, match="sliding layers but sliding_window is None"):
        Qwen3Config.tiny(layer_types=("sliding_attention", "full_attention"))
    with pytest.raises(ValueError, match="short_factor has 2 entries; expected rotary_dim / 2 = 4"):
        Phi3Config.tiny(rope_scaling=LONGROPE)
    with pytest.raises(ValueError, match="rope_type='linear' is not supported"):
        Phi3Config.tiny(rope_scaling=RopeScaling("linear", 2.0))
    with pytest.raises(ValueError, match="gemma2' uses rope_theta in every layer"):
        GemmaConfig.tiny(model_type="gemma2", rope_local_base_freq=5.0)
    with pytest.raises(ValueError, match="model_type='gemma2' must be one of"):
        Qwen3Config.tiny(model_type="gemma2")
    with pytest.raises(ValueError, match="only qwen2 mixes"):
        LlamaConfig.tiny(
            model_type="mistral",
            sliding_window=4,
            layer_types=("sliding_attention", "full_attention"),
        )


def test_longrope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = _hf_config("phi3")
    rope = Phi3Config.from_hf(hf).arch.ropes[0]
    assert rope == Rope(1e4, 4, rope.scaling) and rope.scaling.factor == 64 / 8
    for long, seq_len in ((False, None), (True, 9)):
        inv, factor = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=seq_len)
        np.testing.assert_allclose(rope.inv_freq(long=long), inv.numpy(), rtol=1e-6)
        assert rope.scaling.cos_sin_factor == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_linear_modules_match_transformers(name, scan):
    """The family's Linear map as Hugging Face sees it is the torch model's nn.Linear modules."""
    hf = _hf_config(name)
    fam = families.family(hf.model_type)
    config = fam.from_hf(hf, scan_layers=scan)
    model = torch_model(hf)
    linears = {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not (config.tie_word_embeddings and n == "lm_head")
    }
    view = fam.fused_view()
    ours = {}
    for path, m in view.linear_modules(config).items():
        assert m.stacked == (scan and path.startswith("model/layers/")), path
        for layer, hf_name in enumerate(m.names):
            assert families.flax_module_path(hf_name, scan) == (path, layer if m.stacked else None)
            ours[hf_name] = (m.d_in, m.d_out)
    assert ours == linears
    assert fam.architecture(hf.model_type) == type(model).__name__ == ARCH[name]
    # Our own tree: the fused modules split into their members.
    split = {p.rsplit("/", 1)[-1] for p in fam.linear_modules(config)}
    assert split - {"lm_head"} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Saving: the merged export loads in transformers


def _random_params(config, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), shapes)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_save_round_trip_through_transformers(case, scan, tmp_path):
    config, params = load_pretrained(case.dir, scan_layers=scan)
    params = jax.tree.map(lambda x: x + 0.01, params)  # not the checkpoint's values
    ours = _logits(config, params)
    save_pretrained(tmp_path, params, config, max_shard_size="16KB")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(model).__name__ == ARCH[case.name]
    _close(ours, torch_logits(model))
    names = set(model.state_dict())
    if case.name == "phi3":  # joined again
        assert "model.layers.0.self_attn.qkv_proj.weight" in names
        assert not any("q_proj" in n or ".up_proj" in n for n in names)
    _, loaded = load_pretrained(tmp_path, scan_layers=scan)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_save_keeps_the_checkpoint_config(case, tmp_path):
    hf = load_config(case.dir)
    hf.eos_token_id = 7
    _, params = load_pretrained(case.dir)
    save_pretrained(tmp_path, params, hf)
    assert load_config(tmp_path).eos_token_id == 7
    assert load_config(tmp_path).architectures == [ARCH[case.name]]


# --------------------------------------------------------------------------------------------
# PEFT adapters


def _random_adapters(params, lora_config: rl.LoraConfig, seed: int):
    shapes = jax.eval_shape(lambda p: rl.init_adapters(p, lora_config, jax.random.key(0)), params)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "lora_magnitude":
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
        std = 0.1 if name == "lora_b" else 1.0 / np.sqrt(leaf.shape[-2])
        return jnp.asarray(rng.standard_normal(leaf.shape) * std, leaf.dtype)

    return rl.combine(jax.tree_util.tree_map_with_path(fill, shapes), params)


def _ours(config, lora_config, params, mode="factored") -> np.ndarray:
    out = _forward(config, lora_config, mode)({"params": params}, jnp.asarray(IDS, jnp.int32))
    return np.asarray(out, np.float32)


def _peft_logits(case, directory) -> np.ndarray:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(case.model), str(directory)).eval()
    return torch_logits(model)


EXPORTS = {  # (targets, method, rank_pattern, alpha_pattern)
    "all": ("all-linear", "lora", {"v_proj": 2, "down_proj": 4}, {"k_proj": 7.0}),
    "some-dora": (["q_proj", "k_proj", "up_proj"], "dora", {"k_proj": 2}, {"q_proj": 3.0}),
}


def _peft_case(case) -> None:
    if case.name == "qwen2_mixed":
        pytest.skip("Qwen2's PEFT names are Llama's (tests/test_peft.py)")


@pytest.mark.parametrize("export", sorted(EXPORTS))
def test_peft_export_matches_peft(case, export, tmp_path):
    _peft_case(case)
    scan = export == "all"
    config, base = load_pretrained(case.dir, scan_layers=scan)
    targets, method, ranks, alphas = EXPORTS[export]
    lcfg = rl.LoraConfig(
        rank=3,
        alpha=5.0,
        targets=targets,
        method=method,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        kernel_axes={"model/layers/.*": "lio"} if scan else None,
    )
    params = _random_adapters(base, lcfg, seed=1)
    ours = _ours(config, lcfg, params)
    assert _differs(ours, _logits(config, base))
    export_peft(tmp_path, params, lcfg, config)
    _close(ours, _peft_logits(case, tmp_path), "PEFT logits")
    if case.name != "phi3":
        return
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    if case.name == "phi3":  # PEFT's module names and shapes: the fused modules
        assert "qkv_proj" in meta["target_modules"]
        assert not {"q_proj", "k_proj", "v_proj", "up_proj"} & set(meta["target_modules"])
        tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
        b = tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
        assert b.shape == (64, 3 + 3 + 2 if export == "all" else 3 + 2)
    # And back: import gives the same function (each member: the fused rank).
    back, got = import_peft(tmp_path, base, config)
    _close(_ours(config, got, back), ours, "re-imported")


def test_peft_import_matches_peft(case, tmp_path):
    """An adapter PEFT made ("all-linear", per-module ranks) imports with PEFT's logits."""
    _peft_case(case)
    targets = "all-linear"
    pattern = {"o_proj": 2, "qkv_proj" if case.name == "phi3" else "v_proj": 5}
    pcfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=targets,
        use_rslora=True,
        init_lora_weights=False,  # random B: the adapter changes the output
        rank_pattern=pattern,
    )
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(case.model), pcfg).eval()
    model.save_pretrained(tmp_path)
    ref = torch_logits(model)
    for scan, mode in ((True, "factored"), (False, "fused")):
        config, base = load_pretrained(case.dir, scan_layers=scan)
        params, lcfg = import_peft(tmp_path, base, config)
        ours = _ours(config, lcfg, params, mode=mode)  # fused rounds W + s*A@B: 1e-5 more
        assert_close(ours, ref, rel=5e-5 if mode == "fused" else RTOL, norm="max", what=mode)
        expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert {p.rsplit("/", 1)[-1] for p in rl.adapter_paths(params)} == expected
    if case.name == "phi3":  # exported again: PEFT's file, tensor for tensor (shared A)
        export_peft(tmp_path / "again", params, lcfg, config)
        a = load_file(str(tmp_path / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


# --------------------------------------------------------------------------------------------
# The fine-tuning command


@pytest.mark.loose_dtypes  # optax's Adam is not strict-dtype-promotion clean
@pytest.mark.parametrize("name", ["phi3"])  # the other families differ from it only in the model
def test_finetune_command(name, tmp_path):
    from rslora_jax import finetune as ft

    hf = _hf_config(name, vocab_size=2048, max_position_embeddings=64)
    model = torch_model(hf)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data.BUILTIN_TOKENIZER_DIR / f, base_dir / f)
    text = tmp_path / "corpus.txt"
    text.write_text(data.stdlib_finetune_text()[:6000], encoding="utf-8")
    out = tmp_path / "run"
    args = ["--model", str(base_dir), "--data", str(text), "--steps", "3", "--batch-size", "2"]
    args += ["--seq-len", "16", "--rank", "4", "--lr", "3e-2", "--warmup-steps", "1"]
    args += ["--eval-every", "3", "--save-every", "3", "--no-progress", "--out", str(out)]
    assert ft.main(args) == 0

    config, params = load_pretrained(base_dir)
    restored, lcfg = rl.load_adapters(out / "adapters", params)
    # "all-linear": every projection of every layer, not the (tied) output layer.
    adapted = set(rl.adapter_paths(restored))
    assert {p.rsplit("/", 1)[-1] for p in adapted} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    ids = IDS[:, :10]
    apply = rl.lora(DecoderForCausalLM(config).apply, lcfg)
    ours = np.asarray(apply({"params": restored}, jnp.asarray(ids)), np.float32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        out / "merged", attn_implementation="eager"
    )
    assert type(merged).__name__ == ARCH[name]
    assert_close(torch_logits(merged, ids), ours, rel=2e-5, norm="max", what="merged")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), out / "peft").eval()
    assert_close(torch_logits(peft_model, ids), ours, rel=2e-5, norm="max", what="PEFT")
    meta = json.loads((out / "peft" / "adapter_config.json").read_text())
    expected = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"] if name == "phi3" else None
    if expected:
        assert meta["target_modules"] == expected


def test_families_registered():
    assert set(families.FAMILIES) >= {"gemma2", "gemma3_text", "qwen3", "phi3", "llama"}
    for fam in dict.fromkeys(families.FAMILIES.values()):
        assert fam.module is DecoderForCausalLM and callable(fam.param_specs)
    assert [f.name for f in families.family("phi3").fused] == ["qkv_proj", "gate_up_proj"]
    path = Path(families.__file__)
    assert path.name == "families.py"


def test_sharding_policy_per_family():
    """Column-parallel q/k/v/gate/up, row-parallel o/down, norms (q/k norms too) replicated."""
    from jax.sharding import PartitionSpec as P

    for config in (GemmaConfig.tiny(), Qwen3Config.tiny(), Phi3Config.tiny()):
        fam = families.family_of(config)
        shapes = jax.eval_shape(lambda k, c=config: init_params(c, k), jax.random.key(0))
        specs = fam.param_specs(shapes, ("fsdp", "model"))
        layers = specs["model"]["layers"]
        for name in ("q_proj", "k_proj", "v_proj"):
            assert layers["self_attn"][name]["kernel"] == P(None, "fsdp", "model")
        assert layers["self_attn"]["o_proj"]["kernel"] == P(None, "model", "fsdp")
        assert layers["mlp"]["up_proj"]["kernel"] == P(None, "fsdp", "model")
        assert layers["mlp"]["down_proj"]["kernel"] == P(None, "model", "fsdp")
        assert layers["input_layernorm"]["scale"] == P()
        if config.arch.qk_norm:
            assert layers["self_attn"]["q_norm"]["scale"] == P()


def test_packed_rows_match_one_example_per_row():
    """Segment ids reach every layer kind (Gemma 3's local and global layers, lax.switch): a row
    packing two examples, positions restarting, gives each example's logits alone."""
    cfg = GemmaConfig.tiny(sliding_window=3)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
        init_params(cfg, jax.random.key(0)),
    )
    a, b = IDS[0, :5] % cfg.vocab_size, IDS[1, :7] % cfg.vocab_size
    packed = jnp.asarray(np.concatenate([a, b])[None])
    segments = jnp.asarray([[1] * 5 + [2] * 7])
    positions = jnp.asarray([list(range(5)) + list(range(7))])
    out = jax.jit(DecoderForCausalLM(cfg).apply)({"params": params}, packed, positions, segments)
    alone_a = _logits(cfg, params, a[None])
    alone_b = _logits(cfg, params, b[None])
    assert_close(out[:, :5], alone_a, rel=5e-6, norm="max", what="first example")
    assert_close(out[:, 5:], alone_b, rel=5e-6, norm="max", what="second example")
