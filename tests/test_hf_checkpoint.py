"""Hugging Face checkpoints in and out, checked against transformers' PyTorch models (CPU).

Reference: tiny random ``transformers`` models (eager attention, float32) saved with
``save_pretrained``; our logits must match theirs to 1e-5 of the logit scale (measured: about
4e-7). The save direction goes back through ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from rslora_jax import _files, data
from rslora_jax.hf import (
    flax_module_path,
    hf_module_name,
    load_config,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)
from rslora_jax.hf import io as hf_io
from rslora_jax.models import LlamaConfig, LlamaForCausalLM, convert_scan, families, init_params
from rslora_jax.models.llama import rope_inv_freq
from tests._asserts import assert_close
from tests._torch_ref import IDS, TINY, VOCAB, torch_logits, torch_model

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # max |ours - transformers| / max |transformers logits|

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _hf_config(family: str):
    if family == "llama":  # Llama-3 RoPE scaling, biases on q/k/v/o and the MLP, GQA
        return transformers.LlamaConfig(
            **TINY,
            rope_theta=500000.0,
            rope_scaling=dict(LLAMA3_ROPE),
            attention_bias=True,
            mlp_bias=True,
        )
    if family == "mistral":  # sliding window shorter than the sequence, head_dim != D / H
        return transformers.MistralConfig(**TINY, sliding_window=5, head_dim=16)
    return transformers.Qwen2Config(**TINY, tie_word_embeddings=True)  # q/k/v bias, tied


def _our_logits(config: LlamaConfig, params, ids: np.ndarray) -> np.ndarray:
    out = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    return np.asarray(out, np.float32)


def _assert_close_logits(ours: np.ndarray, ref: np.ndarray) -> None:
    assert_close(ours, ref, rel=RTOL, norm="max", what="logits")


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def family(request, tmp_path_factory):
    name = request.param
    model = torch_model(_hf_config(name))
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return SimpleNamespace(name=name, model=model, dir=directory, ref=torch_logits(model, IDS))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A saved tiny llama checkpoint (no scaling) plus its torch model, for error cases."""
    model = torch_model(transformers.LlamaConfig(**TINY), seed=1)
    directory = tmp_path_factory.mktemp("llama_plain")
    model.save_pretrained(directory)
    return SimpleNamespace(model=model, dir=directory, ref=torch_logits(model, IDS))


# --------------------------------------------------------------------------------------------
# Loading


def test_load_matches_transformers(family):
    config, params = load_pretrained(family.dir)
    assert config.model_type == family.name
    _assert_close_logits(_our_logits(config, params, IDS), family.ref)
    # The features under test matter at this size (the comparison would catch their loss).
    if family.name == "llama":
        assert config.rope_scaling is not None and config.attention_bias and config.mlp_bias
        plain = _our_logits(config.replace(rope_scaling=None), params, IDS)
        assert np.abs(plain - family.ref).max() > 1e-3
    if family.name == "mistral":
        assert config.sliding_window == 5 and config.head_dim == 16
        full = _our_logits(config.replace(sliding_window=None), params, IDS)
        assert np.abs(full - family.ref).max() > 1e-3
    if family.name == "qwen2":
        assert config.tie_word_embeddings and "lm_head" not in params
        assert "bias" in params["model"]["layers"]["self_attn"]["q_proj"]


def test_load_unscanned_and_layout(family):
    config, params = load_pretrained(family.dir, scan_layers=False)
    assert not config.scan_layers
    _assert_close_logits(_our_logits(config, params, IDS), family.ref)
    # Values and orientation, tensor by tensor: kernel == torch weight.T.
    sd = {k: v.numpy() for k, v in family.model.state_dict().items()}
    layer1 = params["model"]["layers"]["1"]
    np.testing.assert_array_equal(
        layer1["self_attn"]["k_proj"]["kernel"], sd["model.layers.1.self_attn.k_proj.weight"].T
    )
    np.testing.assert_array_equal(
        layer1["mlp"]["down_proj"]["kernel"], sd["model.layers.1.mlp.down_proj.weight"].T
    )
    np.testing.assert_array_equal(
        layer1["post_attention_layernorm"]["scale"],
        sd["model.layers.1.post_attention_layernorm.weight"],
    )
    np.testing.assert_array_equal(
        params["model"]["embed_tokens"]["embedding"], sd["model.embed_tokens.weight"]
    )


