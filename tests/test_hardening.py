"""Bad inputs and damaged files at the library's boundary: each is refused with a message that
names the file (or path) at fault, before any tensor is read or anything is written.

- Hugging Face checkpoints: empty, truncated and oversized-header safetensors files; a config
  that disagrees with the weights; zero heads; a shard index naming a file outside the
  directory; an invalid config.json; NaN in the weights.
- NaN and Inf: `merge(safe_merge=True)` (PEFT's), `export_peft`, `import_peft`,
  `save_pretrained`.
- Typos: a listed target that matches nothing; an unknown adapter_config.json field.
- Full-rank square adapters: export records the orientation, import warns without a record.
- Checkpoints: checksums verified on restore, fallback to the newest step that verifies,
  `load_adapters` on something else than an adapter checkpoint.
- Staging that a killed writer left; the exported tokenizer in transformers 4.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

import rslora_jax as rl
from rslora_jax import _files
from rslora_jax.hf import (
    check_pretrained,
    export_peft,
    import_peft,
    load_pretrained,
    save_pretrained,
)
from rslora_jax.hf import io as hf_io
from rslora_jax.hf.peft import PeftFormatWarning
from rslora_jax.models import LlamaConfig, init_params
from rslora_jax.ops.checkpoint import CheckpointWarning
from rslora_jax.ops.finite import NonFiniteError

# optax's Adam is not strict-dtype-promotion clean (its bias correction mixes int and float).
pytestmark = pytest.mark.loose_dtypes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama checkpoint directory (unscanned params kept for the PEFT cases)."""
    config = LlamaConfig.tiny(scan_layers=False)
    params = init_params(config, jax.random.key(0))
    directory = tmp_path_factory.mktemp("tiny")
    save_pretrained(directory, params, config)
    return SimpleNamespace(dir=directory, config=config, params=params)


def _copy(tiny, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny.dir, target)
    return target


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------
# Hugging Face checkpoints


def _damage(kind: str, path: Path) -> None:
    raw = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(raw[: len(raw) - 100])
    elif kind == "oversized header":
        path.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    elif kind == "header not JSON":
        n = int.from_bytes(raw[:8], "little")
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n :])


