"""Training-step benchmark of rslora_jax on a Llama-family model (issue 5, JAX half).

Measured side by side, in one run, on the same model shape, batch and dtype:

- ``floor``: the frozen model's forward plus the backward pass through the activations, with no
  weight gradients (differentiated w.r.t. the input embedding table only, whose gradient is a cheap
  scatter): no LoRA step can be cheaper;
- ``lora``: the rsLoRA training step (factored forward, or ``-fused``: merged forward with
  low-rank gradients, `rslora_jax.fused`; gradients w.r.t. the adapters only, AdamW
  update), all seven linear layers of every block adapted, at each rank, optionally with remat;
- ``full``: full fine-tuning (every parameter, AdamW), for scale;
- ``merge``: folding all adapters into the kernels (jit, donated base), next to the time to read and
  write the base weights once (a donated copy of every leaf), which bounds it from below;
- PEFT on PyTorch (eager and ``torch.compile``), through ``bench_peft_torch.py``, when torch and
  peft import (``--peft``), or from a JSON written earlier (``--peft-json``).

Each configuration runs in its own subprocess on a GPU, so the device's ``peak_bytes_in_use`` is
that configuration's peak. On CPU it also reports XLA's own estimate (arguments + outputs +
temporaries of the compiled step). Prints a table with tokens/s, ms/step, peak memory and the
ratios ours/PEFT and ours/floor, and writes a JSON.

    python benchmarks/bench_step.py --size tiny                       # CPU, ~2 minutes
    python benchmarks/bench_step.py --size tinyllama --peft           # one H100/H200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

GIB = float(1 << 30)
ALPHA = 16.0
LR = 1e-4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SIZES: dict[str, dict[str, Any]] = {
    # Same shapes as bench_peft_torch.py's sizes.
    "tiny": {
        "model": dict(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
        ),
        "batch": 2,
        "seq": 128,
        "dtype": "float32",
        "ranks": [16],
        "steps": 10,
        "warmup": 3,
    },
    "tinyllama": {
        "model": dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
        "batch": 4,
        "seq": 2048,
        "dtype": "bfloat16",
        "ranks": [16, 256],
        "steps": 20,
        "warmup": 5,
    },
}


# ------------------------------------------------------------------------------- one config
def _setup(args: argparse.Namespace, remat: bool):
    import jax
    import jax.numpy as jnp

    from rslora_jax.models.llama import LlamaConfig, init_params

    size = SIZES[args.size]
    on_gpu = jax.devices()[0].platform == "gpu"
    cfg = LlamaConfig(
        **size["model"],
        dtype=args.dtype,
        param_dtype=args.dtype,
        # --compile-only unrolls the layers: XLA's cost analysis counts a scan body once.
        scan_layers=not args.compile_only,
        remat=remat,
        attention_impl="cudnn" if on_gpu and args.attention == "auto" else None,
    )
    if args.attention not in ("auto", "xla"):
        cfg = cfg.replace(attention_impl=args.attention)
    if args.compile_only:  # shapes only: nothing is allocated
        params = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
        return cfg, params, jax.ShapeDtypeStruct((args.batch, args.seq + 1), jnp.int32)
    params = init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, cfg.vocab_size)
    return cfg, params, ids.astype(jnp.int32)


def _lora_config(rank: int, adapter_dtype: str, scanned: bool = True):
    import rslora_jax as rl

    return rl.LoraConfig(
        rank=rank,
        alpha=ALPHA,
        targets=list(TARGETS),
        kernel_axes={"model/layers/.*": "lio"} if scanned else None,
        dtype=adapter_dtype,
    )


def _time(fn, state, steps: int, warmup: int):
    import jax

    t0 = time.perf_counter()
    state = fn(*state)
    jax.block_until_ready(state)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        state = fn(*state)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state = fn(*state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return state, first, times


def _memory(compiled) -> dict[str, Any]:
    import jax

    out: dict[str, Any] = {}
    try:
        ma = compiled.memory_analysis()
        est = (
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes
        )
        out["xla_estimate_gib"] = est / GIB
        out["temp_gib"] = ma.temp_size_in_bytes / GIB
    except Exception:
        pass
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_gib"] = stats["peak_bytes_in_use"] / GIB
    return out


def run_one(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Runs configuration `name` ("floor", "full", "lora-16", "lora-16-fused", "lora-16-remat",
    "merge-16")."""
    import jax
    import jax.numpy as jnp
    import optax

    import rslora_jax as rl
    from rslora_jax.models.llama import LlamaForCausalLM, causal_lm_loss

    parts = name.split("-")
    kind = parts[0]
    remat = "remat" in parts
    if "generic" in parts:
        # Ablation: no model-native fused adapters, one interception per projection.
        from rslora_jax import native

        native.NativeLoRA.claim = lambda self, path, holder: False
    cfg, params, ids = _setup(args, remat or "rematfull" in parts)
    if "rematfull" in parts:
        # Recompute each layer entirely in the backward pass: the least memory.
        cfg = cfg.replace(remat_policy="nothing_saveable")
    model = LlamaForCausalLM(cfg)
    tokens = args.batch * args.seq
    rec: dict[str, Any] = {"config": name, "tokens_per_step": tokens}

    def loss_of(apply, p, ids):
        logits = apply({"params": p}, ids[:, :-1])
        return causal_lm_loss(logits, ids[:, 1:])

    if kind == "floor":
        embed = params["model"]["embed_tokens"]["embedding"]
        rest = {
            **params,
            "model": {k: v for k, v in params["model"].items() if k != "embed_tokens"},
        }

        def step(embed, rest, ids):
            def f(e):
                p = {**rest, "model": {**rest["model"], "embed_tokens": {"embedding": e}}}
                return loss_of(model.apply, p, ids)

            _value, g = jax.value_and_grad(f)(embed)
            return embed - g.astype(embed.dtype) * jnp.asarray(0.0, embed.dtype), rest, ids

        fn = jax.jit(step, donate_argnums=0)
        compiled = fn.lower(embed, rest, ids).compile()
        state = (embed, rest, ids)
    elif kind == "full":
        opt = optax.adamw(LR)
        opt_state = jax.eval_shape(opt.init, params) if args.compile_only else opt.init(params)

        def step(p, s, ids):
            _value, g = jax.value_and_grad(lambda p: loss_of(model.apply, p, ids))(p)
            upd, s = opt.update(g, s, p)
            return optax.apply_updates(p, upd), s, ids

        fn = jax.jit(step, donate_argnums=(0, 1))
        compiled = fn.lower(params, opt_state, ids).compile()
        state = (params, opt_state, ids)
    elif kind in ("lora", "merge"):
        rank = int(parts[1])
        # "...-bf16ad": adapters stored in bf16 (no per-step casts; the default is float32).
        adapter_dtype = "bfloat16" if "bf16ad" in parts else args.adapter_dtype
        lcfg = _lora_config(rank, adapter_dtype, scanned=cfg.scan_layers)
        adapters = rl.init_adapters(params, lcfg, jax.random.key(2))
        if kind == "merge":
            if args.compile_only:
                return {**rec, "error": "merge is not measured with --compile-only"}
            return _run_merge(args, rec, params, adapters, lcfg)
        opt = rl.optimizer(optax.adamw(LR))
        opt_state = jax.eval_shape(opt.init, adapters) if args.compile_only else opt.init(adapters)
        # "...-fused": merged forward with low-rank gradients (rslora_jax.fused) per projection.
        apply = rl.lora(model.apply, lcfg, mode="fused" if "fused" in parts else args.mode)

        def step(ad, s, base, ids):
            _value, g = jax.value_and_grad(lambda a: loss_of(apply, rl.combine(a, base), ids))(ad)
            upd, s = opt.update(g, s, ad)
            return optax.apply_updates(ad, upd), s, base, ids

        fn = jax.jit(step, donate_argnums=(0, 1))
        compiled = fn.lower(adapters, opt_state, params, ids).compile()
        state = (adapters, opt_state, params, ids)
        rec["adapter_params"] = rl.num_adapter_params(adapters)
    else:
        raise ValueError(f"unknown configuration {name!r}")
    if args.compile_only:
        rec.update(_memory(compiled))
        rec.update(_cost(compiled))
        return rec
    state, first, times = _time(compiled, state, args.steps, args.warmup)
    med = statistics.median(times)
    rec.update(
        ms=med * 1e3,
        ms_min=min(times) * 1e3,
        ms_max=max(times) * 1e3,
        tokens_per_s=tokens / med,
        first_call_s=first,
    )
    rec.update(_memory(compiled))
    rec.update(_cost(compiled))
    if args.profile:
        rec["profile"] = _profile(compiled, state, steps=3)
    return rec


