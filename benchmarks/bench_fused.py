"""Per-layer crossover of the factored and fused adapter forward (`rslora_jax.fused`).

For one adapted projection ``(d_in, d_out)`` at rank r, times the jitted forward plus backward
(gradients w.r.t. the input and both factors, as in training) of

- ``factored``: ``x @ W + gamma * (x @ A) @ B`` differentiated by JAX;
- ``fused``: ``x @ (W + gamma * A @ B)`` with the low-rank custom VJP (`fused.merged_matmul`);

for a range of token counts T, side by side in one run, and prints the median times, their
ratio, and the crossover against the cost rule ``lora(mode="auto")`` uses (fused once
``T >= d_in * d_out / (d_in + d_out)``, see `rslora_jax.forward`).

    python benchmarks/bench_fused.py                          # CPU, float32, about a minute
    python benchmarks/bench_fused.py --dtype bfloat16 --d-in 2048 --d-out 5632 \\
        --tokens 64,256,1024,4096,16384                       # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _median_ms(fn, args, steps: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(d_in: int, d_out: int, rank: int, tokens: int, dtype: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from rslora_jax.lowrank import lowrank

    from rslora_jax.fused import merged_matmul

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

        return jax.jit(run)

    out = {"d_in": d_in, "d_out": d_out, "rank": rank, "tokens": tokens, "dtype": dtype}
    # Interleaved twice so that drift on a shared machine hits both alike.
    runs: dict[str, list[float]] = {"factored": [], "fused": []}
    fns = {"factored": grads(factored), "fused": grads(fused)}
    for _ in range(2):
        for name, fn in fns.items():
            runs[name].append(_median_ms(fn, (x, a, b, dy), steps))
    out.update({f"{n}_ms": min(v) for n, v in runs.items()})
    out["fused_over_factored"] = out["fused_ms"] / out["factored_ms"]
    out["rule_picks"] = "fused" if tokens * (d_in + d_out) >= d_in * d_out else "factored"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-out", type=int, default=1376)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    import jax

    tokens = args.tokens or [16, 64, 256, 1024, 4096]
    rows = []
    print(f"{'tokens':>7} {'factored ms':>12} {'fused ms':>9} {'fused/factored':>15} {'rule':>9}")
    for t in tokens:
        r = measure(args.d_in, args.d_out, args.rank, t, args.dtype, args.steps)
        rows.append(r)
        print(
            f"{t:7d} {r['factored_ms']:12.3f} {r['fused_ms']:9.3f} "
            f"{r['fused_over_factored']:15.3f} {r['rule_picks']:>9}",
            flush=True,
        )
    if args.json:
        meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
        Path(args.json).write_text(json.dumps({**meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
