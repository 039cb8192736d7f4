"""PEFT-format adapters in and out, checked against Hugging Face PEFT on PyTorch (CPU).

Reference: a tiny random transformers model (eager attention, float32) saved with
``save_pretrained``; PEFT's ``PeftModel.from_pretrained`` on it must give the logits of our
factored forward pass to 1e-5 of the logit scale (measured: 2e-7 to 1.2e-6), and adapters that
PEFT creates and saves must import into our tree with the same logits. Per-module scales are
compared with PEFT's own ``LoraLayer.scaling`` and ``peft.utils.other.get_pattern_key``.
Factors are random, non-square (rank 2-4 on widths 16-40) and non-symmetric, so a transposed or
mis-scaled factor cannot pass.
"""

from __future__ import annotations

import copy
import json
import os
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
from peft.utils.other import get_pattern_key
from safetensors.numpy import load_file, save_file

import rslora_jax as rl
from rslora_jax.hf import flax_module_path
from rslora_jax.hf import io as hf_io
from rslora_jax.hf.peft import PeftFormatWarning, export_peft, import_peft
from rslora_jax.models import LlamaConfig, LlamaForCausalLM, convert_scan, init_params
from tests._asserts import assert_close, rel_error
from tests._faults import die_between_renames
from tests._torch_ref import IDS, TINY, VOCAB, hf_base, torch_logits

RTOL = 1e-5  # max |ours - PEFT| / max |PEFT logits|
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


_base = hf_base


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _base(tmp_path_factory, "llama", transformers.LlamaConfig(**TINY))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):  # q/k/v bias, tied embeddings
    return _base(
        tmp_path_factory, "qwen2", transformers.Qwen2Config(**TINY, tie_word_embeddings=True)
    )


def _peft_model(base, directory):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base.model), str(directory)).eval()


def _ours(config: LlamaConfig, lora_config: rl.LoraConfig, params, mode="factored") -> np.ndarray:
    # Eager: the ops compile once and are shared by every config and layout of this file.
    apply = rl.lora(LlamaForCausalLM(config).apply, lora_config, mode=mode)
    return np.asarray(apply({"params": params}, jnp.asarray(IDS, jnp.int32)), np.float32)


def _random_adapters(params, lora_config: rl.LoraConfig, seed: int, std_b: float = 0.1):
    """`init`'s adapter structure (abstract, no compile) filled with random A and B."""
    shapes = jax.eval_shape(lambda p: rl.init_adapters(p, lora_config, jax.random.key(0)), params)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        std = std_b if name == "lora_b" else 1.0 / np.sqrt(leaf.shape[-2])
        return jnp.asarray(rng.standard_normal(leaf.shape) * std, leaf.dtype)

    return rl.combine(jax.tree_util.tree_map_with_path(fill, shapes), params)


