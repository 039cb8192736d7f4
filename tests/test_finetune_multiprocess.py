"""The fine-tuning command on two processes under ``jax.distributed`` (CPU, gloo, localhost).

A tiny random Llama (written with `rslora_jax.hf.save_pretrained`, plus the built-in tokenizer
files) is fine-tuned by ``python -m rslora_jax.finetune`` in subprocesses:

* ``two``: 2 processes x 2 CPU devices, ``--mesh fsdp=2,model=2`` (the base and the batch split
  across the processes, tensor parallelism inside each), 6 steps, checkpoints at 3 and 6;
* ``one``: 1 process x 4 CPU devices, same mesh, same global batch, 6 steps: the reference;
* ``rejected``: 2 processes where only process 1 gets a bad ``--data``: both must stop with
  exit status 2 instead of waiting for each other;
* ``mismatched``: 2 processes where process 1 gets another ``--rank`` and ``--seed``: both must
  stop with exit status 2, naming them, before any weight is read;
* ``resumed``: a copy of ``two``'s run directory cut back to its step-3 checkpoint (as if the
  run had been killed after step 3), continued by a new 2-process launch with ``--resume``:
  it must end where ``two`` ends;
* ``interrupted``: 2 processes, SIGINT to process 1 only once training runs: both must stop
  after the same step, save one checkpoint together and exit with status 130.

Every process compiles with ``--xla_backend_optimization_level=0`` (several times faster to
compile on a small CPU machine; all runs use it, so they compare like for like).

The single-process command itself is covered by tests/test_finetune.py; here the reference is
that single-process run, and the exports of the 2-process run (written by process 0 from
gathered arrays) must equal the single-process ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import rslora_jax as rl
from rslora_jax import data
from rslora_jax import finetune as ft
from rslora_jax.hf import load_pretrained, save_pretrained
from rslora_jax.models.llama import LlamaConfig, init_params
from tests._asserts import assert_close

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # one deadline for all processes started together: a hang guard (busy 2-core
# machines take minutes to start and compile 5 processes at once), not a speed check
STEPS, CHECKPOINT = 6, 3
LR = 5e-2
MESH = "fsdp=2,model=2"


# ------------------------------------------------------------------------------------------
# Launching processes


def _free_ports(n: int) -> list[int]:
    """`n` different free ports (all held open while choosing, so no two are the same)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",  # compiles several times faster
        "TOKENIZERS_PARALLELISM": "false",
    }


def _commands(job: SimpleNamespace, port: int) -> list[list[str]]:
    """One command line per process of `job` (``job.processes`` > 1: a distributed launch)."""
    base = [sys.executable, "-m", "rslora_jax.finetune", *job.args]
    if job.processes == 1:
        return [[*base, "--cpu-devices", str(job.devices)]]
    return [
        [
            *base,
            *job.per_process.get(i, []),
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(job.processes),
            "--process-id",
            str(i),
            "--cpu-devices",
            str(job.devices),
        ]
        for i in range(job.processes)
    ]