def test_sharded_checkpoint_loads(llama_dir, tmp_path):
    llama_dir.model.save_pretrained(tmp_path, max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    config, params = load_pretrained(tmp_path)
    _, single = load_pretrained(llama_dir.dir)
    jax.tree.map(np.testing.assert_array_equal, params, single)
    _assert_close_logits(_our_logits(config, params, IDS), llama_dir.ref)


def test_bf16_checkpoint_loads(llama_dir, tmp_path):
    model16 = torch_model(transformers.LlamaConfig(**TINY), seed=1).to(torch.bfloat16)
    model16.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.layers.0.mlp.gate_proj.weight").get_dtype() == "BF16"
    w = model16.state_dict()["model.layers.0.mlp.gate_proj.weight"].float().numpy()
    _, params = load_pretrained(tmp_path)  # upcast to float32, exactly
    assert params["model"]["layers"]["mlp"]["gate_proj"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(params["model"]["layers"]["mlp"]["gate_proj"]["kernel"][0], w.T)
    config16, params16 = load_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    assert config16.dtype == jnp.bfloat16 and config16.param_dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    np.testing.assert_array_equal(
        np.asarray(params16["model"]["layers"]["mlp"]["gate_proj"]["kernel"][0], np.float32), w.T
    )


def test_bf16_raw_reader_matches_safe_open(tmp_path):
    """The fallback for safetensors versions without numpy bfloat16 reads the same values."""
    import ml_dtypes

    a = np.random.default_rng(0).standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    b = np.arange(4, dtype=np.float32)
    save_file({"a": a, "b": b}, str(tmp_path / "model.safetensors"))
    with contextlib.ExitStack() as stack:
        reader = hf_io.TensorReader([tmp_path / "model.safetensors"], stack)
        np.testing.assert_array_equal(reader._read_raw("a"), a)
        np.testing.assert_array_equal(reader._read_raw("b"), b)
        np.testing.assert_array_equal(reader.read("a", (slice(1, 3), slice(None))), a[1:3])


def test_bin_only_directory_refused(llama_dir, tmp_path):
    llama_dir.model.config.save_pretrained(tmp_path)
    torch.save(llama_dir.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        load_pretrained(tmp_path)


def test_unsupported_model_type_refused(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_config(tmp_path)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_pretrained(tmp_path)


def _rewrite(src: Path, dst: Path, edit) -> None:
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_error(llama_dir, tmp_path):
    _rewrite(llama_dir.dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing tensors .*model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        load_pretrained(tmp_path)


def test_unexpected_tensor_error(llama_dir, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)

    _rewrite(llama_dir.dir, tmp_path, add)
    with pytest.raises(ValueError, match=r"unexpected tensors .*self_attn\.extra\.weight"):
        load_pretrained(tmp_path)


def test_wrong_shape_error(llama_dir, tmp_path):
    def transpose(t):
        name = "model.layers.0.self_attn.k_proj.weight"
        t[name] = np.ascontiguousarray(t[name].T)

    _rewrite(llama_dir.dir, tmp_path, transpose)
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(32, 16\).*\(16, 32\)"
    ):
        load_pretrained(tmp_path)


def test_load_with_shardings(llama_dir, monkeypatch):
    assert jax.device_count() >= 8, "tests/conftest.py must set jax_num_cpu_devices=8"
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    _, single = load_pretrained(llama_dir.dir)

    def spec(x):  # shard the last axis over "model", the one before over "data" when 2-D+
        axes = [None] * x.ndim
        axes[-1] = "model"
        if x.ndim >= 2 and x.shape[-2] % 2 == 0:
            axes[-2] = "data"
        return NamedSharding(mesh, P(*axes))

    shardings = jax.tree.map(spec, single)
    reads = []
    original = hf_io.TensorReader.read

    def spy(self, name, index):
        out = original(self, name, index)
        reads.append((name, out.size, int(np.prod(self.shape[name]))))
        return out

    monkeypatch.setattr(hf_io.TensorReader, "read", spy)
    config, params = load_pretrained(llama_dir.dir, shardings=shardings)
    for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert a.sharding == s
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, single
    )
    # Each device read only its slice: no read of a whole (sharded) tensor.
    assert reads and all(size < total for _, size, total in reads)
    _assert_close_logits(_our_logits(config, params, IDS), llama_dir.ref)
    # A single sharding for every leaf; and a tree that does not match is refused.
    _, replicated = load_pretrained(llama_dir.dir, shardings=NamedSharding(mesh, P()))
    assert jax.tree.leaves(replicated)[0].sharding.is_fully_replicated
    with pytest.raises(ValueError, match="shardings"):
        load_pretrained(llama_dir.dir, shardings={"model": shardings["model"]})


# --------------------------------------------------------------------------------------------
# Config conversion, names, rope


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig.tiny(rope_theta=5e5, rope_scaling=LLAMA3_ROPE, attention_bias=True),
        LlamaConfig.tiny(rope_scaling={"rope_type": "linear", "factor": 2.0}, head_dim=16),
        LlamaConfig.tiny(model_type="mistral", sliding_window=7),
        LlamaConfig.tiny(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
        LlamaConfig.tiny(model_type="qwen2", attention_bias=True, sliding_window=9),
    ],
    ids=["llama3", "linear", "mistral", "qwen2", "qwen2-window"],
)
def test_config_round_trip(config, tmp_path):
    hf = config.to_hf()
    assert LlamaConfig.from_hf(hf) == config
    hf.save_pretrained(tmp_path)  # and through config.json / AutoConfig
    assert LlamaConfig.from_hf(load_config(tmp_path)) == config


def test_from_hf_reads_transformers4_attributes():
    """transformers 4.x keeps rope_theta and rope_scaling as attributes (no rope_parameters)."""
    hf4 = SimpleNamespace(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=1234.0,
        rope_scaling={"type": "linear", "factor": 4.0},
        hidden_act="silu",
        tie_word_embeddings=False,
    )
    config = LlamaConfig.from_hf(hf4, dtype="bfloat16")
    assert config.rope_theta == 1234.0 and config.num_key_value_heads == 4
    assert config.rope_scaling.rope_type == "linear" and config.rope_scaling.factor == 4.0
    assert config.head_dim == 8 and config.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.from_hf(SimpleNamespace(**{**vars(hf4), "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        LlamaConfig.from_hf(SimpleNamespace(**{**vars(hf4), "rope_scaling": {"type": "yarn"}}))
    with pytest.raises(ValueError, match="unknown runtime"):
        LlamaConfig.from_hf(hf4, scan=True)


def test_qwen2_mixed_sliding_layers():
    """Qwen2 configs that mix sliding and full layers convert layer by layer (refused before
    issue 15; parity with transformers is in test_families.py)."""
    hf = transformers.Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    config = LlamaConfig.from_hf(hf)
    assert config.sliding_window == 4
    assert config.layer_types == ("full_attention", "sliding_attention")
    assert [k.window for k in config.arch.kinds] == [None, 4]
    assert config.arch.layer_kinds == (0, 1)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        LLAMA3_ROPE | {"original_max_position_embeddings": 8192},
        {"rope_type": "linear", "factor": 3.0},
    ],
)
def test_rope_inv_freq_matches_transformers(scaling):
    hf = transformers.LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        num_hidden_layers=1,
        vocab_size=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=None if scaling is None else dict(scaling),
    )
    config = LlamaConfig.from_hf(hf)
    inv = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config=hf).inv_freq
    np.testing.assert_allclose(rope_inv_freq(config), inv.numpy(), rtol=1e-6, atol=0)


def test_hf_module_name_and_inverse():
    assert hf_module_name("model/layers/self_attn/q_proj", 3) == "model.layers.3.self_attn.q_proj"
    assert hf_module_name("model/layers/12/mlp/down_proj") == "model.layers.12.mlp.down_proj"
    assert hf_module_name("model/embed_tokens") == "model.embed_tokens"
    assert hf_module_name("lm_head") == "lm_head"
    for name in ("model.layers.3.self_attn.q_proj", "model.norm", "lm_head"):
        for scan in (True, False):
            assert hf_module_name(*flax_module_path(name, scan)) == name
    assert flax_module_path("model.layers.3.mlp.up_proj") == ("model/layers/mlp/up_proj", 3)
    assert flax_module_path("model.layers.3.mlp.up_proj", False) == (
        "model/layers/3/mlp/up_proj",
        None,
    )
    with pytest.raises(ValueError, match="needs a layer index"):
        hf_module_name("model/layers/self_attn/q_proj")
    with pytest.raises(ValueError, match="already names its layer"):
        hf_module_name("model/layers/3/self_attn/q_proj", 3)
    with pytest.raises(ValueError, match="not a layer path"):
        hf_module_name("lm_head", 0)
    with pytest.raises(ValueError, match="no layer index"):
        flax_module_path("model.layers.q_proj")


# --------------------------------------------------------------------------------------------
# Saving


def _random_params(config: LlamaConfig, seed: int = 0):
    """Random params of the model's shapes, drawn on the host (no compilation)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))

    def draw(path, x):
        offset = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(offset + 0.1 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


SAVE_CONFIGS = {
    "llama": LlamaConfig.tiny(
        vocab_size=VOCAB, rope_theta=5e5, rope_scaling=LLAMA3_ROPE, attention_bias=True
    ),
    "mistral": LlamaConfig.tiny(vocab_size=VOCAB, model_type="mistral", sliding_window=5),
    "qwen2": LlamaConfig.tiny(
        vocab_size=VOCAB, model_type="qwen2", attention_bias=True, tie_word_embeddings=True
    ),
}


@pytest.mark.parametrize("name", sorted(SAVE_CONFIGS))
def test_save_round_trip_through_transformers(name, tmp_path):
    config = SAVE_CONFIGS[name]
    params = _random_params(config)
    ours = _our_logits(config, params, IDS)
    save_pretrained(tmp_path, convert_scan(params, to_scan=False), config, max_shard_size="16KB")
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files and "config.json" in files
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(model).__name__.lower().startswith(name)
    _assert_close_logits(ours, torch_logits(model, IDS))
    # And back into ours: identical parameters.
    _, loaded = load_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_save_bf16_and_overwrite_single_file(tmp_path):
    config = SAVE_CONFIGS["llama"]
    params = _random_params(config)
    save_pretrained(tmp_path, params, config, max_shard_size="16KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path)
    save_pretrained(tmp_path, params, config, dtype="bfloat16")
    # The earlier shards and index are gone: one file, bf16, loadable by transformers.
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert model.dtype == torch.bfloat16  # config.json records the stored dtype
    w = model.state_dict()["model.layers.1.self_attn.o_proj.weight"].float().numpy()
    expected = np.asarray(params["model"]["layers"]["self_attn"]["o_proj"]["kernel"][1])
    np.testing.assert_array_equal(w.T, expected.astype(jnp.bfloat16).astype(np.float32))


def test_save_keeps_transformers_config_fields(llama_dir, tmp_path):
    hf = load_config(llama_dir.dir)
    hf.eos_token_id = 7
    _, params = load_pretrained(llama_dir.dir)
    save_pretrained(tmp_path, params, hf)
    assert load_config(tmp_path).eos_token_id == 7
    assert hf.architectures == ["LlamaForCausalLM"]


def test_save_refuses_lora_leaves(tmp_path):
    config = LlamaConfig.tiny()
    params = _random_params(config)
    params["model"]["layers"]["self_attn"]["q_proj"]["lora_a"] = jnp.zeros((2, 32, 4))
    with pytest.raises(ValueError, match=r"lora_a.*rslora_jax\.merge"):
        save_pretrained(tmp_path, params, config)
    assert not os.listdir(tmp_path)


def test_save_refuses_mismatched_params(tmp_path):
    config = LlamaConfig.tiny()
    params = _random_params(config)
    wrong = jax.tree.map(lambda x: x, params)
    wrong["model"]["norm"] = {"scale": jnp.ones((31,))}
    with pytest.raises(ValueError, match=r"model/norm/scale.*\(31,\).*\(32,\)"):
        save_pretrained(tmp_path, wrong, config)
    with pytest.raises(ValueError, match="missing"):
        save_pretrained(tmp_path, {"model": params["model"]}, config)  # no lm_head
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(tmp_path, params, config, max_shard_size="2 parsecs")


def test_save_refuses_symlink_escape(tmp_path):
    config = LlamaConfig.tiny()
    params = _random_params(config)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        save_pretrained(target, params, config)
    assert outside.read_bytes() == b"precious"
    assert sorted(os.listdir(target)) == ["model.safetensors"]
    (target / "model.safetensors").unlink()
    (target / "config.json").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        save_pretrained(target, params, config)
    assert outside.read_bytes() == b"precious"


class _Unreadable:
    """A leaf with the right shape and dtype whose data cannot be read."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype

    def __array__(self, *args, **kwargs):
        raise RuntimeError("device lost")

    def __getitem__(self, index):
        raise RuntimeError("device lost")


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    config = LlamaConfig.tiny()
    params = _random_params(config)
    save_pretrained(tmp_path, params, config)
    before = _snapshot(tmp_path)

    other = _random_params(config, seed=3)
    broken = jax.tree.map(lambda x: x, other)
    leaf = broken["model"]["norm"]["scale"]
    broken["model"]["norm"]["scale"] = _Unreadable(leaf.shape, leaf.dtype)
    with pytest.raises(RuntimeError, match="device lost"):
        save_pretrained(tmp_path, broken, config)
    assert _snapshot(tmp_path) == before  # untouched, no temporary files left

    def half_write(path, tensors):  # a write that dies half way (disk full)
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(hf_io, "write_safetensors", half_write)
    with pytest.raises(OSError, match="No space"):
        save_pretrained(tmp_path, other, config)
    assert _snapshot(tmp_path) == before
    _, loaded = load_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_save_keeps_other_files_and_drops_stale_weights(tmp_path):
    config = SAVE_CONFIGS["llama"]
    params = _random_params(config)
    save_pretrained(tmp_path, params, config, max_shard_size="16KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    save_pretrained(tmp_path, params, config)
    assert sorted(os.listdir(tmp_path)) == [
        "config.json",
        "model.safetensors",
        "notes",
        "tokenizer.json",
    ]


class _Killed(BaseException):
    """The process dies here (nothing after it runs, not even clean-up)."""


def _die_between_renames(monkeypatch) -> None:
    """The next directory swap stops after its first rename (the two-rename fallback)."""

    def die(new, target):
        raise _Killed

    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    monkeypatch.setattr(_files, "_move_in", die)
    monkeypatch.setattr(_files, "_move_back", lambda target: None)


def test_crash_between_renames_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """A crash inside a save never leaves a mixed checkpoint (old tensors with new ones)."""
    config = SAVE_CONFIGS["llama"]
    target = tmp_path / "merged"
    old = _random_params(config)
    save_pretrained(target, old, config, max_shard_size="16KB")
    before = _snapshot(target)
    new = _random_params(config, seed=5)
    _die_between_renames(monkeypatch)
    with pytest.raises(_Killed):
        save_pretrained(target, new, config, max_shard_size="16KB")
    monkeypatch.undo()
    assert not target.exists()  # the crash window: only the .old sibling holds the checkpoint
    _, loaded = load_pretrained(target)  # a reader puts it back
    jax.tree.map(np.testing.assert_array_equal, loaded, old)
    assert _snapshot(target) == before

    # An error (not a crash) in the second rename: rolled back at once.
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("injected: I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        save_pretrained(target, new, config, max_shard_size="16KB")
    monkeypatch.undo()
    assert _snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no staging or .old directory left

    save_pretrained(target, new, config)  # and the next save replaces it whole
    _, loaded = load_pretrained(target)
    jax.tree.map(np.testing.assert_array_equal, loaded, new)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]


def test_save_directory_mode_follows_umask(tmp_path):
    import stat

    cfg = LlamaConfig.tiny()
    old = os.umask(0o027)
    try:
        save_pretrained(tmp_path / "m", _random_params(cfg), cfg)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o750
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f


def test_invalid_json_errors_name_the_file(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json' is not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text((llama_dir.dir / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"index\.json' does not hold a JSON object"):
        load_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------
# Model families


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("name", sorted(SAVE_CONFIGS))
def test_family_linear_modules_match_transformers(name, scan):
    """The family's Linear map is the torch model's nn.Linear modules, names and features."""
    config = SAVE_CONFIGS[name].replace(scan_layers=scan)
    fam = families.family_of(config)
    assert fam is families.family(name) and name in fam.model_types
    model = torch_model(config.to_hf())
    linears = {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not (config.tie_word_embeddings and n == "lm_head")
    }
    ours = {}
    for path, m in fam.linear_modules(config).items():
        assert m.stacked == (scan and path.startswith("model/layers/")), path
        for layer, hf in enumerate(m.names):
            assert families.hf_module_name(path, layer if m.stacked else None) == hf
            assert families.flax_module_path(hf, scan) == (path, layer if m.stacked else None)
            ours[hf] = (m.d_in, m.d_out)
    assert ours == linears
    assert fam.architecture(name) == type(model).__name__
    assert fam.all_linear(linears) == sorted(
        {n.rsplit(".", 1)[-1] for n in linears if n != "lm_head"}
    )


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported.*llama"):
        families.family("gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        families.family_of(transformers.GPT2Config())
    with pytest.raises(ValueError, match="must be a rslora_jax LlamaConfig or a transformers"):
        families.family_of({"model_type": "llama"})


# --------------------------------------------------------------------------------------------
# Tokenizer and import hygiene


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded("hello there world")["input_ids"] == [1, 0, 2]


def test_one_tokenizer_loader():
    """hf.load_tokenizer and data.load_tokenizer are one function: local files, no remote code."""
    from rslora_jax import hf

    assert hf.load_tokenizer is data.load_tokenizer is hf_io.load_tokenizer
    text = "tokenize me, please"
    builtin = transformers.AutoTokenizer.from_pretrained(
        str(data.BUILTIN_TOKENIZER_DIR), local_files_only=True
    )
    assert hf.load_tokenizer().encode(text) == builtin.encode(text)  # the built-in by default
    with pytest.raises(ValueError, match="trust_remote_code=True is not allowed"):
        hf.load_tokenizer(data.BUILTIN_TOKENIZER_DIR, trust_remote_code=True)
    with pytest.raises(ValueError, match="local_files_only=False is not allowed"):
        hf.load_tokenizer(None, local_files_only=False)


def test_import_does_not_load_torch_or_transformers():
    code = (
        "import sys, rslora_jax.hf, rslora_jax.models\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)


def test_saved_files_are_readable_by_others(tmp_path):
    """A server running as another user must be able to read the exported weights."""
    import stat

    from rslora_jax.hf import save_pretrained
    from rslora_jax.models.llama import LlamaConfig, init_params

    cfg = LlamaConfig.tiny()
    old = os.umask(0o022)
    try:
        save_pretrained(tmp_path / "m", init_params(cfg, jax.random.key(0)), cfg)
    finally:
        os.umask(old)
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