_KERNEL_KINDS = (
    # (category, substrings of device kernel names), first match wins.
    ("attention (cuDNN)", ("cudnn", "flash", "fmha", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "dot")),
    ("fusion / elementwise", ("fusion", "loop", "reduce", "convert", "transpose", "copy")),
)


def _profile(compiled, state, steps: int) -> dict[str, Any]:
    """Device time per step by kernel category, from a jax.profiler trace of `steps` steps."""
    import glob
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                state = compiled(*state)
            jax.block_until_ready(state)
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not files:
            return {"error": "no trace written"}
        data = jax.profiler.ProfileData.from_file(files[0])
    per_kernel: dict[str, float] = {}
    seen = []
    for plane in data.planes:
        seen.append(plane.name + ": " + ", ".join(line.name for line in plane.lines))
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # Kernel launches on the device streams; skip the derived "XLA Ops"/module lines.
            if "Stream" not in line.name:
                continue
            for event in line.events:
                per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.duration_ns
    if not per_kernel:
        return {"error": "no GPU kernels in the trace", "planes": seen[:10]}
    cats: dict[str, float] = {}
    for name, ns in per_kernel.items():
        low = name.lower()
        cat = next((c for c, keys in _KERNEL_KINDS if any(k in low for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ns / steps / 1e6
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "ms_per_step_by_category": cats,
        "device_ms_per_step": sum(cats.values()),
        "top_kernels_ms_per_step": {k[:120]: v / steps / 1e6 for k, v in top},
    }


def _cost(compiled) -> dict[str, Any]:
    """XLA's static cost model of the compiled step: FLOPs and bytes moved through memory."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return {"xla_tflop": cost["flops"] / 1e12, "xla_gbytes": cost["bytes accessed"] / 1e9}
    except Exception:
        return {}


def _run_merge(args, rec, params, adapters, lcfg) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    import rslora_jax as rl

    # Non-zero B so the merge does real work.
    adapters = jax.tree.map(lambda x: x + jnp.asarray(0.01, x.dtype), adapters)

    def merge(base, ad):
        return rl.merge(rl.combine(ad, base), lcfg), ad

    def copy(base, ad):
        # Read and write every base leaf once. The addend comes from the (zero) adapters at
        # run time, so XLA cannot fold the copy away as it would `x * 1`.
        zero = jax.tree.leaves(ad)[0].ravel()[0] * 0
        return jax.tree.map(lambda x: x + zero.astype(x.dtype), base), ad

    out = {}
    for label, f in (("merge", merge), ("copy", copy)):
        fn = jax.jit(f, donate_argnums=0)
        compiled = fn.lower(params, adapters).compile()
        ad = adapters if label == "merge" else jax.tree.map(jnp.zeros_like, adapters)
        state = (jax.tree.map(jnp.copy, params), ad)
        _, _first, times = _time(compiled, state, args.steps, args.warmup)
        out[label] = statistics.median(times) * 1e3
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    rec.update(
        ms=out["merge"],
        copy_ms=out["copy"],
        merge_over_copy=out["merge"] / out["copy"],
        base_gib=base_bytes / GIB,
    )
    return rec


# ------------------------------------------------------------------------------- driver
def configs(args: argparse.Namespace) -> list[str]:
    if args.configs:
        return args.configs
    names = ["floor"]
    for r in args.ranks:
        names += [f"lora-{r}", f"lora-{r}-fused"]
    if args.remat:
        names.append("floor-remat")
        for r in args.ranks:
            names += [f"lora-{r}-remat", f"lora-{r}-fused-remat"]
    if args.full:
        names.append("full")
    if not args.compile_only:
        names += [f"merge-{r}" for r in args.ranks]
    return names


def _subprocess(args: argparse.Namespace, name: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--only", name, *args.passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"config": name, "error": (proc.stderr or proc.stdout)[-2000:]}


def _peft_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.peft_json:
        return json.loads(Path(args.peft_json).read_text())["results"]
    if not args.peft:
        return []
    try:
        import bench_peft_torch as bpt
    except ImportError as err:
        return [{"method": "peft", "status": "error", "error": str(err)}]
    # The same batch, sequence length and dtype as ours (they may be overridden on the command line).
    peft_args = bpt.make_args(
        size=args.size,
        ranks=list(args.ranks),
        batch=args.batch,
        seq=args.seq,
        dtype={"float32": "f32", "bfloat16": "bf16"}.get(args.dtype, args.dtype),
        full_finetune=False,
    )
    return bpt.run(peft_args, log=None)["results"]


def _peft_ms(rows, rank, variant):
    for r in rows:
        if (
            r.get("method") in ("lora", "rslora", "peft")
            and r.get("rank") == rank
            and r.get("variant") == variant
            and r.get("status", "ok") == "ok"
            and r.get("adapter_dtype", "f32") in ("f32", "float32")
        ):
            return r.get("ms_per_step_median")
    return None


def table(results: list[dict[str, Any]], peft_rows: list[dict[str, Any]]) -> str:
    by = {r["config"]: r for r in results}
    lines = [
        f"{'config':18} {'ms/step':>9} {'tokens/s':>10} {'peak GiB':>9} {'/floor':>7} "
        f"{'x PEFT eager':>12} {'x PEFT compile':>14}"
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['config']:18} ERROR {r['error'][-200:]!r}")
            continue
        if "ms" not in r:  # --compile-only: XLA's static estimates
            floor = by.get(
                "-".join(["floor", *[p for p in r["config"].split("-") if "remat" in p]])
            )
            extra = ""
            if floor and r is not floor and "xla_gbytes" in floor:
                extra = f"  (+{r['xla_gbytes'] - floor['xla_gbytes']:.4g} GB over the floor)"
            lines.append(
                f"{r['config']:18} XLA: {r.get('xla_tflop', float('nan')):.4g} TFLOP, "
                f"{r.get('xla_gbytes', float('nan')):.4g} GB accessed, "
                f"{r.get('xla_estimate_gib', float('nan')):.4g} GiB{extra}"
            )
            continue
        if r["config"].startswith("merge"):
            lines.append(
                f"{r['config']:18} {r['ms']:9.2f}   merge/copy {r['merge_over_copy']:.2f} "
                f"(copy of the {r['base_gib']:.2f} GiB base: {r['copy_ms']:.2f} ms)"
            )
            continue
        remat = [p for p in r["config"].split("-") if p in ("remat", "rematfull")]
        floor = by.get("-".join(["floor", *remat]))
        ratio = r["ms"] / floor["ms"] if floor and "ms" in floor else float("nan")
        peak = r.get("peak_gib", r.get("xla_estimate_gib", float("nan")))
        eager = compiled = ""
        if r["config"].startswith("lora"):
            rank = int(r["config"].split("-")[1])
            e, c = _peft_ms(peft_rows, rank, "eager"), _peft_ms(peft_rows, rank, "compile")
            eager = f"{e / r['ms']:.2f}x" if e else "-"
            compiled = f"{c / r['ms']:.2f}x" if c else "-"
        lines.append(
            f"{r['config']:18} {r['ms']:9.2f} {r['tokens_per_s']:10.0f} {peak:9.2f} "
            f"{ratio:7.3f} {eager:>12} {compiled:>14}"
        )
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--dtype", default=None)
    p.add_argument("--adapter-dtype", default="float32")
    p.add_argument(
        "--mode",
        default="factored",
        choices=["factored", "fused", "merged", "auto"],
        help="forward of the lora-R configs (lora-R-fused ones always use 'fused')",
    )
    p.add_argument("--attention", default="auto", help="auto (cudnn on GPU), xla, cudnn")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--remat", action="store_true", help="also measure per-layer remat")
    p.add_argument("--full", action="store_true", help="also measure full fine-tuning")
    p.add_argument("--peft", action="store_true", help="run bench_peft_torch.py in this run")
    p.add_argument("--peft-json", help="PEFT results written earlier by bench_peft_torch.py")
    p.add_argument(
        "--isolate",
        choices=["auto", "yes", "no"],
        default="auto",
        help="one subprocess per configuration (default on GPU: exact peak memory)",
    )
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument(
        "--profile", action="store_true", help="GPU: device time by kernel category (jax.profiler)"
    )
    p.add_argument(
        "--configs",
        type=lambda s: s.split(","),
        help="explicit list, e.g. floor,lora-16,lora-16-remat,full,merge-16",
    )
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="compile each configuration from shapes alone (layers unrolled) and report XLA's "
        "static estimates (FLOPs, bytes accessed, memory) without running: any model size on CPU",
    )
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    raw = list(argv if argv is not None else sys.argv[1:])
    size = SIZES[args.size]
    for key in ("batch", "seq", "dtype", "ranks", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, size[key])
    drop = {"--only", "--json", "--peft-json", "--configs"}
    args.passthrough = []
    skip = False
    for item in raw:
        if skip:
            skip = False
            continue
        if item in drop:
            skip = True
            continue
        if item.split("=")[0] in drop or item == "--peft":
            continue
        args.passthrough.append(item)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.only:
        print("RESULT " + json.dumps(run_one(args, args.only)), flush=True)
        return 0
    import jax

    on_gpu = jax.devices()[0].platform == "gpu"
    isolate = args.isolate == "yes" or (args.isolate == "auto" and on_gpu)
    t0 = time.time()
    peft_rows = _peft_rows(args)
    results = []
    for name in configs(args):
        rec = _subprocess(args, name) if isolate else run_one(args, name)
        results.append(rec)
        print(json.dumps(rec), flush=True)
    out = {
        "size": args.size,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "adapter_dtype": args.adapter_dtype,
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "results": results,
        "peft": peft_rows,
        "wall_s": time.time() - t0,
    }
    print(table(results, peft_rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