def _run(
    jobs: dict[str, SimpleNamespace],
    logs: Path,
    attempts: int = 2,
    during: Callable[[dict, float], None] | None = None,
) -> None:
    """Starts every process of every job at once and waits for all (one deadline).

    Sets ``job.status`` (exit codes) and ``job.output`` (stdout + stderr per process). A job
    whose processes do not exit with ``job.expect`` fails the test with every process's
    output; a launch whose coordinator port was taken in the meantime is retried on new ports.
    `during` is called once all have started, with ``{job: [(process, log file)]}`` and the
    deadline.
    """
    for attempt in range(attempts):
        procs: list[tuple[str, int, subprocess.Popen, Path]] = []
        ports = _free_ports(len(jobs))
        try:
            for (name, job), port in zip(jobs.items(), ports):
                if attempt and job.fresh:
                    shutil.rmtree(job.out, ignore_errors=True)  # what the failed attempt left
                for i, cmd in enumerate(_commands(job, port)):
                    log = logs / f"{name}-{attempt}-{i}.log"
                    with open(log, "w") as f:
                        proc = subprocess.Popen(
                            cmd, cwd=logs, env=_env(), stdout=f, stderr=subprocess.STDOUT
                        )
                    procs.append((name, i, proc, log))
            deadline = time.monotonic() + TIMEOUT_S
            timed_out = False
            if during is not None:
                started: dict[str, list] = {}
                for name, _, proc, log in procs:
                    started.setdefault(name, []).append((proc, log))
                during(started, deadline)
            for _, _, proc, _ in procs:
                try:
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
        finally:
            for _, _, proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()  # SIGKILL: the JAX runtime catches SIGTERM
                    proc.wait()
        for job in jobs.values():
            job.status, job.output = [], []
        for name, _, proc, log in procs:
            jobs[name].status.append(proc.returncode)
            jobs[name].output.append(log.read_text(errors="replace"))
        failed = timed_out or any(job.status != job.expect for job in jobs.values())
        if not failed:
            return
        text = "\n".join(
            f"----- {name} process {i}: exit status {status}\n{out}"
            for name, job in jobs.items()
            for i, (status, out) in enumerate(zip(job.status, job.output))
        )
        if timed_out:
            text += f"\n[killed after the launch's {TIMEOUT_S} s timeout]"
        if "address already in use" not in text.lower() or attempt == attempts - 1:
            pytest.fail("fine-tuning processes failed:\n" + text, pytrace=False)


def _job(args: list[str], processes: int, devices: int, expect: int = 0, **per_process):
    out = Path(args[args.index("--out") + 1])
    return SimpleNamespace(
        out=out,
        fresh="--resume" not in args,
        args=args,
        processes=processes,
        devices=devices,
        expect=[expect] * processes,
        per_process={int(k[1:]): v for k, v in per_process.items()},  # p1=[...]
    )


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama (GQA, untied head) with the built-in tokenizer, and a text file."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig.tiny(vocab_size=2048, max_position_embeddings=64)  # the tokenizer's
    save_pretrained(directory, init_params(config, jax.random.key(0)), config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data.BUILTIN_TOKENIZER_DIR / name, directory / name)
    text = directory.parent / "corpus.txt"
    text.write_text(data.stdlib_finetune_text()[:12_000], encoding="utf-8")
    _, params = load_pretrained(directory)
    return SimpleNamespace(dir=directory, text=text, params=params)