DAMAGE = {
    "empty": "is empty",
    "truncated": "is truncated: tensor",
    "oversized header": "announces a header of 1000000000000 bytes",
    "header not JSON": "its header is not valid JSON",
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_safetensors_file_is_named(tiny, tmp_path, kind):
    directory = _copy(tiny, tmp_path)
    weights = directory / "model.safetensors"
    _damage(kind, weights)
    for call in (check_pretrained, load_pretrained):
        with pytest.raises(ValueError) as err:
            call(directory)
        assert str(weights) in str(err.value) and DAMAGE[kind] in str(err.value)


CONFIG_CASES = {
    "intermediate_size": ({"intermediate_size": 40}, "has shape (32, 48), expected (32, 40)"),
    "more layers than tensors": (
        {"num_hidden_layers": 3},
        "missing tensors (9): ['model.layers.2.",
    ),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads=0; expected a positive"),
    "heads not a multiple of kv heads": ({"num_key_value_heads": 3}, "not a multiple of"),
    "string size": ({"hidden_size": "32"}, "hidden_size='32'; expected a positive integer"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_config_that_disagrees_with_the_weights_is_named(tiny, tmp_path, case):
    directory = _copy(tiny, tmp_path)
    changes, message = CONFIG_CASES[case]
    _edit_config(directory, **changes)
    with pytest.raises(ValueError) as err:
        check_pretrained(directory)
    assert message in str(err.value), err.value
    assert str(directory) in str(err.value)


def test_an_invalid_config_json_is_named(tiny, tmp_path):
    directory = _copy(tiny, tmp_path)
    text = (directory / "config.json").read_text()
    (directory / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="is not valid JSON") as err:
        check_pretrained(directory)
    assert str(directory / "config.json") in str(err.value)


def test_a_shard_index_naming_a_file_outside_the_directory_is_refused(tiny, tmp_path):
    directory = _copy(tiny, tmp_path)
    names = list(load_file(directory / "model.safetensors"))
    shutil.move(directory / "model.safetensors", tmp_path / "outside.safetensors")
    index = {"weight_map": dict.fromkeys(names, "../outside.safetensors")}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a plain file name inside the checkpoint directory"):
        check_pretrained(directory)


def test_nan_in_the_weights_is_named_on_load(tiny, tmp_path):
    directory = _copy(tiny, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = np.nan
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    check_pretrained(directory)  # headers only: fine
    with pytest.raises(ValueError, match=rf"tensor '{name}' in .* holds NaN or Inf"):
        load_pretrained(directory)


def test_save_pretrained_refuses_nan_and_float16_overflow(tiny, tmp_path):
    bad = jax.tree.map(lambda x: x, tiny.params)
    kernel = bad["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    bad["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"] = kernel.at[0, 0].set(jnp.inf)
    with pytest.raises(NonFiniteError, match="model/layers/0/self_attn/k_proj/kernel"):
        save_pretrained(tmp_path / "out", bad, tiny.config)
    big = jax.tree.map(lambda x: x, tiny.params)
    big["lm_head"]["kernel"] = big["lm_head"]["kernel"].at[0, 0].set(1e6)  # > float16 max
    with pytest.raises(NonFiniteError, match="once cast to float16 .*lm_head/kernel"):
        save_pretrained(tmp_path / "out", big, tiny.config, dtype="float16")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------
# NaN and Inf in adapters


def _adapted(base, config, seed=1):
    params = rl.init(base, config, jax.random.key(seed))
    # Non-zero B so that the merge changes the kernels.
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if jax.tree_util.keystr(p).endswith("['lora_b']") else x, params
    )


def test_safe_merge_names_the_broken_adapter_and_matches_the_formula():
    config = rl.LoraConfig(rank=2, alpha=4.0)
    base = {
        "a": {"kernel": jnp.arange(12.0).reshape(3, 4) / 10},
        "b": {"kernel": jnp.ones((4, 4))},
    }
    params = _adapted(base, config)
    merged = rl.merge(params, config, safe_merge=True)
    a = params["a"]
    want = a["kernel"] + 4.0 / np.sqrt(2) * np.asarray(a["lora_a"]) @ np.asarray(a["lora_b"])
    np.testing.assert_allclose(merged["a"]["kernel"], want, rtol=1e-6)

    broken = jax.tree.map(lambda x: x, params)
    broken["b"]["lora_a"] = broken["b"]["lora_a"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match=r"adapter leaves hold NaN or Inf values at b/lora_a;"):
        rl.merge(broken, config, safe_merge=True)
    rl.merge(broken, config)  # without the flag: no check, as PEFT

    inf_base = jax.tree.map(lambda x: x, params)
    inf_base["a"]["kernel"] = inf_base["a"]["kernel"].at[1, 1].set(jnp.inf)
    with pytest.raises(NonFiniteError, match=r"kernels at a \("):
        rl.merge(inf_base, config, safe_merge=True)

    # merge stays jittable; the check needs concrete values.
    jax.jit(rl.merge, static_argnums=1)(params, config)
    with pytest.raises(ValueError, match="cannot run inside jax.jit"):
        jax.jit(lambda p: rl.merge(p, config, safe_merge=True))(params)


def test_export_and_import_peft_refuse_nan(tiny, tmp_path):
    config = rl.LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    params = _adapted(tiny.params, config)
    broken = jax.tree.map(lambda x: x, params)
    q = broken["model"]["layers"]["1"]["self_attn"]["q_proj"]
    q["lora_b"] = q["lora_b"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match="model/layers/1/self_attn/q_proj/lora_b"):
        export_peft(tmp_path / "peft", broken, config, tiny.config)
    assert not (tmp_path / "peft").exists()

    export_peft(tmp_path / "peft", params, config, tiny.config)
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    tensors[key][1, 2] = np.inf
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=rf"tensor '{key}' in .* holds NaN or Inf"):
        import_peft(tmp_path / "peft", tiny.params, tiny.config)


# ------------------------------------------------------------------------------------------
# Typos


def test_a_listed_target_that_matches_nothing_is_an_error():
    base = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError) as err:
        rl.init(base, rl.LoraConfig(rank=2, targets=["a", "bb"]), jax.random.key(0))
    text = str(err.value)
    assert "'bb' matches no kernel (did you mean 'b'?)" in text and "Module names: 'a', 'b'" in text
    # Regexes may rightly match nothing in a given tree: no error for them.
    rl.init(base, rl.LoraConfig(rank=2, targets="a|zz"), jax.random.key(0))


def test_an_unknown_adapter_config_field_warns(tiny, tmp_path):
    config = rl.LoraConfig(rank=4, alpha=8.0, targets=["q_proj"])
    export_peft(tmp_path / "peft", _adapted(tiny.params, config), config, tiny.config)
    file = tmp_path / "peft" / "adapter_config.json"
    meta = json.loads(file.read_text())
    meta["lora_alhpa"] = meta.pop("lora_alpha")
    file.write_text(json.dumps(meta))
    with pytest.warns(PeftFormatWarning, match=r"'lora_alhpa' \(did you mean 'lora_alpha'\?\)"):
        import_peft(tmp_path / "peft", tiny.params, tiny.config)


# ------------------------------------------------------------------------------------------
# Full-rank square adapters


def test_full_rank_square_adapters_record_their_orientation(tiny, tmp_path):
    # q_proj is 32 x 32: at rank 32, lora_A (32, 32) looks the same transposed.
    config = rl.LoraConfig(rank=32, alpha=8.0, targets=["q_proj"])
    params = _adapted(tiny.params, config)
    export_peft(tmp_path / "peft", params, config, tiny.config)
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own export: no warning
        restored, _ = import_peft(tmp_path / "peft", tiny.params, tiny.config)
    q = ("model", "layers", "0", "self_attn", "q_proj", "lora_a")
    got, want = restored, params
    for k in q:
        got, want = got[k], want[k]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # The same file without our record (as PEFT writes it): shapes cannot tell, so a warning.
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    with pytest.warns(PeftFormatWarning, match="full-rank adapters .* records no orientation"):
        import_peft(tmp_path / "peft", tiny.params, tiny.config)

    # A record that is not PEFT's layout is refused.
    save_file(load_file(weights), weights, metadata={"rslora_jax.layout": "lora_A.weight=(in,r)"})
    with pytest.raises(ValueError, match="records the layout"):
        import_peft(tmp_path / "peft", tiny.params, tiny.config)


# ------------------------------------------------------------------------------------------
# Checkpoints


def _data_file(step_dir: Path) -> Path:
    """The largest array-data file of a checkpoint's adapters."""
    files = [p for p in (step_dir / "adapters").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture
def managed(tmp_path):
    config = rl.LoraConfig(rank=2)
    base = {"d": {"kernel": jnp.ones((4, 4))}}
    opt = rl.optimizer(optax.adam(1e-3), rl.init(base, config, jax.random.key(0)))
    states = {}
    with rl.CheckpointManager(tmp_path / "ckpt", config=config, max_to_keep=3) as manager:
        for step in (1, 2):
            p = rl.init(base, config, jax.random.key(step))
            state = opt.init(rl.split(p)[0])
            manager.save(step, p, state, extra={"step": step})
            states[step] = (p, state)
    return SimpleNamespace(dir=tmp_path / "ckpt", base=base, config=config, states=states)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing file"])
def test_restore_falls_back_to_the_newest_checkpoint_that_verifies(managed, damage):
    victim = _data_file(managed.dir / "2")
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-7])
    elif damage == "flipped byte":
        _flip(victim)
    else:
        victim.unlink()
    p, state = managed.states[1]
    skipped = []
    with rl.CheckpointManager(managed.dir, config=managed.config) as manager:
        restored, _, step, extra = manager.restore(
            managed.base, state, on_skip=lambda s, why: skipped.append((s, why))
        )
        assert step == 1 and extra == {"step": 1}
        np.testing.assert_array_equal(restored["d"]["lora_a"], p["d"]["lora_a"])
        assert [s for s, _ in skipped] == [2]
        assert str(victim.relative_to(managed.dir / "2")) in skipped[0][1]
        with pytest.raises(rl.CheckpointError, match="checkpoint step 2"):
            manager.restore(managed.base, state, step=2)
        with pytest.warns(CheckpointWarning, match="checkpoint step 2 is damaged"):
            manager.restore(managed.base, state)
        _flip(_data_file(managed.dir / "1"))
        with pytest.raises(rl.CheckpointError, match="can be restored: step 2: .*; step 1: "):
            manager.restore(managed.base, state, on_skip=lambda s, why: None)


def test_load_adapters_refuses_damaged_files_and_says_what_a_directory_is(tiny, tmp_path):
    config = rl.LoraConfig(rank=2)
    base = {"d": {"kernel": jnp.ones((4, 4))}}
    rl.save_adapters(tmp_path / "ad", rl.init(base, config, jax.random.key(0)), config)
    _flip(_data_file(tmp_path / "ad"))
    with pytest.raises(rl.CheckpointError, match="does not have the SHA-256 it was saved with"):
        rl.load_adapters(tmp_path / "ad", base)

    (tmp_path / "empty").mkdir()
    peft_config = rl.LoraConfig(rank=4, targets=["q_proj"])
    export_peft(tmp_path / "peft", _adapted(tiny.params, peft_config), peft_config, tiny.config)
    with rl.CheckpointManager(tmp_path / "train", config=config) as manager:
        p = rl.init(base, config, jax.random.key(0))
        manager.save(3, p, rl.optimizer(optax.sgd(0.1), p).init(rl.split(p)[0]))
    cases = {
        "empty": "is empty",
        "peft": "holds a PEFT adapter (adapter_config.json)",
        "train": "holds training checkpoints (steps [3])",
    }
    for name, message in cases.items():
        with pytest.raises(rl.CheckpointError, match=re.escape(message)):
            rl.load_adapters(tmp_path / name, base)
    with pytest.raises(rl.CheckpointError, match="holds a Hugging Face model"):
        rl.load_adapters(tiny.dir, base)


# ------------------------------------------------------------------------------------------
# Staging left by a killed writer; the tokenizer in transformers 4


def test_staging_of_a_dead_process_is_cleaned_and_a_live_one_kept(tmp_path):
    target = tmp_path / "merged"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / (_files.staging_prefix(target).rsplit("-", 2)[0] + f"-{dead}-x")
    live = tmp_path / (_files.staging_prefix(target) + "y")
    stale.mkdir()
    live.mkdir()
    with _files.staged_directory(target) as staging:
        (staging / "config.json").write_text("{}")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", live.name])


def _tf4_python() -> Path | None:
    here = Path(sys.prefix)
    candidate = here.parent / ".venv-tf4" / "bin" / "python"
    return candidate if candidate.exists() else None


def test_the_saved_tokenizer_loads_in_transformers_4(tmp_path):
    python = _tf4_python()
    if python is None:
        pytest.skip("no .venv-tf4 next to this environment (scripts/test.sh makes one)")
    tokenizer = hf_io.load_tokenizer()
    hf_io.save_tokenizer(tokenizer, tmp_path)
    sample = "def f(x):\n    return x  # ok"
    code = (
        "import json, sys, transformers\n"
        f"t = transformers.AutoTokenizer.from_pretrained({str(tmp_path)!r})\n"
        f"print(json.dumps([transformers.__version__, t({sample!r})['input_ids']]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    version, ids = json.loads(result.stdout.strip().splitlines()[-1])
    assert version.startswith("4.")
    assert ids == tokenizer(sample)["input_ids"]
