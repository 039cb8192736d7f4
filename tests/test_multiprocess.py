"""Two CPU processes under jax.distributed: FSDP-sharded training, checkpoint, restart, resume.

Each launch starts two fresh worker processes (tests/_multiprocess_worker.py) that form one
JAX runtime on localhost (gloo collectives, 2 CPU devices each, a global (2, 2) mesh). The
first launch trains 3 steps and saves with `rslora_jax.CheckpointManager`; the second restores
and trains 3 more. The reference is the same global program run straight for 6 steps in this
process, on 4 of the 8 fake CPU devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import _multiprocess_worker as W
from tests._asserts import assert_close

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # a hang guard, not a speed check: busy 2-core machines are slow to compile


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(phase: str, directory: Path, port: int, n: int) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "XLA_FLAGS": "",  # the workers set their own device count
        "JAX_PLATFORMS": "cpu",
    }
    args = [f"--phase={phase}", f"--port={port}", f"--num-processes={n}", f"--dir={directory}"]
    return [
        subprocess.Popen(
            [sys.executable, str(Path(W.__file__)), *args, f"--process-id={i}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]


def _launch(phase: str, directory: Path, n: int = 2, attempts: int = 2) -> None:
    """Starts `n` worker processes together and waits for all (one deadline for the launch);
    on failure shows every worker's output. Retries on a new port if the coordinator's was
    taken in the meantime."""
    for attempt in range(attempts):
        procs = _start(phase, directory, _free_port(), n)
        deadline = time.monotonic() + TIMEOUT_S
        outputs, failed = [], False
        for i, proc in enumerate(procs):
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()  # SIGKILL: the JAX runtime catches SIGTERM
                out, _ = proc.communicate()
                out += f"\n[killed after the launch's {TIMEOUT_S} s timeout]"
                failed = True
            failed = failed or proc.returncode != 0
            outputs.append(f"----- worker {i} ({phase}), exit code {proc.returncode}\n{out}")
        if not failed:
            return
        text = "\n".join(outputs)
        if "address already in use" not in text.lower() or attempt == attempts - 1:
            pytest.fail("multi-process workers failed:\n" + text, pytrace=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multiprocess")
    _launch("train", directory)
    _launch("resume", directory)
    first = dict(np.load(directory / "first.npz"))
    resumed = dict(np.load(directory / "resumed.npz"))
    info = {
        (phase, i): json.loads((directory / f"{phase}-info-{i}.json").read_text())
        for phase in ("first", "resumed")
        for i in range(2)
    }
    return first, resumed, info, directory


@pytest.fixture(scope="module")
def reference():
    """The same global computation in one process on a (2, 2) mesh of 4 local devices."""
    mesh = W.make_mesh(jax.devices()[:4])
    with jax.numpy_dtype_promotion("standard"):  # optax Adam (see test_optim)
        run = W.Run(mesh)
        losses = run.train(0, W.FIRST_STEPS)
        at_checkpoint = run.gathered_adapters()
        losses += run.train(W.FIRST_STEPS, W.TOTAL_STEPS)
    return np.asarray(losses), at_checkpoint, run.gathered_adapters()


def test_processes_form_one_runtime_with_per_process_data(runs):
    _, _, info, _ = runs
    for phase in ("first", "resumed"):
        a, b = info[(phase, 0)], info[(phase, 1)]
        assert a["process_count"] == b["process_count"] == 2
        assert a["global_devices"] == 4 and a["local_devices"] == 2
        # Each process built only its half of the global batch.
        assert a["rows"] == [0, W.GLOBAL_BATCH // 2] and b["rows"] == [W.GLOBAL_BATCH // 2, 8]
        # The base is FSDP-sharded across both processes: each holds 2 of 4 row blocks.
        assert not a["kernel_fully_addressable"]
        block = W.D_IN // 4
        assert a["kernel_local_shards"] == [[[block, W.HIDDEN], 0], [[block, W.HIDDEN], block]]
        assert b["kernel_local_shards"] == [
            [[block, W.HIDDEN], 2 * block],
            [[block, W.HIDDEN], 3 * block],
        ]
    assert info[("resumed", 0)]["restored_step"] == W.FIRST_STEPS


@pytest.mark.loose_dtypes  # the in-process reference runs optax Adam
def test_multiprocess_training_and_resume_match_single_process(runs, reference):
    first, resumed, _, directory = runs
    want_losses, want_at_checkpoint, want_final = reference
    assert want_losses[-1] < want_losses[0]  # the run trains
    # Losses of the first launch (kept in the checkpoint) and of the resumed one.
    np.testing.assert_allclose(first["losses"], want_losses[: W.FIRST_STEPS], rtol=1e-5)
    np.testing.assert_allclose(resumed["losses"], want_losses, rtol=1e-5)
    assert sorted(want_final) == sorted(k for k in resumed if ":" not in k and k != "losses")
    # Adapters after Adam steps, two processes against one: one relative error over all of
    # them, of the order of lr (Adam turns a near-zero gradient's rounding into a whole
    # lr-sized step in one entry; the losses above check the numerics step by step).
    first_at_checkpoint = {path: first[path] for path in want_at_checkpoint}
    assert_close(first_at_checkpoint, want_at_checkpoint, rel=W.LR, whole=True, what="checkpoint")
    for path in want_at_checkpoint:
        # The restore returned exactly what the first launch saved.
        np.testing.assert_array_equal(resumed[f"restored:{path}"], first[path])
    final = {path: resumed[path] for path in want_final}
    assert_close(final, want_final, rel=W.LR, whole=True, what="final")
    # One checkpoint step on disk, written by both processes together.
    assert sorted(p.name for p in (directory / "run").iterdir()) == [str(W.FIRST_STEPS)]
