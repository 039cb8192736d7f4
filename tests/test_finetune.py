"""The fine-tuning command (`rslora_jax.finetune`) end to end, at a tiny size.

A tiny random Llama is written with transformers (PyTorch) into a temporary directory together
with the built-in tokenizer files; the command fine-tunes it on a small text file. The outputs
are checked against independent readers: transformers loads the merged directory, PEFT loads
the adapter onto the PyTorch base, and both must give the logits of our model with the restored
adapter checkpoint. A run interrupted by SIGINT and resumed must end with adapters bit-identical
to those of an uninterrupted run. Bad input must stop the command before it trains.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import rslora_jax as rl
from rslora_jax import data
from rslora_jax import finetune as ft
from rslora_jax.cli.finetune import command
from rslora_jax.hf import load_pretrained, resize_vocab
from rslora_jax.models import LlamaForCausalLM
from tests._asserts import assert_close

# optax's Adam is not strict-dtype-promotion clean (its bias correction mixes int and float).
pytestmark = pytest.mark.loose_dtypes

REPO = Path(__file__).resolve().parent.parent
STEPS = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama (GQA, untied head) + the built-in tokenizer, as an HF directory."""
    hf_config = transformers.LlamaConfig(
        vocab_size=2048,  # the built-in tokenizer's
        hidden_size=32,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data.BUILTIN_TOKENIZER_DIR / name, directory / name)
    text = tmp_path_factory.mktemp("data") / "corpus.txt"
    text.write_text(data.stdlib_finetune_text()[:12_000], encoding="utf-8")
    return SimpleNamespace(dir=directory, model=model, text=text)


