"""Benchmark harness shared by the scripts in this folder: timings that hold on a busy machine.

A CPU shared with other jobs makes wall-clock step times meaningless (a process waits for a core
as long as it likes) and multi-threaded libraries worse (two threads on an overloaded core). So,
on CPU, every measured system runs in its own worker process that

- runs one thread of compute (`SINGLE_THREAD_ENV`: XLA's and torch's intra-op pools, OpenMP,
  MKL, OpenBLAS, inductor's compile workers; set in its environment, before JAX or torch loads)
  and, once set up (the set-ups run side by side on every core), pins all its threads to one core
  (`os.sched_setaffinity` per thread; the same core for every worker);
- after its set-up (build, compile, warm-up) waits for the coordinator, which asks each worker in
  turn for a few steps, round after round, rotating the order (`interleave`): drift in the
  machine's load hits every system alike;
- records each step's CPU time (`time.process_time`, user + system, all threads of the process)
  beside its wall time, and the involuntary context switches (`resource.getrusage`) that show
  how often it was pre-empted.

The summary reports medians of CPU and wall ms per step, their ratio (near 1 on an idle core),
and the machine's load average before and after. Ratios of CPU medians are what to compare.

Worker side::

    from _harness import serve
    serve(step, info={"config": "floor"})  # step() runs one step and waits for its result

Coordinator side::

    from _harness import Worker, interleave, summarise
    workers = {name: Worker([sys.executable, script, "--serve", name]) for name in names}
    samples = interleave(workers, rounds=5, steps=3)
    rows = {name: summarise(s) for name, s in samples.items()}
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# One thread of compute per process. XLA's CPU client: no Eigen pool for intra-op work, one
# intra-op thread; torch: OpenMP/MKL pools of one (torch.set_num_threads(1) is also called by
# the torch workers); inductor compiles in-process.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "TORCHINDUCTOR_COMPILE_THREADS": "1",
}
XLA_SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
PIN_ENV = "BENCH_PIN_CORE"  # set for a worker: the core `serve` pins it to after its set-up


def pick_core() -> int | None:
    """The core the workers share: ``$BENCH_CORE``, else the last one this process may use."""
    if "BENCH_CORE" in os.environ:
        return int(os.environ["BENCH_CORE"])
    try:
        return max(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def single_thread_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with `SINGLE_THREAD_ENV` and XLA's one-thread flags."""
    env = dict(os.environ if base is None else base)
    env.update(SINGLE_THREAD_ENV)
    flags = env.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        env["XLA_FLAGS"] = (flags + " " + XLA_SINGLE_THREAD_FLAGS).strip()
    return env


def pin_threads(core: int) -> bool:
    """Pins every thread of this process (and so the threads they start later) to ``core``.

    Workers call this (through `serve`) after their set-up, which may use every core; XLA's and
    torch's pools already exist then, so each thread is pinned by its id. Returns whether it
    worked.
    """
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    try:
        for tid in tids:
            try:
                os.sched_setaffinity(tid, {core})
            except ProcessLookupError:  # a thread that just ended
                pass
    except (AttributeError, OSError):
        return False
    return True


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine() -> dict[str, Any]:
    """What the timings depend on: CPU model and count, the affinity, the load right now."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
    }
    try:
        info["affinity"] = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def timed(step: Callable[[], Any]) -> dict[str, float]:
    """Runs ``step()`` once; returns its wall and CPU ms and the context switches it suffered."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, w0 = time.process_time(), time.perf_counter()
    step()
    w1, c1 = time.perf_counter(), time.process_time()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_ms": (w1 - w0) * 1e3,
        "cpu_ms": (c1 - c0) * 1e3,
        "nivcsw": float(r1.ru_nivcsw - r0.ru_nivcsw),
    }


def peak_rss_gib() -> float | None:
    """This process's peak resident set size (VmHWM), GiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / float(1 << 30)
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------- worker side
def serve(step: Callable[[], Any], info: Mapping[str, Any] | None = None) -> None:
    """Worker loop: announce ``READY <info>``, then answer ``RUN n`` with ``STEPS <samples>``.

    ``step()`` must run one step to completion (block on its result). The loop ends on ``QUIT``
    or end of input. Protocol lines go to the real stdout; anything else printed is moved to
    stderr so that it cannot break the protocol.
    """
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    ready = dict(info or {})
    ready.setdefault("pid", os.getpid())
    ready["peak_rss_gib_setup"] = peak_rss_gib()
    if os.environ.get(PIN_ENV):
        core = int(os.environ[PIN_ENV])
        ready["pinned_to"] = core if pin_threads(core) else None
    out.write("READY " + json.dumps(ready) + "\n")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "QUIT":
            break
        if cmd[0] == "RUN":
            samples = [timed(step) for _ in range(int(cmd[1]))]
            out.write("STEPS " + json.dumps(samples) + "\n")
        else:
            out.write("ERROR " + json.dumps(f"unknown command {line.strip()!r}") + "\n")
    out.flush()


# ------------------------------------------------------------------------------- coordinator
class WorkerError(RuntimeError):
    """A worker died or answered out of protocol; the message holds its stderr's tail."""