def _args(base, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        "--model", str(base.dir),
        "--data", str(base.text),
        "--steps", str(steps),
        "--batch-size", "8",
        "--seq-len", "16",
        "--rank", "4",
        "--alpha", "8",
        "--lr", str(LR),
        "--schedule", "constant",
        "--warmup-steps", "1",
        "--eval-every", "3",
        "--eval-rows", "8",
        "--save-every", str(CHECKPOINT),
        "--mesh", MESH,
        "--no-progress",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


@pytest.fixture
def runs(base, tmp_path_factory):
    """``two``, ``one`` and ``rejected`` together, then ``resumed`` and ``interrupted``."""
    root = tmp_path_factory.mktemp("multiprocess_runs")
    names = ("two", "one", "rejected", "mismatched", "resumed", "interrupted")
    out = {name: root / name for name in names}
    t0 = time.monotonic()
    jobs = {
        "two": _job(_args(base, out["two"]), processes=2, devices=2),
        "one": _job(_args(base, out["one"]), processes=1, devices=4),
        "rejected": _job(
            _args(base, out["rejected"]),
            processes=2,
            devices=2,
            expect=ft.EXIT_USAGE,
            p1=["--data", str(root / "missing.txt")],
        ),
        "mismatched": _job(
            _args(base, out["mismatched"]),
            processes=2,
            devices=2,
            expect=ft.EXIT_USAGE,
            p1=["--rank", "8", "--seed", "1"],
        ),
    }
    _run(jobs, root)
    t1 = time.monotonic()
    # The run as a crash after step 3 would have left it: run.json and the step-3 checkpoint.
    out["resumed"].mkdir()
    shutil.copy(out["two"] / "run.json", out["resumed"] / "run.json")
    (out["resumed"] / "checkpoints").mkdir()
    shutil.copytree(
        out["two"] / "checkpoints" / str(CHECKPOINT),
        out["resumed"] / "checkpoints" / str(CHECKPOINT),
    )
    later = {
        # Only --resume and --out: the rest comes from run.json.
        "resumed": _job(
            ["--resume", "--out", str(out["resumed"]), "--no-progress"], processes=2, devices=2
        ),
        # Ctrl-C in process 1 only, once training runs; both must stop, save and exit 130.
        "interrupted": _job(
            _args(base, out["interrupted"], "--save-every", "0", "--eval-every", "0", steps=10**6),
            processes=2,
            devices=2,
            expect=ft.EXIT_INTERRUPTED,
        ),
    }
    _run(later, root, during=_interrupt_process_1)
    t2 = time.monotonic()
    print(
        f"\nlaunch times: {t1 - t0:.1f} s (two, one, rejected), {t2 - t1:.1f} s "
        "(resumed, interrupted)"
    )
    return SimpleNamespace(
        out=out,
        jobs={**jobs, **later},
        metrics={
            name: json.loads((out[name] / "metrics.json").read_text())
            for name in ("two", "one", "resumed")
        },
    )


def _interrupt_process_1(started: dict, deadline: float) -> None:
    """SIGINT to process 1 of the "interrupted" job once process 0 has logged a step."""
    (lead, lead_log), (other, _) = started["interrupted"]
    while time.monotonic() < deadline and lead.poll() is None and other.poll() is None:
        if "train loss at the first step" in lead_log.read_text(errors="replace"):
            other.send_signal(signal.SIGINT)
            return
        time.sleep(0.2)


def _adapters(directory: Path, params) -> dict[str, np.ndarray]:
    restored, _ = rl.load_adapters(directory, params)
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(rl.split(restored)[0])
    }


def _assert_trained_close(got: dict, want: dict, what: str) -> None:
    """Tensors trained by Adam in two runs that differ in rounding (one process and two): one
    relative error over all of them, of the order of lr. Adam turns a near-zero gradient's
    rounding into a whole lr-sized step in one entry, so they are not compared entry by entry;
    the losses, compared to 1e-5 at every step, check the numerics."""
    assert sorted(got) == sorted(want)
    assert_close(got, want, rel=LR, whole=True, what=what)


# The kernels of the merged export that the adapters changed (the rest is the base).
ADAPTED = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


def _assert_merged_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    trained = sorted(k for k in want if ADAPTED.search(k))
    assert len(trained) == 14  # 2 layers x 7 projections
    _assert_trained_close({k: got[k] for k in trained}, {k: want[k] for k in trained}, "merged")
    base = [k for k in want if k not in trained]
    assert_close({k: got[k] for k in base}, {k: want[k] for k in base}, rel=1e-6, what="base")


# ------------------------------------------------------------------------------------------
# Two processes compute what one process computes


def _check_two_processes_train_like_one(runs, base):
    two, one = runs.metrics["two"], runs.metrics["one"]
    assert two["devices"] == {"mesh": {"fsdp": 2, "model": 2}, "platform": "cpu", "processes": 2}
    assert one["devices"] == {"mesh": {"fsdp": 2, "model": 2}, "platform": "cpu", "processes": 1}
    assert len(two["train_losses"]) == STEPS
    np.testing.assert_allclose(two["train_losses"], one["train_losses"], rtol=1e-5)
    assert [e[0] for e in two["eval_losses"]] == [0, 3, 6]
    np.testing.assert_allclose(
        [e[1] for e in two["eval_losses"]], [e[1] for e in one["eval_losses"]], rtol=1e-5
    )
    assert two["eval_loss_after"] < two["eval_loss_before"]  # it trains
    got = _adapters(runs.out["two"] / "adapters", base.params)
    want = _adapters(runs.out["one"] / "adapters", base.params)
    assert max(np.abs(v).max() for k, v in want.items() if "lora_b" in k) > 1e-3  # B moved
    _assert_trained_close(got, want, "adapters")


