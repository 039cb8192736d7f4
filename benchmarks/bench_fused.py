"""Per-layer crossover of the factored and fused adapter forward (`rslora_jax.execution.fused`).

For one adapted projection ``(d_in, d_out)`` at rank r, times the jitted forward plus backward
(gradients w.r.t. the input and both factors, as in training) of

- ``factored``: ``x @ W + gamma * (x @ A) @ B`` differentiated by JAX;
- ``fused``: ``x @ (W + gamma * A @ B)`` with the low-rank custom VJP (`merged_matmul`);

for a range of token counts T, interleaved in rounds in one process, and prints the median times,
their ratio, and the crossover against the cost rule ``lora(mode="auto")`` uses
(`rslora_jax.execution.fused.prefers_fused`).

On a CPU the process pins itself to one core with one thread (``benchmarks/_harness.py``) and
compares CPU time per call, which holds on a busy machine; on a GPU it compares wall time after
synchronising.

    python benchmarks/bench_fused.py                          # CPU, float32, about a minute
    python benchmarks/bench_fused.py --dtype bfloat16 --d-in 2048 --d-out 5632 \\
        --tokens 64,256,1024,4096,16384                       # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _harness  # noqa: E402


def measure(
    d_in: int, d_out: int, rank: int, tokens: int, dtype: str, rounds: int, steps: int
) -> dict:
    """Times factored and fused forward + backward at one token count; returns a row."""
    import jax
    import jax.numpy as jnp

    from rslora_jax.execution.fused import merged_matmul, prefers_fused
    from rslora_jax.execution.lowrank import lowrank

    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (tokens, d_in), dtype)
    w = (jax.random.normal(k[1], (d_in, d_out)) / d_in**0.5).astype(dtype)
    a = jax.random.normal(k[2], (d_in, rank), jnp.float32) / d_in**0.5
    b = jax.random.normal(k[3], (rank, d_out), jnp.float32) * 0.01
    dy = jax.random.normal(k[4], (tokens, d_out), dtype)
    scale = 16.0 / rank**0.5

    def factored(x, a, b):
        return jnp.matmul(x, w) + lowrank(x, a, b, scale, dtype)

    def fused(x, a, b):
        return merged_matmul(x, [w], [(a, b)], [scale], dtype)[0]

    def grads(f):
        def run(x, a, b, dy):
            _, vjp = jax.vjp(f, x, a, b)
            return vjp(dy)

        fn = jax.jit(run)
        jax.block_until_ready(fn(x, a, b, dy))  # compile

        def call() -> None:
            jax.block_until_ready(fn(x, a, b, dy))

        return call

    on_gpu = jax.devices()[0].platform == "gpu"
    key = "wall_ms" if on_gpu else "cpu_ms"
    calls = {"factored": grads(factored), "fused": grads(fused)}
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in calls}
    for r in range(rounds):  # interleaved: drift on a shared machine hits both alike
        for name in list(calls)[r % 2 :] + list(calls)[: r % 2]:
            calls[name]()  # one untimed call after the switch
            samples[name].extend(_harness.timed(calls[name]) for _ in range(steps))
    out = {"d_in": d_in, "d_out": d_out, "rank": rank, "tokens": tokens, "dtype": dtype}
    for name, s in samples.items():
        summary = _harness.summarise(s)
        out[f"{name}_ms"] = summary[key]
        out[f"{name}_wall_ms"] = summary["wall_ms"]
        out[f"{name}_cpu_ms"] = summary["cpu_ms"]
    out["timing"] = key
    out["fused_over_factored"] = out["fused_ms"] / out["factored_ms"]
    out["rule_picks"] = "fused" if prefers_fused(tokens, d_in, d_out) else "factored"
    out["faster"] = "fused" if out["fused_over_factored"] < 1 else "factored"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-out", type=int, default=1376)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=5, help="timed calls per system per round")
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="CPU: do not pin to one core with one thread (not recommended on shared machines)",
    )
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    if args.pin:
        # Before JAX loads: one thread of compute. Pinned below, once JAX made its threads.
        os.environ.update(_harness.single_thread_env())
    import jax

    on_gpu = jax.devices()[0].platform == "gpu"
    core = None
    if args.pin and not on_gpu:
        core = _harness.pick_core()
        if core is not None and not _harness.pin_threads(core):
            core = None
    load_before = _harness.load_average()
    tokens = args.tokens or [16, 64, 256, 1024, 4096]
    rows = []
    what = "wall" if on_gpu else f"CPU (pinned to core {core})"
    print(f"median {what} ms per forward + backward, {args.rounds} interleaved rounds")
    print(f"{'tokens':>7} {'factored ms':>12} {'fused ms':>9} {'fused/factored':>15} {'rule':>9}")
    for t in tokens:
        r = measure(args.d_in, args.d_out, args.rank, t, args.dtype, args.rounds, args.steps)
        rows.append(r)
        print(
            f"{t:7d} {r['factored_ms']:12.3f} {r['fused_ms']:9.3f} "
            f"{r['fused_over_factored']:15.3f} {r['rule_picks']:>9}",
            flush=True,
        )
    wrong = [r["tokens"] for r in rows if r["rule_picks"] != r["faster"]]
    print(f"rule agrees with the faster one except at tokens {wrong}" if wrong else "rule agrees")
    print(f"load average before {load_before}, after {_harness.load_average()}")
    if args.json:
        meta = {
            "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__,
            "pinned_core": core,
            "load_average_before": load_before,
            "load_average_after": _harness.load_average(),
            "machine": _harness.machine(),
        }
        Path(args.json).write_text(json.dumps({**meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