def _args(base, out, *extra, steps=STEPS):
    return [
        "--model", str(base.dir),
        "--data", str(base.text),
        "--steps", str(steps),
        "--batch-size", "4",
        "--seq-len", "32",
        "--rank", "4",
        "--alpha", "8",
        "--lr", "3e-2",
        "--schedule", "constant",
        "--warmup-steps", "2",
        "--eval-every", "6",
        "--save-every", "4",
        "--no-progress",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """One uninterrupted run (the reference of the resume tests)."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert ft.main(_args(base, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return SimpleNamespace(out=out, metrics=metrics)


@pytest.fixture(scope="module")
def ours(base):
    """Our model and base params, loaded from the tiny checkpoint."""
    config, params = load_pretrained(base.dir)
    return SimpleNamespace(model=LlamaForCausalLM(config), params=params)


def _ids(base) -> np.ndarray:
    rows = data.tokenize_and_pack([base.text.read_text()], data.load_tokenizer(), 16)
    return rows[:2, :16]


def _leaves(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


# ------------------------------------------------------------------------------------------
# A run's outputs


def test_outputs_exist_and_the_loss_falls(run, capsys):
    out, m = run.out, run.metrics
    for name in ("adapters", "peft", "merged", "checkpoints"):
        assert (out / name).is_dir(), name
    assert (out / "peft" / "adapter_config.json").is_file()
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert (out / "merged" / "model.safetensors").is_file()
    assert (out / "merged" / "tokenizer.json").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "loss.png").stat().st_size > 10_000
    assert ft._checkpoint_steps(out / "checkpoints") == [8, 12]  # --save-every 4, --keep 2

    assert len(m["train_losses"]) == STEPS
    assert [e[0] for e in m["eval_losses"]] == [0, 6, 12]
    assert np.mean(m["train_losses"][-3:]) < np.mean(m["train_losses"][:3]) - 0.05
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.1
    assert m["tokens_per_step"] == 4 * 32 and m["tokens_per_second"] > 0
    assert m["config"]["lora"]["rank"] == 4 and m["config"]["lora"]["scaling"] == "rslora"
    assert m["config"]["args"]["lr"] == 3e-2
    assert set(m["seconds"]) >= {"setup", "train_total", "export", "total_this_process"}
    assert m["parameters"]["adapters"] == sum(  # 2 layers x r=4 x (d_in + d_out) per module
        2 * 4 * (i + o)
        for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 44), (32, 44), (44, 32)]
    )


def test_merged_and_peft_outputs_match_our_adapted_model(base, run, ours):
    restored, lora_config = rl.load_adapters(run.out / "adapters", ours.params)
    assert lora_config.rank == 4 and lora_config.scaling == "rslora"
    ids = _ids(base)
    apply = rl.lora(ours.model.apply, lora_config)
    adapted = np.asarray(apply({"params": restored}, jnp.asarray(ids)))
    plain = np.asarray(ours.model.apply({"params": ours.params}, jnp.asarray(ids)))
    scale = np.abs(adapted).max()
    assert np.abs(adapted - plain).max() > 1e-2 * scale  # training moved the adapters

    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            run.out / "merged", attn_implementation="eager"
        ).eval()
        assert merged.dtype == torch.float32  # --merged-dtype auto: the base's dtype
        merged_logits = merged(torch.as_tensor(ids)).logits.numpy()
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base.model), run.out / "peft")
        peft_logits = peft_model.eval()(torch.as_tensor(ids)).logits.numpy()
    assert_close(merged_logits, adapted, rel=2e-5, norm="max", what="merged export")
    assert_close(peft_logits, adapted, rel=2e-5, norm="max", what="PEFT export")

    tok = transformers.AutoTokenizer.from_pretrained(run.out / "merged")
    sample = "def f(x):\n    return x  # ok"
    assert tok(sample)["input_ids"] == data.load_tokenizer()(sample)["input_ids"]


# ------------------------------------------------------------------------------------------
# Interrupt and resume


def _interrupt_at(monkeypatch, step: int) -> None:
    """Sends SIGINT to this process when the batch of `step` is drawn (a real Ctrl-C)."""
    real = data.batch_iterator

    def batches(*args, start_step=0, **kwargs):
        it = real(*args, start_step=start_step, **kwargs)

        def gen():
            for i, batch in enumerate(it, start=start_step):
                if i == step:
                    os.kill(os.getpid(), signal.SIGINT)
                yield batch

        return gen()

    monkeypatch.setattr(data, "batch_iterator", batches)


def test_resume_after_ctrl_c_is_bit_identical(base, run, ours, tmp_path, monkeypatch, capsys):
    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 6)
        assert ft.main(_args(base, out)) == ft.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted at step 7" in err and "--resume" in err
    assert ft._checkpoint_steps(out / "checkpoints") == [4, 7]  # periodic 4, Ctrl-C 7
    assert not (out / "metrics.json").exists()

    # Resume with no arguments but --resume and --out: the rest comes from run.json.
    assert ft.main(["--resume", "--out", str(out), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 7
    assert metrics["train_losses"] == run.metrics["train_losses"]  # exactly
    assert metrics["eval_losses"] == run.metrics["eval_losses"]
    resumed, _ = rl.load_adapters(out / "adapters", ours.params)
    reference, _ = rl.load_adapters(run.out / "adapters", ours.params)
    a, b = _leaves(rl.split(resumed)[0]), _leaves(rl.split(reference)[0])
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # bit-identical


def test_resume_refuses_changed_arguments(base, run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(run.out, out)
    run_json = json.loads((out / "run.json").read_text())
    run_json["args"]["out"] = str(out)
    (out / "run.json").write_text(json.dumps(run_json))
    monkeypatch.setattr(command, "train", _must_not_train)
    assert ft.main(["--resume", "--out", str(out), "--rank", "8"]) == ft.EXIT_USAGE
    assert "--rank 4 -> 8" in capsys.readouterr().err


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_sigint_saves_a_checkpoint_and_the_run_resumes(base, tmp_path, capsys):
    out = tmp_path / "sigint"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    args = _args(base, out, "--save-every", "0", "--eval-every", "0", steps=100_000)
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rslora_jax.finetune", *args],
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
            env=env,
            cwd=tmp_path,
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=180)
            assert line is not None, stderr.read_text()
            if line.startswith("train loss at the first step"):
                break
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.stdout.close()
    err = stderr.read_text()
    assert proc.returncode == ft.EXIT_INTERRUPTED, err
    assert "checkpoint saved" in err
    steps = ft._checkpoint_steps(out / "checkpoints")
    assert len(steps) == 1 and 1 <= steps[0] < 100_000
    # The constant schedule lets a resumed run change --steps: finish 2 steps later.
    stop = steps[0] + 2
    assert ft.main(["--resume", "--out", str(out), "--steps", str(stop)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_losses"]) == stop and metrics["resumed_from_step"] == steps[0]


# ------------------------------------------------------------------------------------------
# Several devices


def test_mesh_run_matches_the_single_device_run(base, run, tmp_path):
    """A sharded run with the factored forward repeats the one-device run (--forward auto,
    which fuses every layer at this batch: rslora_jax.fused)."""
    out = tmp_path / "mesh"
    assert len(jax.devices()) == 8  # tests/conftest.py
    mesh_args = ("--mesh", "data=2,fsdp=2,model=2", "--forward", "factored")
    assert ft.main(_args(base, out, *mesh_args)) == 0
    assert json.loads((out / "run.json").read_text())["args"]["forward"] == "factored"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["devices"]["mesh"] == {"data": 2, "fsdp": 2, "model": 2}
    np.testing.assert_allclose(metrics["train_losses"], run.metrics["train_losses"], rtol=2e-4)
    np.testing.assert_allclose(
        [e[1] for e in metrics["eval_losses"]],
        [e[1] for e in run.metrics["eval_losses"]],
        rtol=2e-4,
    )


def test_chunked_loss_and_full_remat_repeat_the_default_run(base, run, tmp_path):
    """--loss-chunk (the model's own loss, 5 positions at a time: the last chunk is short) and
    --remat-policy nothing_saveable change what is kept in memory, not what is computed: the
    losses are the default run's (rounding aside)."""
    out = tmp_path / "chunked"
    extra = ("--loss-chunk", "5", "--remat-policy", "nothing_saveable")
    assert ft.main(_args(base, out, *extra)) == 0
    args = json.loads((out / "run.json").read_text())["args"]
    assert (args["loss_chunk"], args["remat_policy"]) == (5, "nothing_saveable")
    metrics = json.loads((out / "metrics.json").read_text())
    np.testing.assert_allclose(metrics["train_losses"], run.metrics["train_losses"], rtol=2e-4)
    np.testing.assert_allclose(
        [e[1] for e in metrics["eval_losses"]],
        [e[1] for e in run.metrics["eval_losses"]],
        rtol=2e-4,
    )


def test_llama_specs_shard_like_megatron_and_fsdp(ours):
    specs = ft.llama_specs(ours.params, ("fsdp", "model"))
    layers = specs["model"]["layers"]
    P = jax.sharding.PartitionSpec
    assert layers["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "model")
    assert layers["self_attn"]["o_proj"]["kernel"] == P(None, "model", "fsdp")
    assert layers["mlp"]["down_proj"]["kernel"] == P(None, "model", "fsdp")
    assert layers["input_layernorm"]["scale"] == P()
    assert specs["model"]["embed_tokens"]["embedding"] == P("model", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "model")
    only_data = ft.llama_specs(ours.params, ("data",))
    assert only_data["model"]["layers"]["mlp"]["up_proj"]["kernel"] == P(None, None, None)


# ------------------------------------------------------------------------------------------
# Bad input fails before training


def _must_not_train(plan):
    raise AssertionError("training started despite bad input")


def _bad(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """{case: (extra arguments, expected part of the message)}; files made in `tmp_path`."""
    file_in_the_way = tmp_path / "a_file"
    file_in_the_way.write_text("x")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"body": "no text field"}\n')
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n" * 3)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    return {
        "missing model": (["--model", str(tmp_path / "nope")], "no such directory"),
        "no config.json": (["--model", str(no_config)], "no config.json"),
        "missing data": (["--data", str(tmp_path / "nope.txt")], "does not exist"),
        "empty data": (["--data", str(empty)], "no non-whitespace text"),
        "jsonl field": (["--data", str(bad_jsonl)], "missing field 'text'"),
        "too little data": (["--data", str(short)], "add data or lower seq_len"),
        "rank too large": (["--rank", "17"], "--rank 17: rank 17 at"),
        "targets match nothing": (["--targets", "qq_proj"], "matched no kernel"),
        "unwritable out": (["--out", str(file_in_the_way / "run")], "cannot write there"),
        "mesh size": (["--mesh", "data=3"], "JAX sees 8"),
        "mesh syntax": (["--mesh", "data:2"], "expected AXIS=SIZE"),
        "mesh batch": (["--mesh", "data=8"], "--batch-size 4 is not divisible"),
        "mesh width": (["--mesh", "model=8"], "not divisible by mesh axis 'model'"),
        "remat policy": (["--remat-policy", "keep_all"], "is not a jax.checkpoint_policies name"),
        "loss chunk": (["--loss-chunk", "-1"], "--loss-chunk"),
        "seq too long": (["--seq-len", "65"], "max_position_embeddings"),
        "bad rank value": (["--rank", "0"], "expected a positive integer"),
        "warmup": (["--warmup-steps", "12"], "--warmup-steps 12 must be smaller"),
        "resume nothing": (["--resume"], "no run to resume"),
    }


BAD = [
    "missing model",
    "no config.json",
    "missing data",
    "empty data",
    "jsonl field",
    "too little data",
    "rank too large",
    "targets match nothing",
    "unwritable out",
    "mesh size",
    "mesh syntax",
    "mesh batch",
    "remat policy",
    "loss chunk",
    "mesh width",
    "seq too long",
    "bad rank value",
    "warmup",
    "resume nothing",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_before_training(base, tmp_path, capsys, monkeypatch, case):
    cases = _bad(tmp_path)
    assert sorted(cases) == sorted(BAD)
    extra, message = cases[case]
    monkeypatch.setattr(command, "train", _must_not_train)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = _args(base, out) + extra  # later flags win
    assert ft.main(argv) == ft.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("rslora-finetune: error: ") and message in err, err
    assert not out.exists()  # nothing left behind


def test_existing_run_is_not_overwritten(base, run, capsys, monkeypatch):
    monkeypatch.setattr(command, "train", _must_not_train)
    assert ft.main(_args(base, run.out)) == ft.EXIT_USAGE
    assert "already holds a fine-tuning run" in capsys.readouterr().err


def test_schedules():
    def lrs(kind):
        args = SimpleNamespace(lr=1.0, steps=12, warmup_steps=2, schedule=kind)
        args.weight_decay, args.max_grad_norm = 0.0, 1.0
        schedule = ft.make_schedule(ft.OptimSettings.from_args(args))
        return [float(schedule(t)) for t in (0, 1, 2, 7, 12)]

    assert lrs("constant") == [0.0, 0.5, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(lrs("linear"), [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(lrs("cosine"), [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-7)


# ------------------------------------------------------------------------------------------
# Training what LoRA alone cannot: --train-tokens, --modules-to-save, --bias


def test_new_tokens_and_saved_modules_train_and_export(base, tmp_path):
    """New special tokens grow the tables and are trained; the merged model (larger
    vocabulary), the PEFT adapter (on a base resized to the saved tokenizer) and our restored
    adapters give the same logits."""
    chat = tmp_path / "chat.txt"
    turns = data.stdlib_finetune_text()[:3000].split("\n")
    chat.write_text(
        "\n".join(f"<|user|>{a}<|assistant|>{b}" for a, b in zip(turns[::2], turns[1::2])),
        encoding="utf-8",
    )
    out = tmp_path / "run"
    extra = ("--data", str(chat), "--train-tokens", "<|user|>,<|assistant|>")
    extra += ("--modules-to-save", "model.norm", "--bias", "all")
    assert ft.main(_args(base, out, *extra, steps=4)) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out / "merged")
    new = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert new == [2048, 2049]
    ids = np.asarray([tok("<|user|>def f(x):<|assistant|>    return x")["input_ids"][:12]] * 2)
    assert 2048 in ids and 2049 in ids

    config, params = load_pretrained(base.dir)
    grown, config = resize_vocab(params, config, 2050)
    restored, lora_config = rl.load_adapters(out / "adapters", grown)
    assert lora_config.modules_to_save == ("model/norm",)
    assert lora_config.trainable_token_indices == (
        ("embed_tokens", (2048, 2049)),
        ("lm_head", (2048, 2049)),
    )
    rows = np.asarray(restored["model"]["embed_tokens"]["lora_tokens"]["embedding"])
    mean = np.asarray(grown["model"]["embed_tokens"]["embedding"][:2048]).mean(axis=0)
    assert np.abs(rows - mean).max() > 1e-3  # trained away from the mean they started at
    adapted = np.asarray(
        rl.lora(LlamaForCausalLM(config).apply, lora_config)({"params": restored}, jnp.asarray(ids))
    )
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            out / "merged", attn_implementation="eager"
        ).eval()
        assert merged.config.vocab_size == 2050
        merged_logits = merged(torch.as_tensor(ids)).logits.numpy()
        resized = copy.deepcopy(base.model)
        resized.resize_token_embeddings(
            len(transformers.AutoTokenizer.from_pretrained(out / "peft"))
        )
        peft_model = peft.PeftModel.from_pretrained(resized, out / "peft").eval()
        peft_logits = peft_model(torch.as_tensor(ids)).logits.numpy()
    assert_close(merged_logits, adapted, rel=2e-5, norm="max", what="merged export")
    assert_close(peft_logits, adapted, rel=2e-5, norm="max", what="PEFT export")