def _check_exports_are_written_once_and_match_one_process(runs):
    two, one = runs.out["two"], runs.out["one"]
    _assert_trained_close(
        load_file(two / "peft" / "adapter_model.safetensors"),
        load_file(one / "peft" / "adapter_model.safetensors"),
        "PEFT export",
    )
    assert json.loads((two / "peft" / "adapter_config.json").read_text()) == json.loads(
        (one / "peft" / "adapter_config.json").read_text()
    )
    _assert_merged_close(
        load_file(two / "merged" / "model.safetensors"),
        load_file(one / "merged" / "model.safetensors"),
    )
    assert (two / "merged" / "tokenizer.json").is_file()
    assert (two / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ft._checkpoint_steps(two / "checkpoints") == [CHECKPOINT, STEPS]
    # Process 0 reports; process 1 trains silently.
    lead, other = runs.jobs["two"].output
    assert "done: 6 steps" in lead and "outputs in" in lead and "(cpu, 2 processes)" in lead
    assert "done:" not in other and "held-out loss" not in other
    # No temporary directories left behind by the processes' writes (tb: process 0's
    # TensorBoard events).
    assert sorted(p.name for p in two.iterdir()) == sorted(
        ["adapters", "checkpoints", "loss.png", "merged", "metrics.json", "peft", "run.json", "tb"]
    )


# ------------------------------------------------------------------------------------------
# Checkpoint on two processes, resume on two processes


def _check_resume_across_processes_matches_the_uninterrupted_run(runs, base):
    resumed, two = runs.metrics["resumed"], runs.metrics["two"]
    assert resumed["resumed_from_step"] == CHECKPOINT and resumed["devices"]["processes"] == 2
    assert f"resuming {runs.out['resumed']} at step {CHECKPOINT}" in runs.jobs["resumed"].output[0]
    np.testing.assert_allclose(resumed["train_losses"], two["train_losses"], rtol=1e-6)
    assert [e[0] for e in resumed["eval_losses"]] == [0, 3, 6]
    np.testing.assert_allclose(
        [e[1] for e in resumed["eval_losses"]], [e[1] for e in two["eval_losses"]], rtol=1e-6
    )
    # The same program on two processes from the restored state: nothing rounds differently
    # for Adam to amplify, so each tensor is compared on its own.
    assert_close(
        _adapters(runs.out["resumed"] / "adapters", base.params),
        _adapters(runs.out["two"] / "adapters", base.params),
        rel=1e-6,
        what="adapters",
    )
    assert_close(
        load_file(runs.out["resumed"] / "merged" / "model.safetensors"),
        load_file(runs.out["two"] / "merged" / "model.safetensors"),
        rel=1e-6,
        what="merged",
    )
    assert ft._checkpoint_steps(runs.out["resumed"] / "checkpoints") == [CHECKPOINT, STEPS]


def _check_ctrl_c_in_one_process_stops_all_after_the_same_step(runs):
    lead, other = runs.jobs["interrupted"].output
    steps = ft._checkpoint_steps(runs.out["interrupted"] / "checkpoints")
    assert len(steps) == 1 and 1 <= steps[0] < 10**6, steps  # the Ctrl-C checkpoint
    assert "Ctrl-C (process 1): all processes stop after the next step" in other
    assert f"interrupted at step {steps[0]} of {10**6}" in lead and "--resume" in lead
    assert "interrupted at step" not in other  # process 0 reports
    assert not (runs.out["interrupted"] / "metrics.json").exists()


def _check_input_rejected_by_one_process_stops_all(runs):
    lead, other = runs.jobs["rejected"].output
    assert runs.jobs["rejected"].status == [ft.EXIT_USAGE, ft.EXIT_USAGE]
    assert "rslora-finetune: error: process 1 of 2 rejected the input" in lead
    assert "rslora-finetune: error: --data: data file" in other and "does not exist" in other
    assert not (runs.out["rejected"] / "run.json").exists()


def _check_processes_with_different_settings_stop_before_loading(runs):
    lead, other = runs.jobs["mismatched"].output
    for text in (lead, other):
        assert "rslora-finetune: error: the processes of this run were started with different" in (
            text
        ), text
        assert "--rank: process(es) [1] differ from process 0" in text, text
        assert "--seed: process(es) [1] differ from process 0" in text, text
        assert "--alpha" not in text and "held-out loss" not in text
    assert "(this process differs)" in other
    assert not (runs.out["mismatched"] / "run.json").exists()


def test_fine_tuning_on_two_processes(runs, base):
    """All checks on the launches in one test, so that they run once however pytest-xdist
    spreads this module's tests over its workers."""
    _check_two_processes_train_like_one(runs, base)
    _check_exports_are_written_once_and_match_one_process(runs)
    _check_resume_across_processes_matches_the_uninterrupted_run(runs, base)
    _check_ctrl_c_in_one_process_stops_all_after_the_same_step(runs)
    _check_input_rejected_by_one_process_stops_all(runs)
    _check_processes_with_different_settings_stop_before_loading(runs)


def test_a_peer_that_never_connects_is_a_message_within_the_timeout(base, tmp_path):
    """Process 1 of 2 alone: the coordinator never answers; --connect-timeout 5 ends it."""
    port = _free_ports(1)[0]
    cmd = [
        sys.executable, "-m", "rslora_jax.finetune", *_args(base, tmp_path / "out"),
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
        "--cpu-devices", "2", "--connect-timeout", "5",
    ]  # fmt: skip
    t0 = time.monotonic()
    result = subprocess.run(
        cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    elapsed = time.monotonic() - t0
    assert result.returncode == ft.EXIT_USAGE, result.stderr[-3000:]
    assert "not every process joined the distributed runtime within --connect-timeout 5 s" in (
        result.stderr
    )
    assert "Check failure" not in result.stderr  # not JAX's abort
    assert elapsed < 120, elapsed  # the import and the 5 s, not JAX's 5 minutes


# ------------------------------------------------------------------------------------------
# Bad multi-process arguments: exit status 2 before JAX is touched


def _must_not_run(*args, **kwargs):
    raise AssertionError("the command went past validation")


BAD = {
    "incomplete": (["--coordinator", "127.0.0.1:1234"], "without --num-processes, --process-id"),
    "id range": (
        ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
        "--process-id 2 must be smaller than --num-processes 2",
    ),
    "address": (
        ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
        "expected HOST:PORT",
    ),
    "port": (
        ["--coordinator", "h:70000", "--num-processes", "2", "--process-id", "0"],
        "port in 1..65535",
    ),
    "batch": (
        ["--coordinator", "h:1", "--num-processes", "3", "--process-id", "0"],
        "--batch-size 8 is not divisible by --num-processes 3",
    ),
    "auto and explicit": (
        ["--distributed", "auto", "--process-id", "0"],
        "--distributed auto finds the coordinator, process count and index itself: drop "
        "--process-id",
    ),
    "bad auto value": (["--distributed", "slurm"], "invalid choice: 'slurm'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_distributed_arguments_stop_before_jax(base, tmp_path, capsys, monkeypatch, case):
    extra, message = BAD[case]
    monkeypatch.setattr(ft, "train", _must_not_run)
    monkeypatch.setattr(jax.distributed, "initialize", _must_not_run)
    monkeypatch.setattr(ft, "prepare", _must_not_run)
    out = tmp_path / "out"
    assert ft.main(_args(base, out) + extra) == ft.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("rslora-finetune: error: ") and message in err, err
    assert not out.exists()


def test_cpu_devices_after_jax_started_is_a_usage_error(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "train", _must_not_run)
    jax.devices()  # the test session's backend is running (tests/conftest.py)
    assert ft.main(_args(base, tmp_path / "out", "--cpu-devices", "4")) == ft.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--cpu-devices 4: jax_num_cpu_devices config should be updated before" in err, err
