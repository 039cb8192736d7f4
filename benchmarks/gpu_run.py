"""The whole GPU measurement of issue 19 in one command, sized for one short slot on one GPU.

Runs, on the TinyLlama-1.1B shape (bf16, batch 4 x 2048, all seven projections, AdamW):

1. the device's ceilings: a bf16 8192^3 matmul (TFLOP/s) and a device-to-device copy (GB/s);
2. ``bench_step.py`` configurations, each alone in its own process (exact peak memory), in
   priority order: the floor and the rsLoRA step at ranks 16 and 256 (``auto``, i.e. fused at this
   batch, and ``factored``), the remat variants, the merges (against a copy of the base and the
   product-then-add formula; `rslora_jax.nnx.merge` beside them), with a device profile (time by
   kernel category) of the floor and of every rank-16 step;
3. PEFT on PyTorch, eager and ``torch.compile``, ranks 16 and 256 (``bench_peft_torch.py``); the
   compiles are warmed up in the background at the start (inductor's caches), on other cores;
4. ``bench_fused.py``'s bf16 sweep of factored against fused per projection shape, to calibrate
   ``prefers_fused``;
5. extras while time remains (``lora-16-fused``, XLA's latency-hiding scheduler, merge at rank 32,
   full fine-tuning).

Every result is written to ``<out>/gpu_run.json`` as soon as it exists (a run cut short keeps what
it measured); at the end it prints the table of ratios against the issue's targets. Items that
would start after ``--budget-s`` seconds are skipped and listed.

    python benchmarks/gpu_run.py --out $OUT                    # one H100/H200, about 8 minutes
    python benchmarks/gpu_run.py --size tiny --dry-run         # CPU plumbing check, minutes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM
TARGETS = {
    "x_peft_eager_r16": 2.5,
    "x_peft_compile_r16": 1.6,
    "x_peft_eager_r256": 3.3,
    "step_over_floor_r16": 1.10,
    "step_over_floor_r256": 1.30,
    "floor_mfu": 0.50,
    "merge_over_copy": 2.0,
}


class Run:
    """The schedule's state: elapsed time, budget, results file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "gpu_run.json"
        self.data: dict[str, Any] = {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "size": args.size,
            "dry_run": args.dry_run,
            "budget_s": args.budget_s,
            "steps": [],
            "peft": [],
            "merges": [],
            "skipped": [],
        }
        self.cpus = os.cpu_count() or 1

    def elapsed(self) -> float:
        return time.time() - self.t0

    def save(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)

    def time_left(self, item: str, need_s: float = 0.0) -> bool:
        if self.elapsed() + need_s > self.args.budget_s:
            self.data["skipped"].append(item)
            self.log(f"skipped (budget): {item}")
            self.save()
            return False
        return True


def _cores(run: Run, part: str) -> list[str]:
    """``taskset`` prefix: the timed runs get the first half of the cores, background compiles
    the second half (where there are at least 4 and taskset exists)."""
    if run.cpus < 4 or not shutil.which("taskset"):
        return []
    half = run.cpus // 2
    cores = range(half) if part == "timed" else range(half, run.cpus)
    return ["taskset", "-c", ",".join(str(c) for c in cores)]


