"""benchmarks/_harness.py: pinned single-thread workers, interleaved rounds, CPU time per step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402

# A worker whose step burns a fixed amount of CPU time (measured by the same clock).
WORKER = """
import sys, time
sys.path.insert(0, {bench!r})
import _harness

def step():
    t = time.process_time()
    while time.process_time() - t < {busy}:
        pass

print("set-up chatter on stdout")  # serve() moves it off the protocol
_harness.serve(step, {{"name": {name!r}}})
"""


def _worker(name: str, busy: float) -> _harness.Worker:
    code = WORKER.format(bench=str(BENCH), busy=busy, name=name)
    return _harness.Worker([sys.executable, "-c", code])


def test_interleaved_rounds_measure_cpu_time_per_step():
    workers = {"fast": _worker("fast", 0.004), "slow": _worker("slow", 0.012)}
    try:
        infos = _harness.start_all(workers)
        samples = _harness.interleave(workers, rounds=3, steps=2)
    finally:
        for w in workers.values():
            w.close()
    assert infos["fast"]["name"] == "fast" and infos["slow"]["pid"] != infos["fast"]["pid"]
    if _harness.pick_core() is not None:
        assert infos["fast"]["pinned_to"] == _harness.pick_core()
    assert {n: len(s) for n, s in samples.items()} == {"fast": 6, "slow": 6}
    rows = {n: _harness.summarise(s) for n, s in samples.items()}
    # CPU time does not depend on how busy the machine is: 12 ms of work against 4.
    assert 2.0 < rows["slow"]["cpu_ms"] / rows["fast"]["cpu_ms"] < 4.0
    assert rows["fast"]["wall_ms"] >= rows["fast"]["cpu_ms"] * 0.9
    table = _harness.ratio_table(rows, ["fast"])
    assert "/fast" in table.splitlines()[0] and len(table.splitlines()) == 3


def test_a_failing_worker_is_reported_with_its_stderr():
    bad = _harness.Worker(
        [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]
    )
    infos = _harness.start_all({"bad": bad})
    assert "boom" in infos["bad"]["worker_error"]
    table = _harness.ratio_table({"bad": infos["bad"]}, [])
    assert "ERROR" in table and "boom" in table


def test_single_thread_environment_keeps_existing_xla_flags():
    env = _harness.single_thread_env({"XLA_FLAGS": "--xla_dump_to=/tmp/x"})
    assert env["XLA_FLAGS"].startswith("--xla_dump_to=/tmp/x ")
    assert "intra_op_parallelism_threads=1" in env["XLA_FLAGS"]
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    again = _harness.single_thread_env(env)
    assert again["XLA_FLAGS"] == env["XLA_FLAGS"]  # not appended twice


@pytest.mark.parametrize("n", [1, 5])
def test_summarise_medians(n):
    samples = [{"cpu_ms": float(i), "wall_ms": 2.0 * i, "nivcsw": 0.0} for i in range(1, n + 1)]
    s = _harness.summarise(samples)
    assert s["steps"] == n and s["cpu_ms"] == (n + 1) / 2 and s["wall_over_cpu"] == 2.0
