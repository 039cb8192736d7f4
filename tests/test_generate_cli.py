"""The generation command (``rslora-generate`` / ``python -m rslora_jax.generate``) and the
fine-tuning command's held-out samples (``--samples``).

Reference: the library's `rslora_jax.generate.generate` on the same checkpoint, adapter and
prompt tokens (the command must load, encode, place and print what the library computes: the
library itself is checked against transformers in tests/test_generate.py). Bad input must stop
the command with exit status 2 and a message naming the argument, before anything is compiled
(the compiled program is replaced by one that fails the test).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rslora_jax as rl
from rslora_jax import data
from rslora_jax import finetune as ft
from rslora_jax.cli import generate as cli
from rslora_jax.generate import SamplingConfig, generate, loop
from rslora_jax.hf import export_peft, load_pretrained, save_pretrained
from rslora_jax.models import LlamaConfig, LlamaForCausalLM, init_params

REPO = Path(__file__).resolve().parent.parent
NEW = 5
LORA = rl.LoraConfig(
    rank=4, alpha=8.0, targets="all-linear", kernel_axes={"model/layers/.*": "lio"}
)


def _checkpoint(directory: Path, **fields) -> Path:
    config = LlamaConfig.tiny(vocab_size=2048, max_position_embeddings=64, **fields)
    params = jax.tree.map(
        lambda x: x * 4 if x.ndim > 1 else x, init_params(config, jax.random.key(0))
    )  # larger weights: completions that depend on the prompt
    save_pretrained(directory, params, config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data.BUILTIN_TOKENIZER_DIR / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Llama checkpoint with the built-in tokenizer, and a random adapter saved in both
    formats (our checkpoint inside a run-like directory, and PEFT's)."""
    directory = _checkpoint(tmp_path_factory.mktemp("tiny"))
    config, base = load_pretrained(directory)
    shapes = jax.eval_shape(lambda: rl.init_adapters(base, LORA, jax.random.key(0)))
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes
    )
    params = rl.combine(adapters, base)
    run = tmp_path_factory.mktemp("run")
    rl.save_adapters(run / "adapters", params, LORA)
    export_peft(run / "peft", params, LORA, config)
    return SimpleNamespace(
        dir=directory,
        config=config,
        base=base,
        params=params,
        run=run,
        tokenizer=data.load_tokenizer(directory),
    )