class Worker:
    """One measured system in its own process (pinned and single-threaded on CPU).

    Args:
        cmd: the command that ends in `serve`.
        pin: pin to `pick_core()` and set the one-thread environment (CPU timings).
        env: extra environment variables.
        core: the core to pin to (default `pick_core()`).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        pin: bool = True,
        env: Mapping[str, str] | None = None,
        core: int | None = None,
    ) -> None:
        full_env = single_thread_env() if pin else dict(os.environ)
        full_env.update(env or {})
        core = pick_core() if core is None else core
        if pin and core is not None:
            full_env[PIN_ENV] = str(core)  # `serve` pins the worker once it is set up
        self.cmd = list(cmd)
        self.core = core if pin else None
        self._err = tempfile.TemporaryFile("w+")  # the worker's stderr, for errors
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=full_env,
        )
        self.info: dict[str, Any] | None = None

    def _read(self, tag: str) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])
            if line.startswith("ERROR "):
                raise WorkerError(json.loads(line[6:]))
        raise WorkerError(f"{' '.join(self.cmd)!r} ended: {self.stderr_tail()}")

    def ready(self) -> dict[str, Any]:
        """Waits for the worker's set-up; returns its ``READY`` info."""
        if self.info is None:
            self.info = self._read("READY")
        return self.info

    def run(self, steps: int) -> list[dict[str, float]]:
        """Asks for ``steps`` steps; returns one sample per step (see `timed`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"RUN {steps}\n")
        self.proc.stdin.flush()
        return self._read("STEPS")

    def stderr_tail(self, chars: int = 3000) -> str:
        self._err.flush()
        self._err.seek(0)
        return self._err.read()[-chars:]

    def close(self) -> None:
        """Asks the worker to quit (kills it after 30 s) and closes its pipes."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("QUIT\n")
                self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._err.close()


def start_all(
    workers: Mapping[str, Worker], log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Waits for every worker's set-up (they set up concurrently); returns ``{name: info or
    {"error": ...}}`` and closes the ones that failed."""
    infos: dict[str, Any] = {}
    for name, w in workers.items():
        try:
            infos[name] = w.ready()
            if log:
                log(f"ready: {name} ({json.dumps(infos[name])[:200]})")
        except WorkerError as err:
            infos[name] = {"worker_error": str(err)[-2000:]}
            if log:
                log(f"FAILED: {name}: {str(err)[-400:]}")
            w.close()
    return infos


def interleave(
    workers: Mapping[str, Worker],
    rounds: int,
    steps: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """``rounds`` rounds; in each, every worker runs ``steps`` steps, one worker at a time, the
    order rotated by one each round. Returns every step's sample per worker."""
    names = list(workers)
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order:
            samples[name].extend(workers[name].run(steps))
        if log:
            cpu = {n: round(statistics.median(s["cpu_ms"] for s in samples[n]), 1) for n in names}
            log(f"round {r + 1}/{rounds}: median CPU ms so far {cpu}; load {load_average()}")
    return samples


def summarise(samples: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Medians (and quartiles of CPU time) of per-step samples."""
    cpu = sorted(s["cpu_ms"] for s in samples)
    wall = sorted(s["wall_ms"] for s in samples)
    q = statistics.quantiles(cpu, n=4) if len(cpu) > 1 else [cpu[0]] * 3
    return {
        "steps": len(cpu),
        "cpu_ms": statistics.median(cpu),
        "cpu_ms_q1": q[0],
        "cpu_ms_q3": q[2],
        "cpu_ms_min": cpu[0],
        "wall_ms": statistics.median(wall),
        "wall_over_cpu": statistics.median(wall) / max(statistics.median(cpu), 1e-9),
        "nivcsw_per_step": statistics.fmean(s.get("nivcsw", 0.0) for s in samples),
    }


def ratio_table(
    rows: Mapping[str, Mapping[str, Any]],
    refs: Sequence[str],
    key: str = "cpu_ms",
) -> str:
    """Text table: per row its ``key`` median, wall median, and ``key`` ratios to each ref row."""
    present = [r for r in refs if r in rows and key in rows[r]]
    width = max([len(n) for n in rows] + [6])
    head = f"{'system':{width}} {'CPU ms':>9} {'(q1-q3)':>15} {'wall ms':>9} {'wall/CPU':>8}"
    head += "".join(f" {'/' + r:>14}" for r in present)
    lines = [head]
    for name, row in rows.items():
        if key not in row:
            err = row.get("worker_error") or row.get("error") or ""
            lines.append(f"{name:{width}} ERROR {str(err)[-150:]!r}")
            continue
        line = (
            f"{name:{width}} {row[key]:9.1f} {row['cpu_ms_q1']:7.1f}-{row['cpu_ms_q3']:<7.1f} "
            f"{row['wall_ms']:9.1f} {row['wall_over_cpu']:8.2f}"
        )
        line += "".join(f" {row[key] / rows[r][key]:14.3f}" for r in present)
        lines.append(line)
    return "\n".join(lines)


__all__ = [
    "PIN_ENV",
    "SINGLE_THREAD_ENV",
    "XLA_SINGLE_THREAD_FLAGS",
    "Worker",
    "WorkerError",
    "interleave",
    "load_average",
    "machine",
    "peak_rss_gib",
    "pick_core",
    "pin_threads",
    "ratio_table",
    "serve",
    "single_thread_env",
    "start_all",
    "summarise",
    "timed",
]
