"""The fine-tuning command's guards: every failure a message, nothing silent, nothing lost.

Bad model files, a typo in --targets, an --out holding what the command did not write (or its
own inputs), a --mesh that cannot fit: refused before the run directory is created. A run that
stopped before its first checkpoint starts over; Ctrl-C before the first step and during the
final export ends with a message (exit status 130) and the run continues; a diverging run
stops at the first non-finite step with the last good checkpoint named; a damaged checkpoint
is skipped on --resume; a full disk is one line naming the file (exit status 2).

The kill -9 cases (mid-save, mid-export, between two renames) and a real full filesystem run
in subprocesses: tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest
import transformers

import rslora_jax as rl
import rslora_jax.hf
from rslora_jax import data
from rslora_jax import finetune as ft
from rslora_jax.cli.finetune import command
from rslora_jax.cli.finetune.args import args_to_json, build_parser
from rslora_jax.hf import io as hf_io
from rslora_jax.hf import load_pretrained, save_pretrained
from rslora_jax.models.llama import LlamaConfig, init_params

# optax's Adam is not strict-dtype-promotion clean (its bias correction mixes int and float).
pytestmark = pytest.mark.loose_dtypes

STEPS = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama (our writer) with the built-in tokenizer, and a text file."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig.tiny(vocab_size=2048, max_position_embeddings=64)
    save_pretrained(directory, init_params(config, jax.random.key(0)), config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data.BUILTIN_TOKENIZER_DIR / name, directory / name)
    text = directory.parent / "corpus.txt"
    text.write_text(data.stdlib_finetune_text()[:12_000], encoding="utf-8")
    return SimpleNamespace(dir=directory, text=text)


def _args(base, out, *extra, model=None, steps=STEPS):
    return [
        "--model", str(model or base.dir),
        "--data", str(base.text),
        "--steps", str(steps),
        "--batch-size", "4",
        "--seq-len", "32",
        "--rank", "4",
        "--lr", "1e-2",
        "--schedule", "constant",
        "--warmup-steps", "1",
        "--eval-every", "2",
        "--eval-rows", "4",
        "--save-every", "2",
        "--no-progress",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def _must_not_train(plan):
    raise AssertionError("training started despite bad input")


def _model_copy(base, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(base.dir, target)
    return target


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------
# Refused before the run directory is created


def _bad_model(kind: str, directory: Path) -> tuple[Path, str]:
    """Damages a copy of the model; returns the file the message must name, and a phrase."""
    weights = directory / "model.safetensors"
    raw = weights.read_bytes()
    if kind == "empty weights":
        weights.write_bytes(b"")
        return weights, "is empty"
    if kind == "truncated weights":
        weights.write_bytes(raw[:-1000])
        return weights, "is truncated"
    if kind == "oversized header":
        weights.write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])
        return weights, "announces a header of"
    if kind == "intermediate_size":
        _edit_config(directory, intermediate_size=40)
        return directory / "config.json", "expected (32, 40)"
    if kind == "more layers":
        _edit_config(directory, num_hidden_layers=3)
        return directory, "missing tensors"
    if kind == "zero heads":
        _edit_config(directory, num_attention_heads=0)
        return directory / "config.json", "num_attention_heads=0"
    if kind == "invalid config":
        (directory / "config.json").write_text('{"model_type": "llama", ')
        return directory / "config.json", "is not valid JSON"
    if kind == "index outside":
        names = list(hf_io.safetensors_header(weights)[1])
        shutil.move(weights, directory.parent / "elsewhere.safetensors")
        index = {"weight_map": dict.fromkeys(names, "../elsewhere.safetensors")}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        return directory / "model.safetensors.index.json", "not a plain file name"
    raise ValueError(kind)


BAD_MODELS = [
    "empty weights",
    "truncated weights",
    "oversized header",
    "intermediate_size",
    "more layers",
    "zero heads",
    "invalid config",
    "index outside",
]


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_bad_model_files_are_named_before_the_run_directory_exists(
    base, tmp_path, capsys, monkeypatch, kind
):
    model = _model_copy(base, tmp_path)
    named, phrase = _bad_model(kind, model)
    monkeypatch.setattr(command, "train", _must_not_train)
    out = tmp_path / "out"
    assert ft.main(_args(base, out, model=model)) == ft.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("rslora-finetune: error: --model ") and "Traceback" not in err, err
    assert str(named) in err and phrase in err, err
    assert not out.exists()


def _data_with_unterminated_string(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "no end}\n')
    return path


def test_small_mistakes_are_named(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(command, "train", _must_not_train)
    out = tmp_path / "out"
    cases = {
        "typo in --targets": (
            ["--targets", "q_proj,v_projj"],
            "'v_projj' matches no kernel (did you mean 'v_proj'?)",
        ),
        "jsonl": (
            ["--data", str(_data_with_unterminated_string(tmp_path))],
            "bad.jsonl:2: invalid JSON at column 10: Unterminated string starting at",
        ),
    }
    for name, (extra, message) in cases.items():
        assert ft.main(_args(base, out, *extra)) == ft.EXIT_USAGE, name
        err = capsys.readouterr().err
        assert message in err and "at at" not in err, (name, err)
        assert not out.exists()


def test_mesh_is_checked_before_the_tokenizer_loads(base, tmp_path, capsys, monkeypatch):
    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before --mesh was checked")

    monkeypatch.setattr(rslora_jax.hf, "load_tokenizer", no_tokenizer)
    monkeypatch.setattr(command, "train", _must_not_train)
    assert ft.main(_args(base, tmp_path / "out", "--mesh", "data=3")) == ft.EXIT_USAGE
    assert "--mesh 'data=3' has 3 devices, but JAX sees 8" in capsys.readouterr().err


def test_out_must_not_hold_the_inputs_or_files_we_did_not_write(
    base, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(command, "train", _must_not_train)
    # --out is --model, or contains it (a merged model of an earlier run fine-tuned again).
    assert ft.main(_args(base, base.dir)) == ft.EXIT_USAGE
    assert "is --model" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(base.dir, run / "merged")
    assert ft.main(_args(base, run, model=run / "merged")) == ft.EXIT_USAGE
    assert f"contains --model '{run / 'merged'}'" in capsys.readouterr().err
    assert ft.main(_args(base, run, "--tokenizer", str(run / "merged"))) == ft.EXIT_USAGE
    assert "contains --tokenizer" in capsys.readouterr().err

    # Outputs of something else (no run.json): refused, kept; --overwrite replaces them.
    mine = tmp_path / "mine"
    (mine / "adapters").mkdir(parents=True)
    (mine / "adapters" / "notes.txt").write_text("my notes")
    (mine / "README.md").write_text("not one of our names: never touched")
    assert ft.main(_args(base, mine)) == ft.EXIT_USAGE
    assert "already holds adapters, which this command did not write" in capsys.readouterr().err
    assert (mine / "adapters" / "notes.txt").read_text() == "my notes"
    planned = []
    monkeypatch.setattr(command, "train", lambda plan: planned.append(plan) or {})
    assert ft.main(_args(base, mine, "--overwrite")) == 0
    assert "--overwrite: replacing adapters" in capsys.readouterr().err
    assert not (mine / "adapters").exists() and (mine / "README.md").exists()
    assert len(planned) == 1


# ------------------------------------------------------------------------------------------
# Runs that stop, and go on


def _sigint_when(monkeypatch, module, name: str) -> None:
    """A real Ctrl-C (SIGINT to this process) when `module.name` is called."""
    real = getattr(module, name)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def test_ctrl_c_before_training_and_during_the_export(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # 1. Ctrl-C while the weights load: no checkpoint, no traceback; the same command starts
    #    over (and so would --resume).
    with monkeypatch.context() as patch:
        _sigint_when(patch, rslora_jax.hf, "load_pretrained")
        assert ft.main(_args(base, out)) == ft.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted; there is no checkpoint yet" in err and "Traceback" not in err, err
    assert (out / "run.json").exists() and not ft._checkpoint_steps(out / "checkpoints")

    # 2. The same command again: started over; Ctrl-C while the merged model is written.
    with monkeypatch.context() as patch:
        _sigint_when(patch, rslora_jax.hf, "save_pretrained")
        assert ft.main(_args(base, out)) == ft.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint: starting it again" in err, err
    assert "interrupted while writing the outputs; the training is complete" in err, err
    assert "Traceback" not in err and not (out / "metrics.json").exists()
    assert not (out / "merged").exists()  # never half written
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # 3. --resume writes the outputs without training; the merged model loads in transformers.
    assert ft.main(["--resume", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == STEPS and len(metrics["train_losses"]) == STEPS
    tokenizer_config = json.loads((out / "merged" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4 too
    transformers.AutoConfig.from_pretrained(out / "merged")

    # 4. A flipped byte in the newest checkpoint: --resume skips it and goes on from the older.
    victim = max(
        (p for p in (out / "checkpoints" / str(STEPS) / "adapters").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 1
    victim.write_bytes(bytes(raw))
    assert ft.main(["--resume", "--out", str(out), "--steps", "6", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint step {STEPS} is damaged" in captured.err, captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and len(metrics["train_losses"]) == 6
    assert ft._checkpoint_steps(out / "checkpoints") == [4, 6]


def test_resume_without_a_checkpoint_starts_from_step_0(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    parsed = build_parser().parse_args(_args(base, out))
    run = {"args": {**args_to_json(parsed), "out": str(out)}, "data_sha256": "x"}
    (out / "run.json").write_text(json.dumps(run))  # as a run killed before its checkpoint
    planned = []
    monkeypatch.setattr(command, "train", lambda plan: planned.append(plan) or {})
    assert ft.main(["--resume", "--out", str(out)]) == 0
    assert (
        "has no checkpoint yet (the run stopped before its first one): starting it from step 0"
        in (capsys.readouterr().err)
    )
    assert planned[0].args.resume is False


def test_a_diverging_run_stops_at_the_first_non_finite_step(base, tmp_path, capsys):
    out = tmp_path / "run"
    # lr 1e38: after one Adam step the adapters are ~1e38 and the next forward overflows.
    args = _args(
        base, out, "--lr", "1e38", "--warmup-steps", "0", "--save-every", "1", "--eval-every", "0"
    )
    assert ft.main(args) == ft.EXIT_USAGE
    err = capsys.readouterr().err
    assert "error: step 2: the training loss is not finite" in err, err
    assert f"the last good checkpoint is {out / 'checkpoints' / '1'}" in err, err
    assert ft._checkpoint_steps(out / "checkpoints") == [1]
    assert not (out / "metrics.json").exists()


def test_nan_in_the_base_weights_stops_before_training(base, tmp_path, capsys):
    model = _model_copy(base, tmp_path)
    config, params = load_pretrained(model)
    kernel = params["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    params["model"]["layers"]["mlp"]["down_proj"]["kernel"] = kernel.at[1, 0, 0].set(float("nan"))
    with pytest.raises(ValueError, match="NaN"):  # our own writer refuses it...
        save_pretrained(model, params, config)
    from safetensors.numpy import load_file, save_file  # ...so damage the file directly

    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    assert ft.main(_args(base, out, model=model)) == ft.EXIT_USAGE
    err = capsys.readouterr().err
    assert "tensor 'model.layers.1.mlp.down_proj.weight'" in err and "NaN" in err, err
    assert "Traceback" not in err


def test_a_full_disk_names_the_file_and_the_last_good_checkpoint(
    base, tmp_path, capsys, monkeypatch
):
    """Fault injection on the write call (tests/test_faults.py fills a real filesystem)."""
    out = tmp_path / "run"
    real = hf_io.write_safetensors

    def full(path, tensors, metadata=None):
        if Path(path).parent.name.startswith(".merged.tmp-"):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(28, "No space left on device", str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(hf_io, "write_safetensors", full)
    assert ft.main(_args(base, out)) == ft.EXIT_USAGE
    err = capsys.readouterr().err
    want = (
        f"error: no space left on device while writing {out / 'merged'}; the last good "
        f"checkpoint is {out / 'checkpoints' / str(STEPS)}"
    )
    assert want in err and "Traceback" not in err, err
    assert not (out / "merged").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left
    restored, _ = rl.load_adapters(out / "adapters", load_pretrained(base.dir)[1])
    assert rl.split(restored)[0]