def _env(run: Run, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # JAX must leave room for the background PEFT compiles on the same GPU.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.55")
    env.update(extra)
    return env


def _size_args(run: Run) -> list[str]:
    a = ["--size", run.args.size]
    if run.args.dry_run:
        a += ["--steps", "3", "--warmup", "1"]
    return a


# ------------------------------------------------------------------------------- items
def ceilings(run: Run) -> None:
    """bf16 matmul rate and copy bandwidth of device 0, through JAX."""
    code = r"""
import json, time, jax, jax.numpy as jnp
n = int(__import__("sys").argv[1])
dev = jax.devices()[0]
def best(f, *a, reps=10):
    jax.block_until_ready(f(*a)); ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts) // 2]
k = jax.random.split(jax.random.key(0), 2)
a = jax.random.normal(k[0], (n, n), jnp.bfloat16); b = jax.random.normal(k[1], (n, n), jnp.bfloat16)
mm = jax.jit(lambda a, b: a @ b)
t = best(mm, a, b)
x = jax.random.normal(k[0], (n * 64, n // 4), jnp.bfloat16)  # n=8192: 1 GiB
cp = jax.jit(lambda x: x + jnp.asarray(1, x.dtype))
tc = best(cp, x)
print("RESULT " + json.dumps({"device": dev.device_kind, "platform": dev.platform,
    "matmul_n": n, "bf16_matmul_tflops": 2 * n**3 / t / 1e12,
    "copy_gbytes_per_s": 2 * x.nbytes / tc / 1e9, "copy_gib": x.nbytes / 2**30}))
"""
    n = "512" if run.args.dry_run else "8192"
    rec = _python(run, ["-c", code, n], timeout=180)
    run.data["ceilings"] = rec
    run.save()
    run.log(f"ceilings: {rec}")


def _python(run: Run, argv: list[str], timeout: float, env=None, prefix=None) -> dict[str, Any]:
    cmd = [*(prefix or []), sys.executable, *argv]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(run)
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s: {' '.join(argv)[:200]}"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr or proc.stdout)[-3000:], "returncode": proc.returncode}


def step_config(run: Run, name: str, profile: bool = False) -> dict[str, Any] | None:
    """One bench_step.py configuration alone in its process."""
    if not run.time_left(name, need_s=15):
        return None
    argv = [str(HERE / "bench_step.py"), "--only", name, *_size_args(run)]
    if profile:
        argv.append("--profile")
    extra = {}
    if "lhs" in name.split("-"):
        extra["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_latency_hiding_scheduler=true"
        ).strip()
    t = time.time()
    rec = _python(run, argv, timeout=300, env=_env(run, **extra), prefix=_cores(run, "timed"))
    rec.setdefault("config", name)
    rec["process_s"] = time.time() - t
    (run.data["merges"] if name.startswith("merge") else run.data["steps"]).append(rec)
    run.save()
    if "error" in rec:
        run.log(f"{name}: ERROR {rec['error'][-300:]}")
    elif name.startswith("merge"):
        run.log(
            f"{name}: {rec['ms']:.2f} ms, merge/copy {rec['merge_over_copy']:.2f} "
            f"(ref {rec['ref_over_copy']:.2f}), nnx {rec.get('nnx_ms') or float('nan'):.2f} ms ({rec['process_s']:.0f} s)"
        )
    else:
        run.log(
            f"{name}: {rec['ms']:.2f} ms/step, peak {rec.get('peak_gib', float('nan')):.2f} GiB "
            f"(compile {rec.get('compile_s', 0):.0f} s, process {rec['process_s']:.0f} s)"
        )
    return rec


def peft_warmup(run: Run) -> subprocess.Popen | None:
    """Background: torch.compile of both ranks once (fills inductor's caches), other cores."""
    if run.args.skip_peft:
        return None
    ranks = ",".join(str(r) for r in run.args.ranks)
    script = (
        f"for r in {ranks.replace(',', ' ')}; do "
        f"{sys.executable} {HERE / 'bench_peft_torch.py'} --size {run.args.size} --rank $r "
        "--variants compile --steps 1 --warmup 1; done"
    )
    log = open(run.out / "peft_warmup.log", "w")
    env = _env(run, TORCHINDUCTOR_COMPILE_THREADS=str(max(1, run.cpus // 2)))
    run.log("PEFT compile warm-up started in the background")
    return subprocess.Popen(
        [*_cores(run, "background"), "bash", "-c", script], stdout=log, stderr=log, env=env
    )


def peft_timed(run: Run, rank: int, variant: str) -> None:
    name = f"peft-{variant}-{rank}"
    if not run.time_left(name, need_s=20 if variant == "eager" else 45):
        return
    path = run.out / f"peft_{variant}_{rank}.json"
    argv = [
        str(HERE / "bench_peft_torch.py"),
        "--size",
        run.args.size,
        "--rank",
        str(rank),
        "--variants",
        variant,
        "--json",
        str(path),
    ]
    if variant == "eager" and rank == min(run.args.ranks):
        argv.append("--merge")
    if run.args.dry_run:
        argv += ["--steps", "3", "--warmup", "1"]
    if run.args.size == "tiny":  # tiny runs on the CPU: one thread, as in the interleaved bench
        argv += ["--threads", "1"]
    t = time.time()
    try:
        subprocess.run(
            [*_cores(run, "timed"), sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=400,
            env=_env(run),
        )
        rows = json.loads(path.read_text())["results"]
    except (subprocess.TimeoutExpired, OSError, ValueError) as err:
        rows = [{"variant": variant, "rank": rank, "status": "error", "error": str(err)}]
    for r in rows:
        r["process_s"] = time.time() - t
    run.data["peft"].extend(rows)
    run.save()
    for r in rows:
        run.log(
            f"{name}: {r.get('ms_per_step_median')} ms/step, warm-up {r.get('warmup_s')} s "
            f"({r['process_s']:.0f} s) {r.get('status')}"
        )


def fused_sweep(run: Run) -> None:
    if not run.time_left("bench_fused sweep", need_s=30):
        return
    size = "tiny" if run.args.size == "tiny" else "tinyllama"
    shapes = [(256, 688), (688, 256)] if size == "tiny" else [(2048, 5632), (2048, 2048)]
    tokens = "64,256,1024" if run.args.dry_run else "128,512,1024,2048,4096,8192"
    rows = []
    for d_in, d_out in shapes:
        path = run.out / f"fused_{d_in}x{d_out}.json"
        argv = [
            str(HERE / "bench_fused.py"),
            "--no-pin",
            "--dtype",
            "float32" if size == "tiny" else "bfloat16",
            "--d-in",
            str(d_in),
            "--d-out",
            str(d_out),
            "--tokens",
            tokens,
            "--json",
            str(path),
        ]
        if run.args.dry_run:
            argv += ["--rounds", "2", "--steps", "2"]
        subprocess.run(
            [*_cores(run, "timed"), sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=240,
            env=_env(run),
        )
        try:
            rows += json.loads(path.read_text())["results"]
        except (OSError, ValueError) as err:
            rows.append({"d_in": d_in, "d_out": d_out, "error": str(err)})
    run.data["fused_sweep"] = rows
    run.save()
    run.log(f"bench_fused sweep: {len(rows)} rows")


# ------------------------------------------------------------------------------- report
def _matmul_params(size: str) -> tuple[int, dict[str, int]]:
    from bench_step import SIZES

    m = SIZES[size]["model"]
    d, f, layers = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
    hd = d // m["num_attention_heads"]
    kv = m["num_key_value_heads"] * hd
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    return layers * per_layer + d * m["vocab_size"], m


def floor_flops(size: str, batch: int, seq: int) -> float:
    """Model FLOPs of the floor: forward + backward through the activations of every matmul
    (4 x matmul params x tokens) plus causal attention (QK^T and PV forward, four products
    backward: 6 x B x heads x T^2 x head_dim, the causal half)."""
    params, m = _matmul_params(size)
    tokens = batch * seq
    hd = m["hidden_size"] // m["num_attention_heads"]
    attn = 6 * batch * m["num_attention_heads"] * seq * seq * hd * m["num_hidden_layers"]
    return 4.0 * params * tokens + attn


def report(run: Run) -> str:
    d = run.data
    steps = {r["config"]: r for r in d["steps"] if "ms" in r}
    peft: dict[tuple[int, str], float] = {}
    for r in d["peft"]:
        if r.get("status") == "ok" and r.get("method") == "rslora":
            peft[(r["rank"], r["variant"])] = r["ms_per_step_median"]
    lines = [
        f"{'config':26} {'ms/step':>9} {'tokens/s':>10} {'peak GiB':>9} {'/floor':>7} "
        f"{'x PEFT eager':>12} {'x PEFT comp.':>12}"
    ]

    def floor_for(name: str) -> dict[str, Any] | None:
        keep = [p for p in name.split("-") if p in ("remat", "rematfull", "lhs")]
        return steps.get("-".join(["floor", *keep])) or steps.get("floor")

    summary: dict[str, Any] = {}
    for name, r in steps.items():
        fl = floor_for(name)
        ratio = r["ms"] / fl["ms"] if fl else float("nan")
        e = c = "-"
        if name.startswith("lora"):
            rank = int(name.split("-")[1])
            if (rank, "eager") in peft:
                e = f"{peft[(rank, 'eager')] / r['ms']:.2f}x"
            if (rank, "compile") in peft:
                c = f"{peft[(rank, 'compile')] / r['ms']:.2f}x"
        lines.append(
            f"{name:26} {r['ms']:9.2f} {r['tokens_per_s']:10.0f} "
            f"{r.get('peak_gib', float('nan')):9.2f} {ratio:7.3f} {e:>12} {c:>12}"
        )
    for (rank, variant), ms in sorted(peft.items()):
        tokens = next(iter(steps.values()))["tokens_per_step"] if steps else float("nan")
        lines.append(f"{f'PEFT {variant} r={rank}':26} {ms:9.2f} {tokens / ms * 1e3:10.0f}")
    for m in d["merges"]:
        if "ms" in m:
            lines.append(
                f"{m['config']:26} {m['ms']:9.2f} ms: merge/copy {m['merge_over_copy']:.2f}, "
                f"product-then-add {m['ref_over_copy']:.2f}, copy {m['copy_ms']:.2f} ms, "
                f"nnx.merge {m.get('nnx_ms') or float('nan'):.2f} ms"
            )
    # Targets: the best configuration of ours per rank.
    for rank in run.args.ranks:
        mine = [r for n, r in steps.items() if n.startswith(f"lora-{rank}-")]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["ms"])
        fl = floor_for(best["config"])
        summary[f"best_r{rank}"] = best["config"]
        if fl:
            summary[f"step_over_floor_r{rank}"] = best["ms"] / fl["ms"]
        for variant in ("eager", "compile"):
            if (rank, variant) in peft:
                summary[f"x_peft_{variant}_r{rank}"] = peft[(rank, variant)] / best["ms"]
    ceil = d.get("ceilings") or {}
    if "floor" in steps:
        b = steps["floor"]
        flops = floor_flops(run.args.size, b["tokens_per_step"] // _seq(run), _seq(run))
        achieved = flops / (b["ms"] / 1e3) / 1e12
        summary["floor_tflops"] = achieved
        kind = str(ceil.get("device", ""))
        sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in kind), None)
        if sheet:
            summary["floor_mfu"] = achieved / sheet
        if ceil.get("bf16_matmul_tflops"):
            summary["floor_over_measured_matmul_rate"] = achieved / ceil["bf16_matmul_tflops"]
    merges = sorted(
        (m for m in d["merges"] if "merge_over_copy" in m), key=lambda m: m["config"] != "merge-16"
    )
    if merges:  # the target is about rank 16
        summary["merge_over_copy"] = merges[0]["merge_over_copy"]
        summary["merge_config"] = merges[0]["config"]
    sweep = d.get("fused_sweep") or []
    disagree = [
        (r["d_in"], r["d_out"], r["tokens"])
        for r in sweep
        if "faster" in r and r["faster"] != r["rule_picks"]
    ]
    if sweep:
        summary["prefers_fused_disagrees_at"] = disagree
    d["summary"] = summary
    lines.append("")
    lines.append(f"{'target':28} {'measured':>10} {'goal':>8}")
    for key, goal in TARGETS.items():
        got = summary.get(key)
        ok = ""
        if got is not None:
            ok = (
                "met"
                if (got >= goal if key.startswith(("x_", "floor_mfu")) else got <= goal)
                else "MISSED"
            )
        shown = "-" if got is None else f"{got:.3f}"
        lines.append(f"{key:28} {shown:>10} {goal:>8} {ok}")
    if sweep:
        lines.append("")
        lines.append("bench_fused: fused / factored time per projection (rule's pick)")
        for r in sweep:
            if "fused_over_factored" in r:
                lines.append(
                    f"  {r['d_in']} x {r['d_out']}, {r['tokens']:6d} tokens: "
                    f"{r['fused_over_factored']:.3f} ({r['rule_picks']})"
                )
        lines.append(
            f"prefers_fused disagrees with the faster form at (d_in, d_out, tokens): {disagree}"
        )
    for name, r in steps.items():
        prof = r.get("profile") or {}
        if "ms_per_step_by_category" in prof:
            cats = ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(prof["ms_per_step_by_category"].items())
            )
            lines.append(f"profile {name}: device {prof['device_ms_per_step']:.1f} ms/step: {cats}")
    if d["skipped"]:
        lines.append(f"skipped for the budget: {d['skipped']}")
    return "\n".join(lines)


def _seq(run: Run) -> int:
    from bench_step import SIZES

    return SIZES[run.args.size]["seq"]


# ------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tinyllama", "tiny"], default="tinyllama")
    p.add_argument("--out", default=str(HERE / "results" / "gpu_run"), help="results folder")
    p.add_argument("--budget-s", type=float, default=480, help="no item starts after this")
    p.add_argument("--dry-run", action="store_true", help="few steps per item (plumbing check)")
    p.add_argument("--skip-peft", action="store_true")
    args = p.parse_args(argv)
    args.ranks = [16, 256] if args.size == "tinyllama" else [16, 64]
    run = Run(args)
    run.log(f"gpu_run: size {args.size}, budget {args.budget_s:.0f} s, out {run.out}")
    try:
        run.data["nvidia_smi"] = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        run.data["nvidia_smi"] = None
    ceilings(run)  # first, alone on the device
    warm = peft_warmup(run)
    r_lo, r_hi = args.ranks
    for name in ("floor", f"lora-{r_lo}-auto", f"lora-{r_lo}-factored"):
        step_config(run, name, profile=True)
    for name in (f"lora-{r_hi}-auto", f"lora-{r_hi}-factored"):
        step_config(run, name)
    step_config(run, "floor-remat", profile=True)
    step_config(run, f"lora-{r_lo}-auto-remat", profile=True)
    step_config(run, f"lora-{r_hi}-auto-remat")
    step_config(run, f"lora-{r_lo}-auto-rematfull")
    for r in args.ranks:
        step_config(run, f"merge-{r}")
    if warm is not None:
        if warm.poll() is None:
            run.log("waiting for the PEFT compile warm-up")
        try:
            warm.wait(timeout=max(10.0, args.budget_s - run.elapsed()))
        except subprocess.TimeoutExpired:
            warm.kill()
        run.data["peft_warmup_rc"] = warm.returncode
        for rank in args.ranks:
            for variant in ("eager", "compile"):
                peft_timed(run, rank, variant)
    fused_sweep(run)
    for name in (f"lora-{r_lo}-fused", "floor-lhs", f"lora-{r_lo}-auto-lhs", "merge-32", "full"):
        step_config(run, name)
    table = report(run)
    run.save()
    print(table)
    print(f"wrote {run.path} ({run.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
