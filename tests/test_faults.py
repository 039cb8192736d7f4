"""Faults in the middle of a run, at a small size: kill -9 at a checkpoint save, inside an
export, between the two renames of a directory swap, and a filesystem that fills up.

Each fault runs the real command in a subprocess (`tests/_fault_driver.py` kills it with SIGKILL
at the chosen point); the run directory it leaves must then be readable and the run must
continue with ``--resume``: no mix of two saves, no half-written file under a final name, no
staging left behind. The full disk is a real tmpfs in a private mount namespace
(``unshare -rm``) where the machine allows one; tests/test_finetune_guards.py covers the same
message by fault injection everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

import rslora_jax as rl
from rslora_jax import data
from rslora_jax import finetune as ft
from rslora_jax.hf import load_pretrained, save_pretrained
from rslora_jax.models.llama import LlamaConfig, init_params

# optax's Adam is not strict-dtype-promotion clean (its bias correction mixes int and float).
pytestmark = pytest.mark.loose_dtypes

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "_fault_driver.py"
TIMEOUT_S = 600  # a hang guard for a busy CI machine, not a speed check
STEPS = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig.tiny(vocab_size=2048, max_position_embeddings=64)
    save_pretrained(directory, init_params(config, jax.random.key(0)), config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data.BUILTIN_TOKENIZER_DIR / name, directory / name)
    text = directory.parent / "corpus.txt"
    text.write_text(data.stdlib_finetune_text()[:12_000], encoding="utf-8")
    _, params = load_pretrained(directory)
    return SimpleNamespace(dir=directory, text=text, params=params)


def _args(base, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(base.dir),
        "--data", str(base.text),
        "--steps", str(STEPS),
        "--batch-size", "4",
        "--seq-len", "32",
        "--rank", "4",
        "--lr", "1e-2",
        "--schedule", "constant",
        "--warmup-steps", "1",
        "--eval-every", "0",
        "--eval-rows", "4",
        "--save-every", "2",
        "--no-progress",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",  # compiles several times faster
        "TOKENIZERS_PARALLELISM": "false",
    }


def _command(fault: str, args: list[str]) -> list[str]:
    return [sys.executable, str(DRIVER), fault, *args]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-4000:]


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def _adapters(directory: Path, params) -> dict[str, np.ndarray]:
    restored, _ = rl.load_adapters(directory, params)
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(rl.split(restored)[0])
    }


def test_kill_after_a_checkpoint_save_before_its_checksums(base, tmp_path):
    out = tmp_path / "run"
    _killed(_run(_command("kill-at-checksums:2", _args(base, out)), tmp_path))
    assert ft._checkpoint_steps(out / "checkpoints") == [2]
    assert not (out / "checkpoints" / "2" / "checksums.json").exists()
    # Complete but unverifiable: restored (saved before checksums existed, or this crash).
    assert ft.main(["--resume", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and len(metrics["train_losses"]) == STEPS
    assert ft._checkpoint_steps(out / "checkpoints") == [2, 4]
    assert (out / "checkpoints" / "4" / "checksums.json").exists()


def test_kill_inside_an_export_and_between_two_renames(base, tmp_path):
    out = tmp_path / "run"
    # 1. Killed while the merged model is in its staging directory: the other outputs are
    #    whole, merged/ is absent (never half written), the staging is left behind...
    _killed(_run(_command("kill-in-staging:merged", _args(base, out)), tmp_path))
    assert (out / "adapters").is_dir() and (out / "peft").is_dir()
    assert not (out / "merged").exists() and not (out / "metrics.json").exists()
    assert [n.split(".tmp-")[0] for n in _hidden(out)] == [".merged"]
    # ...and --resume (at the final step: no training) cleans it and writes the outputs.
    assert ft.main(["--resume", "--out", str(out), "--no-progress"]) == 0
    assert (out / "merged" / "model.safetensors").is_file() and _hidden(out) == []
    before = _adapters(out / "adapters", base.params)

    # 2. Killed between the two renames that put a new adapters/ in place (no renameat2):
    #    the old directory waits under .adapters.old (the finished new one in its staging),
    #    and a reader gets the old one back whole.
    _killed(
        _run(_command("kill-between-renames:adapters", ["--resume", "--out", str(out)]), tmp_path)
    )
    assert not (out / "adapters").exists()
    assert [n.split(".tmp-")[0] for n in _hidden(out)] == [".adapters.old", ".adapters"]
    after = _adapters(out / "adapters", base.params)  # load_adapters restores it first
    assert after.keys() == before.keys()
    for key in before:
        assert np.array_equal(after[key], before[key]), key
    assert ft.main(["--resume", "--out", str(out), "--no-progress"]) == 0
    assert _hidden(out) == [] and (out / "metrics.json").is_file()


def _tmpfs_available(tmp_path: Path) -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
        capture_output=True,
        timeout=60,
    )
    return result.returncode == 0


def test_a_filesystem_that_fills_up(base, tmp_path):
    """A 700 KiB tmpfs as --out: the checkpoints and small exports fit, merged/ does not."""
    if not _tmpfs_available(tmp_path):
        pytest.skip("no private tmpfs here (unshare -rm / mount not permitted)")
    out = tmp_path / "full"
    out.mkdir()
    run = out / "run"
    args = _args(base, run, "--save-every", "0")
    command = " ".join(f"'{a}'" for a in _command("none", args))
    script = (
        f"mount -t tmpfs -o size=700k tmpfs '{out}' && {command}; status=$?; "
        f"ls -a '{run}'; exit $status"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == ft.EXIT_USAGE, result.stdout[-2000:] + result.stderr[-4000:]
    want = (
        f"rslora-finetune: error: no space left on device while writing {run / 'merged'}; the "
        f"last good checkpoint is {run / 'checkpoints' / str(STEPS)}"
    )
    assert want in result.stderr and "Traceback" not in result.stderr, result.stderr[-4000:]
    listing = result.stdout.split()
    assert "merged" not in listing and not [n for n in listing if n.startswith(".merged")]