def _library(ckpt, texts, params=None, lora_config=None) -> list[str]:
    ids = [ckpt.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = generate(
        LlamaForCausalLM(ckpt.config),
        ckpt.base if params is None else params,
        ids,
        SamplingConfig(max_new_tokens=NEW),
        lora_config=lora_config,
    )
    return [ckpt.tokenizer.decode(c, skip_special_tokens=True) for c in out.completions()]


def _run(*argv) -> list[dict]:
    return cli.run([*map(str, argv), "--ignore-eos"])


def test_single_prompt_streams_and_writes_jsonl(ckpt, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    records = _run(
        "--model", ckpt.dir, "--prompt", "def f(x):", "--max-new-tokens", NEW, "--out", out
    )
    expected = _library(ckpt, ["def f(x):"])[0]
    stdout = capsys.readouterr().out
    assert stdout == "def f(x):" + expected + "\n"  # streamed after the prompt
    (line,) = out.read_text().splitlines()
    rec = json.loads(line)
    assert rec == records[0]
    assert rec["prompt"] == "def f(x):" and rec["completion"] == expected
    assert rec["completion_tokens"] == NEW and rec["stopped"] is False
    assert rec["prompt_tokens"] == len(
        ckpt.tokenizer("def f(x):", add_special_tokens=False)["input_ids"]
    )
    assert 0 < rec["time_to_first_token_s"] <= rec["batch_seconds"]


def test_adapter_in_both_formats(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    texts = ["import os", "class A:", "for i in range(3):"]
    prompts.write_text("\n".join(texts) + "\n\n")
    expected = _library(ckpt, texts, ckpt.params, LORA)
    assert expected != _library(ckpt, texts)  # the adapter changes the completions
    for adapter in (ckpt.run, ckpt.run / "adapters", ckpt.run / "peft"):
        records = _run(
            "--model", ckpt.dir, "--adapter", adapter, "--prompts", prompts, "--max-new-tokens", NEW,
            "--batch-size", 2,
        )  # fmt: skip
        assert [r["prompt"] for r in records] == texts
        assert [r["completion"] for r in records] == expected, adapter
        assert [r["batch_size"] for r in records] == [2, 2, 1]


def test_mesh_run_matches_one_device(ckpt):
    texts = ["x = 1", "def g():"]
    argv = ["--model", ckpt.dir, "--adapter", ckpt.run, "--max-new-tokens", NEW, "--no-stream"]
    argv += [a for t in texts for a in ("--prompt", t)]
    one = _run(*argv)
    many = _run(*argv, "--mesh", "data=2,model=4")
    assert [r["completion"] for r in many] == [r["completion"] for r in one]


def test_jsonl_prompts_and_chats(ckpt, tmp_path):
    from rslora_jax.cli.generate.plan import prepare

    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "def f("}, {"messages": [{"role": "user", "content": "Hi?"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", str(ckpt.dir), "--prompts", str(path), "--max-new-tokens", "8"]
    job = prepare(cli.parse_args(argv))
    assert [p.text for p in job.prompts] == ["def f(", "<|user|>\nHi?</s>\n<|assistant|>\n"]
    assert job.sampling.stop_tokens == (ckpt.tokenizer.eos_token_id,)


def _bad_cases(ckpt, tmp_path) -> dict[str, tuple[list, str]]:
    other = tmp_path / "other"
    _checkpoint(other, hidden_size=48)
    o_config, o_base = load_pretrained(other)
    o_params = rl.init(o_base, LORA, jax.random.key(0))
    rl.save_adapters(other / "ours", o_params, LORA)
    export_peft(other / "peft", o_params, LORA, o_config)
    (tmp_path / "empty").mkdir()
    gpt2 = shutil.copytree(ckpt.dir, tmp_path / "gpt2")
    hf = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    long = " ".join(["word"] * 80)
    m = ["--model", ckpt.dir, "--prompt", "def f(", "--max-new-tokens", 8]
    return {
        "no prompt": (["--model", ckpt.dir], "no prompt: give --prompt"),
        "long prompt": (["--model", ckpt.dir, "--prompt", long], "more than the model's 64 positions"),
        "prompt + new": ([*m, "--max-new-tokens", 62], "lower --max-new-tokens to"),
        "zero new": ([*m, "--max-new-tokens", 0], "--max-new-tokens: expected a positive integer"),
        "negative new": ([*m, "--max-new-tokens", -4], "expected a positive integer, got '-4'"),
        "temperature": ([*m, "--temperature", -0.5], r"--temperature: expected a number in \[0.0"),
        "top-p 0": ([*m, "--top-p", 0], r"--top-p: expected a number in \(0.0, 1.0\]"),
        "top-p 1.5": ([*m, "--top-p", 1.5], r"--top-p: expected a number in \(0.0, 1.0\]"),
        "other base (ours)": ([*m, "--adapter", other / "ours"], "is it an adapter of --model"),
        "other base (peft)": ([*m, "--adapter", other / "peft"], "is it an adapter of --model"),
        "neither format": ([*m, "--adapter", tmp_path / "empty"], "neither an adapter checkpoint"),
        "missing adapter": ([*m, "--adapter", tmp_path / "nope"], "no such directory"),
        "mesh": ([*m, "--mesh", "data=3"], "has 3 devices, but JAX sees 8"),
        "no model": (["--model", tmp_path / "nope", "--prompt", "x"], "no such directory"),
        "other family": (["--model", gpt2, "--prompt", "x"], r"model_type='gpt2'; supported: \('llama'"),
    }  # fmt: skip


def test_bad_input_fails_before_compiling(ckpt, tmp_path, capsys, monkeypatch):
    def compile_nothing(*args, **kwargs):
        raise AssertionError("compiled before checking the input")

    monkeypatch.setattr(loop, "_program", compile_nothing)
    for name, (argv, message) in _bad_cases(ckpt, tmp_path).items():
        assert cli.main([str(a) for a in argv]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("rslora-generate: error: "), (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert re.search(message, err), (name, err)


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "rslora_jax.generate", "--max-new-tokens", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "rslora-generate: error: argument --max-new-tokens" in proc.stderr


# --------------------------------------------------------------------------------------------
# rslora-finetune --samples


@pytest.mark.loose_dtypes  # optax's Adam
def test_finetune_samples_before_and_after(ckpt, tmp_path, capsys):
    from rslora_jax.cli.finetune.samples import held_out_prompts

    text = tmp_path / "corpus.txt"
    text.write_text(data.stdlib_finetune_text()[:6_000], encoding="utf-8")
    out = tmp_path / "run"
    argv = [
        "--model", ckpt.dir, "--data", text, "--steps", 3, "--batch-size", 4, "--seq-len", 32,
        "--rank", 4, "--lr", "3e-2", "--warmup-steps", 1, "--no-progress", "--out", out,
        "--samples", 2,
    ]  # fmt: skip
    assert ft.main([str(a) for a in argv]) == 0
    summary = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["samples"]) == 2
    assert "held-out prompts, greedy completions before -> after training:" in summary
    assert "  sample 2: ..." in summary
    # "after" is what the trained adapters generate from those prompts; "before" the base.
    config, base = load_pretrained(ckpt.dir)
    params, lora_config = rl.load_adapters(out / "adapters", base)
    for record in m["samples"]:
        assert set(record) == {"prompt", "reference", "before", "after"}
        ids = ckpt.tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        for tree, key in ((base, "before"), (params, "after")):
            got = generate(
                LlamaForCausalLM(config),
                tree,
                [ids],
                SamplingConfig(max_new_tokens=32, stop_tokens=(ckpt.tokenizer.eos_token_id,)),
                lora_config=lora_config if key == "after" else None,
            ).completions()[0]
            if got and got[-1] == ckpt.tokenizer.eos_token_id:
                got = got[:-1]
            assert ckpt.tokenizer.decode(got, skip_special_tokens=True) == record[key], key
    assert held_out_prompts(np.zeros((1, 5, 4), np.int32), 1) == []  # nothing to split