def _peft_scalings(peft_model, scan: bool) -> dict[tuple[str, int | None], tuple[int, float]]:
    """{(our path, layer): (r, scaling)} read off PEFT's LoRA layers."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.scaling:
            path, layer = flax_module_path(name.removeprefix(PREFIX), scan_layers=scan)
            out[(path, layer)] = (module.r["default"], module.scaling["default"])
    return out


def _config_json(directory) -> dict:
    with open(Path(directory) / "adapter_config.json", encoding="utf-8") as f:
        return json.load(f)


def _tensors(directory) -> dict[str, np.ndarray]:
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def _adapters_equal(a, b) -> None:
    ad_a, ad_b = rl.split(a)[0], rl.split(b)[0]
    assert jax.tree.structure(ad_a) == jax.tree.structure(ad_b)
    for x, y in zip(jax.tree.leaves(ad_a), jax.tree.leaves(ad_b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _patterns(scan: bool):
    """Rank/alpha patterns: by module type; unscanned also per layer."""
    if scan:
        return {"v_proj": 2, "down_proj": 4}, {"o_proj": 7.0, "gate_proj": 2.5}
    return (
        {"v_proj": 2, "layers/1/mlp/down_proj": 4},
        {"o_proj": 7.0, "model/layers/0/mlp/gate_proj": 2.5},
    )


# --------------------------------------------------------------------------------------------
# Export: our adapters -> PEFT on PyTorch


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("scaling", ["rslora", "lora"])
def test_export_matches_peft(llama, tmp_path, scan, scaling):
    config, base = llama.layouts[scan]
    ranks, alphas = _patterns(scan)
    lcfg = rl.LoraConfig(
        rank=3,
        alpha=5.0,
        scaling=scaling,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        kernel_axes="lio" if scan else None,
    )
    params = _random_adapters(base, lcfg, seed=1)
    export_peft(tmp_path, params, lcfg, config)

    meta = _config_json(tmp_path)
    assert meta["peft_type"] == "LORA" and meta["use_rslora"] is (scaling == "rslora")
    assert (meta["r"], meta["lora_alpha"], meta["task_type"]) == (3, 5, "CAUSAL_LM")
    assert sorted(meta["target_modules"]) == sorted(ALL7)
    assert len(_tensors(tmp_path)) == 2 * 7 * TINY["num_hidden_layers"]

    pm = _peft_model(llama, tmp_path)
    # PEFT's per-module rank and scale are ours, for every module and layer.
    found = _peft_scalings(pm, scan)
    assert len(found) == 7 * TINY["num_hidden_layers"]
    for (path, _), (r, scale) in found.items():
        assert r == lcfg.rank_for(path)
        assert scale == pytest.approx(lcfg.scale_for(path), rel=1e-12)
    ref = torch_logits(pm)
    assert rel_error(ref, torch_logits(llama.model), norm="max") > 1e-2  # the adapter matters
    assert_close(_ours(config, lcfg, params), ref, rel=RTOL, norm="max")
    # The fused forward (merged kernel per call, rslora_jax.fused) computes the same model.
    assert_close(_ours(config, lcfg, params, mode="fused"), ref, rel=RTOL, norm="max")


def test_export_qwen2_regex_targets(qwen2, tmp_path):
    """q/k/v bias, tied embeddings, and targets that a list of names would over-match."""
    config, base = qwen2.layouts[False]
    lcfg = rl.LoraConfig(
        rank=3,
        alpha=4.0,
        targets=r"model/layers/1/self_attn/q_proj|.*/(k_proj|down_proj)",
        rank_pattern={"layers/0/mlp/down_proj": 2},
    )
    params = _random_adapters(base, lcfg, seed=2)
    export_peft(tmp_path, params, lcfg, config, base_model_name_or_path="tiny/qwen2")
    meta = _config_json(tmp_path)
    assert isinstance(meta["target_modules"], str)  # ["q_proj", ...] would adapt layer 0 too
    assert meta["base_model_name_or_path"] == "tiny/qwen2"
    pm = _peft_model(qwen2, tmp_path)
    found = _peft_scalings(pm, scan=False)
    assert sorted(p for p, _ in found) == sorted(rl.adapter_paths(params))
    for (path, _), (r, scale) in found.items():
        assert (r, scale) == (lcfg.rank_for(path), pytest.approx(lcfg.scale_for(path)))
    ref = torch_logits(pm)
    assert rel_error(ref, torch_logits(qwen2.model), norm="max") > 1e-2
    assert_close(_ours(config, lcfg, params), ref, rel=RTOL, norm="max")


def _with_magnitudes(params, lora_config: rl.LoraConfig, seed: int):
    """Adds DoRA magnitudes: the column norms of W + s*A@B (numpy), perturbed as by training."""
    rng = np.random.default_rng(seed)

    def walk(tree, prefix):
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree:
            path = "/".join(prefix)
            w = np.asarray(tree["kernel"], np.float64)
            a, b = np.asarray(tree["lora_a"], np.float64), np.asarray(tree["lora_b"], np.float64)
            v = w + lora_config.scale_for(path) * a @ b
            norm = np.sqrt((v * v).sum(axis=-2))
            m = norm * (1 + 0.2 * rng.standard_normal(norm.shape))
            return {**tree, "lora_magnitude": jnp.asarray(m, jnp.float32)}
        return {k: walk(v, (*prefix, k)) for k, v in tree.items()}

    return walk(params, ())


def test_lm_head_adapter_round_trip(llama, tmp_path):
    """An untied lm_head is a Linear like the others (PEFT adapts it when asked)."""
    config, base = llama.layouts[False]
    lcfg = rl.LoraConfig(rank=4, alpha=3.0, targets=["lm_head", "o_proj"], scaling="lora")
    params = _random_adapters(base, lcfg, seed=17)
    export_peft(tmp_path, params, lcfg, config)
    assert f"{PREFIX}lm_head.lora_B.weight" in _tensors(tmp_path)
    ref = torch_logits(_peft_model(llama, tmp_path))
    assert rel_error(ref, torch_logits(llama.model), norm="max") > 1e-2
    assert_close(_ours(config, lcfg, params), ref, rel=RTOL, norm="max")
    back, got = import_peft(tmp_path, base, config)
    _adapters_equal(back, params)
    assert got.scale_for("lm_head") == 3.0 / 4


def test_export_dora_matches_peft(llama, tmp_path):
    config, base = llama.layouts[False]
    targets = ["q_proj", "v_proj", "up_proj"]
    lcfg = rl.LoraConfig(rank=3, alpha=6.0, targets=targets, use_dora=True)
    plain = rl.LoraConfig(rank=3, alpha=6.0, targets=targets)
    params = _with_magnitudes(_random_adapters(base, plain, seed=3), lcfg, seed=3)
    export_peft(tmp_path / "u", params, lcfg, config)
    meta, tensors = _config_json(tmp_path / "u"), _tensors(tmp_path / "u")
    assert meta["use_dora"] is True
    key = f"{PREFIX}model.layers.1.mlp.up_proj.lora_magnitude_vector"
    np.testing.assert_array_equal(
        tensors[key], np.asarray(params["model"]["layers"]["1"]["mlp"]["up_proj"]["lora_magnitude"])
    )
    ref = torch_logits(_peft_model(llama, tmp_path / "u"))
    assert rel_error(ref, torch_logits(llama.model), norm="max") > 1e-2
    assert_close(_ours(config, lcfg, params), ref, rel=RTOL, norm="max")
    back, got = import_peft(tmp_path / "u", base, config)
    assert got.use_dora
    _adapters_equal(back, params)
    # Scanned: stacked magnitudes give the same file, and come back stacked.
    scanned = convert_scan(params, to_scan=True)
    lcfg_s = rl.LoraConfig(rank=3, alpha=6.0, targets=targets, use_dora=True, kernel_axes="lio")
    export_peft(tmp_path / "s", scanned, lcfg_s, config)
    other = _tensors(tmp_path / "s")
    assert sorted(other) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(other[k], tensors[k])
    config_s, base_s = llama.layouts[True]
    back, _ = import_peft(tmp_path / "s", base_s, config_s)
    _adapters_equal(back, scanned)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_export_pissa_olora_loads_on_original_base(llama, tmp_path, init):
    """init_lora_weights is recorded: PEFT rebuilds the residual from the original base."""
    config, base = llama.layouts[False]
    # (no rank_pattern: PEFT warns about rsLoRA + patterns + base-changing inits)
    lcfg = rl.LoraConfig(rank=3, alpha=5.0, init=init, targets=["q_proj", "down_proj"])
    adapters, residual = rl.split(rl.init(base, lcfg, jax.random.key(15)))
    rng = np.random.default_rng(15)  # as after training
    adapters = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape), adapters)
    params = rl.combine(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapters), residual)
    export_peft(tmp_path, params, lcfg, config)
    assert _config_json(tmp_path)["init_lora_weights"] == init
    ref = torch_logits(_peft_model(llama, tmp_path))  # the original (not residual) base
    assert rel_error(ref, torch_logits(llama.model), norm="max") > 1e-2
    assert_close(_ours(config, lcfg, params), ref, rel=RTOL, norm="max")
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*residual base"):
        import_peft(tmp_path, base, config)


def test_export_layouts_write_the_same_file(llama, tmp_path):
    """Scanned and unscanned trees with the same adapters give identical files."""
    config, base = llama.layouts[True]
    lcfg = rl.LoraConfig(rank=3, alpha=5.0, rank_pattern={"up_proj": 2}, kernel_axes="lio")
    params = _random_adapters(base, lcfg, seed=4)
    export_peft(tmp_path / "s", params, lcfg, config)
    unscanned_cfg = rl.LoraConfig(rank=3, alpha=5.0, rank_pattern={"up_proj": 2})
    export_peft(tmp_path / "u", convert_scan(params, to_scan=False), unscanned_cfg, config)
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "u")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert _config_json(tmp_path / "s") == _config_json(tmp_path / "u")
    # Readable by a server running as another user (safetensors itself writes mode 0600).
    for f in (tmp_path / "s").iterdir():
        assert f.stat().st_mode & 0o044 == 0o044, f


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_round_trip_export_import(llama, tmp_path, scan):
    config, base = llama.layouts[scan]
    ranks, alphas = _patterns(scan)
    lcfg = rl.LoraConfig(
        rank=3,
        alpha=5.0,
        targets=["q_proj", "v_proj", "down_proj", "gate_proj"],
        rank_pattern=ranks,
        alpha_pattern=alphas,
        kernel_axes="lio" if scan else None,
        dropout=0.1,
    )
    params = _random_adapters(base, lcfg, seed=5)
    export_peft(tmp_path, params, lcfg, config)
    back, got = import_peft(tmp_path, base, config)
    _adapters_equal(back, params)
    assert (got.rank, got.alpha, got.scaling, got.dropout) == (3, 5.0, "rslora", 0.1)
    for path in _all_kernel_paths(base):
        assert got.is_target(path, None) == lcfg.is_target(path, None), path
    for path in rl.adapter_paths(params):
        assert (got.rank_for(path), got.alpha_for(path)) == (
            lcfg.rank_for(path),
            lcfg.alpha_for(path),
        )
        assert got.scale_for(path) == lcfg.scale_for(path)
    # The imported tree merges exactly like the original one.
    merged_a, merged_b = rl.merge(params, lcfg), rl.merge(back, got)
    for x, y in zip(jax.tree.leaves(merged_a), jax.tree.leaves(merged_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _all_kernel_paths(tree, prefix=()):
    if isinstance(tree, dict):
        if "kernel" in tree:
            yield "/".join(prefix)
        for k, v in tree.items():
            yield from _all_kernel_paths(v, (*prefix, k))


def test_export_bf16_and_dtype_option(llama, tmp_path):
    config, base = llama.layouts[False]
    lcfg = rl.LoraConfig(rank=2, alpha=2.0, targets=["o_proj"], dtype="bfloat16")
    params = _random_adapters(base, lcfg, seed=6)
    export_peft(tmp_path / "bf16", params, lcfg, config)
    export_peft(tmp_path / "f32", params, lcfg, config, dtype="float32")
    bf, f32 = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "f32")
    key = f"{PREFIX}model.layers.0.self_attn.o_proj.lora_B.weight"
    assert bf[key].dtype == jnp.bfloat16 and f32[key].dtype == np.float32
    np.testing.assert_array_equal(bf[key].astype(np.float32), f32[key])
    back, got = import_peft(tmp_path / "bf16", base, config, dtype="bfloat16")
    _adapters_equal(back, params)
    assert got.dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------------
# Import: adapters trained with PEFT on PyTorch -> our tree

IMPORT_CASES = {
    # scanned: module-type patterns (dotted keys), the 7 projections as a list
    "scanned-rslora": dict(
        scan=True,
        kwargs=dict(
            use_rslora=True,
            target_modules=ALL7,
            rank_pattern={"v_proj": 2, "mlp.down_proj": 4},
            alpha_pattern={"self_attn.o_proj": 7, "gate_proj": 2.5},
        ),
    ),
    # unscanned: a regex target string and per-layer patterns
    "unscanned-lora-regex": dict(
        scan=False,
        kwargs=dict(
            use_rslora=False,
            target_modules=r".*\.(q_proj|v_proj|down_proj|up_proj)",
            rank_pattern={r"layers\.1\.mlp\.down_proj": 4, "v_proj": 2},
            alpha_pattern={r"model\.layers\.0\.self_attn\.q_proj": 7, "up_proj": 1.5},
        ),
    ),
    # unscanned: only layer 1 (layers_to_transform), names excluded by exclude_modules
    "unscanned-rslora-layers": dict(
        scan=False,
        kwargs=dict(
            use_rslora=True,
            target_modules=ALL7,
            exclude_modules=["k_proj"],
            layers_to_transform=[1],
            rank_pattern={"o_proj": 2},
        ),
    ),
}


def _save_peft_adapter(base, directory, seed: int, **kwargs):
    """A PEFT adapter on PyTorch with random A and B (not B = 0), saved as PEFT saves it."""
    lora = peft.LoraConfig(r=3, lora_alpha=5, task_type="CAUSAL_LM", **kwargs)
    pm = peft.get_peft_model(copy.deepcopy(base.model), lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    pm.eval().save_pretrained(str(directory))
    return pm


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_import_matches_peft(llama, tmp_path, case):
    scan, kwargs = IMPORT_CASES[case]["scan"], IMPORT_CASES[case]["kwargs"]
    pm = _save_peft_adapter(llama, tmp_path / "peft", seed=7, **kwargs)
    ref = torch_logits(pm)
    assert rel_error(ref, torch_logits(llama.model), norm="max") > 1e-2
    config, base = llama.layouts[scan]

    params, got = import_peft(tmp_path / "peft", base, config)
    assert got.scaling == ("rslora" if kwargs["use_rslora"] else "lora")
    # Per-module rank and scale: PEFT's own numbers.
    found = _peft_scalings(pm, scan)
    assert sorted({p for p, _ in found}) == sorted(rl.adapter_paths(params))
    for (path, _), (r, scale) in found.items():
        assert got.rank_for(path) == r
        assert got.scale_for(path) == pytest.approx(scale, rel=1e-12)
    for path in _all_kernel_paths(base):
        assert got.is_target(path, None) == (path in rl.adapter_paths(params))
    assert_close(_ours(config, got, params), ref, rel=RTOL, norm="max")

    # Exporting what we imported writes PEFT's tensors back, bit for bit, and a config that
    # gives every module PEFT's rank and alpha under PEFT's own pattern rule.
    export_peft(tmp_path / "ours", params, got, config)
    theirs, ours = _tensors(tmp_path / "peft"), _tensors(tmp_path / "ours")
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(theirs[k], ours[k])
    a, b = _config_json(tmp_path / "peft"), _config_json(tmp_path / "ours")
    assert (a["r"], a["lora_alpha"], a["use_rslora"]) == (b["r"], b["lora_alpha"], b["use_rslora"])
    for key in theirs:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            for field, default in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
                va = a[field].get(get_pattern_key(a[field], name), a[default])
                vb = b[field].get(get_pattern_key(b[field], name), b[default])
                assert va == vb, (name, field)


def test_import_missing_use_rslora_reads_as_peft(llama, tmp_path):
    config, base = llama.layouts[False]
    _save_peft_adapter(llama, tmp_path, seed=8, use_rslora=True, target_modules=["q_proj"])
    meta = _config_json(tmp_path)
    del meta["use_rslora"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.warns(PeftFormatWarning, match="no 'use_rslora' field"):
        _, got = import_peft(tmp_path, base, config)
    # PEFT's default (LoraConfig.use_rslora=False): alpha / r.
    assert peft.LoraConfig().use_rslora is False
    assert got.scaling == "lora"
    assert got.scale_for("model/layers/0/self_attn/q_proj") == 5 / 3


# --------------------------------------------------------------------------------------------
# Strictness


@pytest.fixture(scope="module")
def good(llama, tmp_path_factory):
    """A valid export (unscanned layout, rank 3, v_proj rank 2, all 7 projections)."""
    config, base = llama.layouts[False]
    lcfg = rl.LoraConfig(rank=3, alpha=5.0, rank_pattern={"v_proj": 2})
    directory = tmp_path_factory.mktemp("good")
    export_peft(directory, _random_adapters(base, lcfg, seed=9), lcfg, config)
    return SimpleNamespace(dir=directory, config=config, base=base)


def _edited(good, tmp_path, tensors=None, meta=None) -> Path:
    directory = tmp_path / "edited"
    shutil.copytree(good.dir, directory)
    if tensors is not None:
        t = _tensors(directory)
        tensors(t)
        save_file(t, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    if meta is not None:
        m = _config_json(directory)
        meta(m)
        (directory / "adapter_config.json").write_text(json.dumps(m))
    return directory


Q0 = f"{PREFIX}model.layers.0.self_attn.q_proj"
K1 = f"{PREFIX}model.layers.1.self_attn.k_proj"


def _set(key, fn):
    def edit(t):
        t[key] = np.ascontiguousarray(fn(t[key]))

    return edit


def _set_many(**edits):
    def edit(t):
        for key, fn in edits.items():
            t[key] = np.ascontiguousarray(fn(t[key]))

    return edit


def _add(key, shape):
    def edit(t):
        t[key] = np.zeros(shape, np.float32)

    return edit


def _drop(key):
    return lambda t: t.pop(key)


TENSOR_ERRORS = {
    "transposed_A": (
        _set(f"{Q0}.lora_A.weight", lambda x: x.T),
        r"lora_A.weight' has shape \(32, 3\), expected \(3, 32\).*stored transposed",
    ),
    "transposed_B": (
        _set(f"{K1}.lora_B.weight", lambda x: x.T),
        r"k_proj.lora_B.weight' has shape \(3, 16\), expected \(16, 3\).*stored transposed",
    ),
    "wrong_rank": (
        # Consistent factors of rank 4 where the config says 3: the scale would be wrong.
        lambda t: t.update(
            {
                f"{Q0}.lora_A.weight": np.ones((4, 32), np.float32),
                f"{Q0}.lora_B.weight": np.ones((32, 4), np.float32),
            }
        ),
        r"has shape \(4, 32\), expected \(3, 32\).*rank is 4, but the config .* says 3",
    ),
    "wrong_in_features": (
        _set(f"{Q0}.lora_A.weight", lambda x: x[:, :31]),
        r"shape \(3, 31\), expected \(3, 32\) .*in_features=32",
    ),
    "missing": (
        _drop(f"{K1}.lora_B.weight"),
        r"missing tensors \(1\): \['base_model.model.model.layers.1.self_attn.k_proj.lora_B",
    ),
    "unknown_module": (
        _add(f"{PREFIX}model.layers.7.self_attn.q_proj.lora_A.weight", (3, 32)),
        r"unexpected tensors .*layers.7.self_attn.q_proj.* does not exist in the base params",
    ),
    "embedding": (
        _add(f"{PREFIX}model.embed_tokens.lora_embedding_A", (3, VOCAB)),
        r"unexpected tensors .*embed_tokens.lora_embedding_A \(LoRA on an embedding",
    ),
    "modules_to_save": (
        _add(f"{PREFIX}lm_head.modules_to_save.weight", (VOCAB, 32)),
        r"unexpected tensors .*lm_head.modules_to_save.weight \(not a LoRA factor\)",
    ),
    "magnitude_without_dora": (
        _add(f"{Q0}.lora_magnitude_vector", (32,)),
        r"lora_magnitude_vector \('lora_magnitude_vector' needs use_dora\)",
    ),
    "lora_bias": (
        _add(f"{Q0}.lora_B.bias", (32,)),
        r"q_proj.lora_B.bias \(a bias on B, but the config has no lora_bias=true\)",
    ),
    "integer_dtype": (
        _set(f"{Q0}.lora_A.weight", lambda x: x.astype(np.int32)),
        r"has dtype I32",
    ),
}


@pytest.mark.parametrize("case", sorted(TENSOR_ERRORS))
def test_import_tensor_errors(good, tmp_path, case):
    edit, match = TENSOR_ERRORS[case]
    directory = _edited(good, tmp_path, tensors=edit)
    with pytest.raises(ValueError, match=match):
        import_peft(directory, good.base, good.config)


def _meta_set(**fields):
    return lambda m: m.update(fields)


CONFIG_ERRORS = {
    "peft_type": (_meta_set(peft_type="IA3"), r"peft_type='IA3'; only 'LORA'"),
    # bias, lora_bias, modules_to_save and embedding targets are imported now
    # (tests/test_peft_extras.py); here: an unknown value, or the tensors they need are missing.
    "bias": (_meta_set(bias="some"), r"bias='some'"),
    "lora_bias": (_meta_set(lora_bias=True), r"missing tensors \(14\).*q_proj\.lora_B\.bias"),
    "fan_in_fan_out": (_meta_set(fan_in_fan_out=True), r"fan_in_fan_out=True"),
    "layer_replication": (_meta_set(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    "alora": (_meta_set(alora_invocation_tokens=[1, 2]), "alora_invocation_tokens"),
    "modules_to_save": (
        _meta_set(modules_to_save=["lm_head"]),
        r"missing tensors \(1\).*'base_model\.model\.lm_head\.weight'",
    ),
    "embedding_target": (
        lambda m: m["target_modules"].append("embed_tokens"),
        r"missing tensors \(2\).*model\.embed_tokens\.lora_embedding_A",
    ),
    "pissa": (_meta_set(init_lora_weights="pissa"), r"init_lora_weights='pissa'.*residual base"),
    "dora_without_magnitudes": (
        _meta_set(use_dora=True),
        r"missing tensors \(14\): .*lora_magnitude_vector",
    ),
    "config_rank": (
        _meta_set(r=4),  # the file's factors have rank 3
        r"lora_A.weight' has shape \(3, (\d+)\), expected \(4, \1\).*rank 4 from the "
        r"config's r\).*its rank is 3, but the config",
    ),
    "config_rank_pattern": (
        _meta_set(rank_pattern={"v_proj": 3}),
        r"v_proj.lora_A.weight' has shape \(2, 32\), expected \(3, 32\).*rank_pattern",
    ),
    "no_targets": (_meta_set(target_modules=["nothing"]), "selects no Linear module"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_import_config_errors(good, tmp_path, case):
    edit, match = CONFIG_ERRORS[case]
    directory = _edited(good, tmp_path, meta=edit)
    with pytest.raises(ValueError, match=match):
        import_peft(directory, good.base, good.config)


def test_import_tied_lm_head_refused(qwen2, tmp_path):
    config, base = qwen2.layouts[False]
    lcfg = rl.LoraConfig(rank=2, alpha=2.0, targets=["q_proj"])
    export_peft(tmp_path, _random_adapters(base, lcfg, seed=10), lcfg, config)
    meta = _config_json(tmp_path)
    meta["target_modules"] = ["q_proj", "lm_head"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="adapts 'lm_head', the tied lm_head"):
        import_peft(tmp_path, base, config)


def test_import_other_base_model_refused(good, tmp_path):
    # Wider MLP: the factors' shapes do not fit.
    other = LlamaConfig.from_hf(
        transformers.LlamaConfig(**{**TINY, "intermediate_size": 48}), scan_layers=False
    )
    params = jax.eval_shape(lambda k: init_params(other, k), jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    with pytest.raises(
        ValueError,
        match=r"mlp.\w+_proj.lora_\w.weight' has shape \((3, 40|40, 3)\), expected \((3, 48|48, 3)\)",
    ):
        import_peft(good.dir, params, other)
    # Fewer layers: modules that do not exist.
    one = good.config.replace(num_hidden_layers=1)
    small = {
        **good.base,
        "model": {**good.base["model"], "layers": {"0": good.base["model"]["layers"]["0"]}},
    }
    with pytest.raises(ValueError, match=r"layers.1.* does not exist in the base params"):
        import_peft(good.dir, small, one)
    # Params that do not match the config they come with.
    with pytest.raises(ValueError, match="do not match the llama model config"):
        import_peft(good.dir, small, good.config)
    # A named base model.
    with pytest.raises(ValueError, match=r"base_model_name_or_path=None, expected 'meta/llama'"):
        import_peft(good.dir, good.base, good.config, expected_base_model="meta/llama")


def test_import_pickle_only_refused(good, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(good.dir / "adapter_config.json", directory)
    (directory / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"pickled weights \(adapter_model.bin\).*safetensors"):
        import_peft(directory, good.base, good.config)


def test_import_refuses_params_with_adapters(good):
    params, _ = import_peft(good.dir, good.base, good.config)
    with pytest.raises(ValueError, match="already hold adapter leaves"):
        import_peft(good.dir, params, good.config)


def test_import_scanned_needs_uniform_layers(llama, good, tmp_path):
    config, base = llama.layouts[True]
    per_layer = _edited(
        good, tmp_path, meta=_meta_set(rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 2})
    )
    t = _tensors(per_layer)
    for suffix, fn in (("lora_A.weight", lambda x: x[:2]), ("lora_B.weight", lambda x: x[:, :2])):
        key = f"{PREFIX}model.layers.1.mlp.up_proj.{suffix}"
        t[key] = np.ascontiguousarray(fn(t[key]))
    save_file(t, str(per_layer / "adapter_model.safetensors"), metadata={"format": "pt"})
    import_peft(per_layer, good.base, good.config)  # fine unscanned
    with pytest.raises(
        ValueError,
        match=r"per-layer ranks differ within the stacked module 'model/layers/mlp/up_proj'.*scan_layers=False",
    ):
        import_peft(per_layer, base, config)

    alpha = tmp_path / "alpha"
    shutil.copytree(good.dir, alpha)
    meta = _config_json(alpha)
    meta["alpha_pattern"] = {r"layers\.0\.self_attn\.q_proj": 9}
    (alpha / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="per-layer alphas differ"):
        import_peft(alpha, base, config)

    partial = tmp_path / "partial"
    shutil.copytree(good.dir, partial)
    meta = _config_json(partial)
    meta["layers_to_transform"] = [0]
    (partial / "adapter_config.json").write_text(json.dumps(meta))
    t = {k: v for k, v in _tensors(good.dir).items() if ".layers.0." in k}
    save_file(t, str(partial / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="only some layers of the stacked module"):
        import_peft(partial, base, config)


def test_import_non_strict_ignores_with_warning(good, tmp_path):
    def edit(t):
        t.pop(f"{K1}.lora_B.weight")
        t[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = np.zeros((3, VOCAB), np.float32)

    directory = _edited(good, tmp_path, tensors=edit)
    with pytest.warns(
        PeftFormatWarning, match=r"strict=False.*embed_tokens.*layers\.1\.self_attn\.k_proj"
    ):
        params, got = import_peft(directory, good.base, good.config, strict=False)
    paths = rl.adapter_paths(params)
    assert "model/layers/1/self_attn/k_proj" not in paths and len(paths) == 13
    assert not got.is_target("model/layers/1/self_attn/k_proj", None)
    assert got.is_target("model/layers/0/self_attn/k_proj", None)


# --------------------------------------------------------------------------------------------
# Export errors and file safety


def test_export_errors(llama, tmp_path):
    config, base = llama.layouts[False]
    lcfg = rl.LoraConfig(rank=3, alpha=5.0, targets=["q_proj"])
    params = _random_adapters(base, lcfg, seed=11)
    with pytest.raises(ValueError, match=r"has rank 3 .*lora_config gives rank 2"):
        export_peft(tmp_path, params, rl.LoraConfig(rank=2, targets=["q_proj"]), config)
    with pytest.raises(ValueError, match="RaSA adapters"):
        export_peft(tmp_path, params, rl.LoraConfig(rank=3, rasa=True), config)
    extra = copy.deepcopy(params)
    extra["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_d"] = jnp.ones(3)
    with pytest.raises(ValueError, match=r"adapter leaves \['lora_d'\] .* no PEFT counterpart"):
        export_peft(tmp_path, extra, lcfg, config)
    dora = copy.deepcopy(params)
    dora["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_magnitude"] = jnp.ones(32)
    with pytest.raises(ValueError, match=r"calls for \['lora_a', 'lora_b'\]"):
        export_peft(tmp_path, dora, lcfg, config)
    with pytest.raises(ValueError, match="kernel axes 'oi'"):
        export_peft(tmp_path, params, rl.LoraConfig(rank=3, fan_in_fan_out=True), config)
    with pytest.raises(ValueError, match="params hold no adapters"):
        export_peft(tmp_path, base, lcfg, config)
    with pytest.raises(ValueError, match="do not match the llama model config"):
        export_peft(tmp_path, params, lcfg, config.replace(num_hidden_layers=3))
    with pytest.raises(ValueError, match="task_type='SEQ_CLS'"):
        export_peft(tmp_path, params, lcfg, config, task_type="SEQ_CLS")
    assert not os.listdir(tmp_path)  # nothing written by a failed export


def test_export_refuses_symlink_and_is_atomic(llama, tmp_path, monkeypatch):
    config, base = llama.layouts[False]
    lcfg = rl.LoraConfig(rank=2, alpha=2.0, targets=["v_proj"])
    params = _random_adapters(base, lcfg, seed=12)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"keep me")
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        export_peft(target, params, lcfg, config)
    assert outside.read_bytes() == b"keep me"

    good_dir = tmp_path / "good"
    export_peft(good_dir, params, lcfg, config)
    before = {p.name: p.read_bytes() for p in good_dir.iterdir()}

    def broken(path, tensors, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "write_safetensors", broken)
    other = _random_adapters(base, lcfg, seed=13)
    with pytest.raises(OSError, match="disk full"):
        export_peft(good_dir, other, lcfg, config)
    assert {p.name: p.read_bytes() for p in good_dir.iterdir()} == before  # no temp files left


def test_export_crash_between_renames_never_mixes(llama, tmp_path, monkeypatch):
    """A crash inside an export leaves the old adapter whole (not new factors + old alpha)."""
    config, base = llama.layouts[False]
    old_cfg = rl.LoraConfig(rank=2, alpha=2.0, targets=["v_proj"])
    new_cfg = rl.LoraConfig(rank=2, alpha=16.0, targets=["v_proj"])
    target = tmp_path / "peft"
    export_peft(target, _random_adapters(base, old_cfg, seed=21), old_cfg, config)
    (target / "README.md").write_text("kept")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    Killed = die_between_renames(monkeypatch)
    with pytest.raises(Killed):
        export_peft(target, _random_adapters(base, new_cfg, seed=22), new_cfg, config)
    monkeypatch.undo()
    assert not target.exists()
    _, got = import_peft(target, base, config)  # the reader restores the old adapter
    assert got.alpha == 2.0
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before

    new = _random_adapters(base, new_cfg, seed=22)
    export_peft(target, new, new_cfg, config)
    params, got = import_peft(target, base, config)
    assert got.alpha == 16.0 and (target / "README.md").read_text() == "kept"
    _adapters_equal(params, new)
    assert sorted(os.listdir(tmp_path)) == ["peft"]


def test_bf16_raw_reader_matches_file(tmp_path):
    """Older safetensors cannot give numpy bfloat16: the byte-level fallback reads the same."""
    rng = np.random.default_rng(14)
    tensors = {
        "x": rng.standard_normal(5).astype(np.float32),
        "a": rng.standard_normal((3, 4)).astype(jnp.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))

    class OldHandle:
        def get_tensor(self, name):
            raise TypeError("bfloat16 is not supported")

    got = hf_io.read_tensor(OldHandle(), "a", path)
    assert got.dtype == jnp.bfloat16 and got.shape == (3, 4)
    np.testing.assert_array_equal(got, tensors["a"])


def test_import_non_strict_modules_to_save(good, tmp_path):
    directory = _edited(good, tmp_path, meta=_meta_set(modules_to_save=["lm_head"]))
    # Without the copy's tensor, the copy starts as the base's lm_head (output unchanged).
    with pytest.warns(PeftFormatWarning, match=r"strict=False: missing tensors .*lm_head\.weight"):
        params, _ = import_peft(directory, good.base, good.config, strict=False)
    assert len(rl.adapter_paths(params)) == 14


def test_import_keys_without_peft_prefix(good, tmp_path):
    """transformers' own adapter integration saves keys without 'base_model.model.'."""
    directory = _edited(
        good,
        tmp_path,
        tensors=lambda t: t.update({k.removeprefix(PREFIX): t.pop(k) for k in list(t)}),
    )
    assert not any(k.startswith(PREFIX) for k in _tensors(directory))
    _adapters_equal(
        import_peft(directory, good.base, good.config)[0],
        import_peft(good.dir, good.base, good.config)[0],
    )
    mixed = tmp_path / "mixed"
    shutil.copytree(directory, mixed)
    t = _tensors(mixed)
    t[PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"] = t.pop(
        "model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    save_file(t, str(mixed / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="mixes keys with and without"):
        import_peft(mixed, good.base, good.config)


def test_import_expected_base_model(llama, tmp_path):
    _, base = llama.layouts[False]
    hf_config = transformers.AutoConfig.from_pretrained(str(llama.dir))
    lcfg = rl.LoraConfig(rank=2, alpha=2.0, targets=["q_proj"])
    export_peft(tmp_path, _random_adapters(base, lcfg, seed=16), lcfg, hf_config)
    recorded = _config_json(tmp_path)["base_model_name_or_path"]
    assert recorded == str(llama.dir)  # the transformers config's name_or_path
    import_peft(tmp_path, base, hf_config, expected_base_model=str(llama.dir))
    with pytest.raises(ValueError, match="expected 'other/model'"):
        import_peft(tmp_path, base, hf_config, expected_base_model="other/model")
