"""Training-step benchmark of rslora_jax on a Llama-family model, against PEFT on PyTorch.

Measured side by side, in one run, on the same model shape, batch and dtype:

- ``floor``: the frozen model's forward plus the backward pass through the activations, with no
  weight gradients (differentiated w.r.t. the input embedding table only, whose gradient is a cheap
  scatter): no LoRA step can be cheaper;
- ``lora-R``: the rsLoRA training step (gradients w.r.t. the adapters only, AdamW), all seven
  linear layers of every block adapted, at rank R; ``-auto`` / ``-fused`` / ``-factored`` pick the
  forward (``lora(mode=...)``; plain ``lora-R`` uses ``--mode``);
- ``full``: full fine-tuning (every parameter, AdamW), for scale;
- ``merge-R``: folding all adapters into the kernels (jit, donated base), next to the time to read
  and write the base weights once (a donated copy of every leaf), which bounds it from below, the
  product-then-add formula merges used before (``ref``), and `rslora_jax.nnx.merge` of an NNX
  model with the same kernels;
- ``peft-eager-R`` / ``peft-compile-R``: PEFT on PyTorch through ``bench_peft_torch.py``.

Name suffixes: ``-remat`` (per-layer remat saving matmul outputs), ``-rematfull`` (remat saving
nothing), ``-generic`` (no model-native grouped adapters), ``-bf16ad`` (bf16 adapters), ``-xla`` /
``-blocked`` / ``-cudnn`` (attention implementation), ``-lhs`` (GPU: XLA's latency-hiding
scheduler).

On a CPU (default ``--interleave auto``) every system runs in its own worker process, pinned to one
core with one thread, and the coordinator interleaves them in rounds, recording CPU time per step
beside wall time (``benchmarks/_harness.py``): the medians of CPU time and their ratios hold on a
busy machine. On a GPU each configuration runs alone in its own process (exact peak memory).

    python benchmarks/bench_step.py --size tiny --peft                   # CPU, a few minutes
    python benchmarks/bench_step.py --size tiny --batch 4 --seq 512 --peft \\
        --configs floor,lora-16-auto,lora-16-fused,lora-16-factored      # CPU, 4 x 512
    python benchmarks/bench_step.py --size tinyllama --peft              # one H100/H200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _harness  # noqa: E402

GIB = float(1 << 30)
ALPHA = 16.0
LR = 1e-4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LHS_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"

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
def _attention_impl(args: argparse.Namespace, parts: list[str], on_gpu: bool) -> str | None:
    for impl in ("xla", "blocked", "cudnn"):
        if impl in parts:
            return impl
    if args.attention == "auto":
        return "cudnn" if on_gpu else None  # None: the library's choice ("blocked" on CPU)
    return args.attention


def _setup(args: argparse.Namespace, parts: list[str]):
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
        remat="remat" in parts or "rematfull" in parts,
        attention_impl=_attention_impl(args, parts, on_gpu),
    )
    if "rematfull" in parts:
        # Recompute each layer entirely in the backward pass: the least memory.
        cfg = cfg.replace(remat_policy="nothing_saveable")
    if args.compile_only or args.warm_cache:  # shapes only: nothing is allocated
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


def _mode(args: argparse.Namespace, parts: list[str]) -> str:
    for mode in ("auto", "fused", "factored"):
        if mode in parts:
            return mode
    return args.mode


def build(args: argparse.Namespace, name: str) -> tuple[Any, Any, dict[str, Any]]:
    """Compiles configuration ``name``; returns ``(compiled, state, record)``.

    ``state = compiled(*state)`` is one step. For ``merge-R`` (measured in `_run_merge`) and with
    ``--compile-only`` / ``--warm-cache`` the first two are None and the record is complete.

    Raises:
        ValueError: for an unknown configuration name.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import rslora_jax as rl
    from rslora_jax.models.llama import LlamaForCausalLM, causal_lm_loss

    parts = name.split("-")
    kind = parts[0]
    if kind not in ("floor", "full", "lora", "merge"):
        raise ValueError(f"unknown configuration {name!r}")
    if "generic" in parts:
        # Ablation: no model-native grouped adapters, one interception per projection.
        from rslora_jax.core import claim

        claim.Claims.claim = lambda self, path, holder: False
    cfg, params, ids = _setup(args, parts)
    model = LlamaForCausalLM(cfg)
    tokens = args.batch * args.seq
    rec: dict[str, Any] = {
        "config": name,
        "tokens_per_step": tokens,
        "attention_impl": cfg.attention_impl,
    }
    abstract = args.compile_only or args.warm_cache

    def loss_of(apply, p, ids):
        logits = apply({"params": p}, ids[:, :-1])
        return causal_lm_loss(logits, ids[:, 1:])

    t0 = time.perf_counter()
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
        state = (embed, rest, ids)
    elif kind == "full":
        opt = optax.adamw(LR)
        opt_state = jax.eval_shape(opt.init, params) if abstract else opt.init(params)

        def step(p, s, ids):
            _value, g = jax.value_and_grad(lambda p: loss_of(model.apply, p, ids))(p)
            upd, s = opt.update(g, s, p)
            return optax.apply_updates(p, upd), s, ids

        fn = jax.jit(step, donate_argnums=(0, 1))
        state = (params, opt_state, ids)
    else:
        rank = int(parts[1])
        # "...-bf16ad": adapters stored in bf16 (no per-step casts; the default is float32).
        adapter_dtype = "bfloat16" if "bf16ad" in parts else args.adapter_dtype
        lcfg = _lora_config(rank, adapter_dtype, scanned=cfg.scan_layers)
        if kind == "merge":
            if abstract:
                return None, None, {**rec, "error": "merge is measured at run time only"}
            adapters = rl.init_adapters(params, lcfg, jax.random.key(2))
            return None, None, _run_merge(args, rec, cfg, params, adapters, lcfg)
        init = lambda p: rl.init_adapters(p, lcfg, jax.random.key(2))  # noqa: E731
        adapters = jax.eval_shape(init, params) if abstract else init(params)
        opt = rl.optimizer(optax.adamw(LR))
        opt_state = jax.eval_shape(opt.init, adapters) if abstract else opt.init(adapters)
        mode = _mode(args, parts)
        rec["mode"] = mode
        apply = rl.lora(model.apply, lcfg, mode=mode)

        def step(ad, s, base, ids):
            _value, g = jax.value_and_grad(lambda a: loss_of(apply, rl.combine(a, base), ids))(ad)
            upd, s = opt.update(g, s, ad)
            return optax.apply_updates(ad, upd), s, base, ids

        fn = jax.jit(step, donate_argnums=(0, 1))
        state = (adapters, opt_state, params, ids)
        rec["adapter_params"] = rl.num_adapter_params(adapters)
    compiled = fn.lower(*state).compile()
    rec["compile_s"] = time.perf_counter() - t0
    rec.update(_memory(compiled))
    rec.update(_cost(compiled))
    if abstract:
        return None, None, rec
    return compiled, state, rec


def run_one(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Builds and times configuration ``name`` alone (steps back to back); returns its record."""
    compiled, state, rec = build(args, name)
    if compiled is None:
        return rec
    state, first, times = _time(compiled, state, args.steps, args.warmup)
    med = statistics.median(times)
    rec.update(
        ms=med * 1e3,
        ms_min=min(times) * 1e3,
        ms_max=max(times) * 1e3,
        tokens_per_s=rec["tokens_per_step"] / med,
        first_call_s=first,
    )
    rec.update(_memory(compiled))
    if args.profile:
        rec["profile"] = _profile(compiled, state, steps=3)
    return rec


def serve_one(args: argparse.Namespace, name: str) -> None:
    """Worker of the interleaved CPU mode: build, warm up, then answer the coordinator."""
    import jax

    if name.startswith("merge"):
        raise ValueError(f"{name}: merges are measured with --only, not served")
    compiled, state, rec = build(args, name)
    t0 = time.perf_counter()
    for _ in range(max(args.warmup, 1)):
        state = compiled(*state)
    jax.block_until_ready(state)
    rec["warmup_s"] = time.perf_counter() - t0
    box = [state]

    def step() -> None:
        box[0] = compiled(*box[0])
        jax.block_until_ready(box[0])

    _harness.serve(step, rec)


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


# ------------------------------------------------------------------------------- merge
def _nnx_twin(cfg, params, adapters, lcfg):
    """An NNX model whose `nnx.Linear` kernels and adapters are those of the linen tree (layers
    unstacked), for timing `rslora_jax.nnx.merge` on the same weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import rslora_jax as rl
    import rslora_jax.nnx as rln

    layers = params["model"]["layers"]
    ad_layers = adapters["model"]["layers"]
    blocks = []
    for i in range(cfg.num_hidden_layers):
        block = {}
        for group in ("self_attn", "mlp"):
            for proj, holder in layers[group].items():
                d_in, d_out = holder["kernel"].shape[1:]
                lin = nnx.Linear(
                    d_in,
                    d_out,
                    use_bias=False,
                    dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype,
                    rngs=nnx.Rngs(0),
                )
                lin.kernel[...] = holder["kernel"][i]
                block[proj] = lin
        blocks.append(nnx.Dict(block))
    model = nnx.List(blocks)
    ncfg = rl.LoraConfig(rank=lcfg.rank, alpha=lcfg.alpha, targets=list(TARGETS), dtype=lcfg.dtype)
    model = rln.add_adapters(model, ncfg, jax.random.key(3))
    for i, block in enumerate(model):
        for group in ("self_attn", "mlp"):
            for proj, holder in ad_layers[group].items():
                lin = block[proj]
                lin.lora_a[...] = jnp.asarray(holder["lora_a"][i], lin.lora_a[...].dtype)
                lin.lora_b[...] = jnp.asarray(holder["lora_b"][i], lin.lora_b[...].dtype)
    return model


def _run_merge(args, rec, cfg, params, adapters, lcfg) -> dict[str, Any]:
    """Times (interleaved, `args.rounds` rounds): `rslora_jax.merge`, a copy of the base, the
    product-then-add formula (``ref``: ``W + scale * (A @ B)`` with the float32 product written
    first) and `rslora_jax.nnx.merge` of the same weights; checks merge against ``ref``."""
    import jax
    import jax.numpy as jnp

    import rslora_jax as rl
    import rslora_jax.nnx as rln
    from rslora_jax.core.tree import KERNEL, is_adapter_key

    # Non-zero B so that the merge does real work.
    adapters = jax.tree.map(lambda x: x + jnp.asarray(0.01, x.dtype), adapters)
    scale = lcfg.alpha / lcfg.rank**0.5

    def merge(base, ad):
        return rl.merge(rl.combine(ad, base), lcfg), ad

    def ref(base, ad):
        def fold(holder):
            if "lora_a" not in holder:
                return {k: (fold(v) if isinstance(v, dict) else v) for k, v in holder.items()}
            ab = jnp.matmul(
                holder["lora_a"].astype(jnp.float32),
                holder["lora_b"].astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST,
            )
            w = holder[KERNEL]
            out = {k: v for k, v in holder.items() if not is_adapter_key(k)}
            out[KERNEL] = (w.astype(jnp.float32) + jnp.float32(scale) * ab).astype(w.dtype)
            return out

        return fold(rl.combine(ad, base)), ad

    def copy(base, ad):
        # Read and write every base leaf once. The addend comes from the adapters at run time, so
        # XLA cannot fold the copy away as it would `x * 1`.
        zero = jax.tree.leaves(ad)[0].ravel()[0] * 0
        return jax.tree.map(lambda x: x + zero.astype(x.dtype), base), ad

    fns = {}
    for label, f in (("merge", merge), ("copy", copy), ("ref", ref)):
        fns[label] = jax.jit(f, donate_argnums=0).lower(params, adapters).compile()
    # Check the merge against the written formula before timing it.
    got = fns["merge"](jax.tree.map(jnp.copy, params), adapters)[0]
    want = fns["ref"](jax.tree.map(jnp.copy, params), adapters)[0]
    errs = [
        float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel()))
        / max(float(jnp.linalg.norm(b.astype(jnp.float32).ravel())), 1e-30)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    ]
    rec["merge_vs_ref_rel_err"] = max(errs)
    del got, want

    states = {k: [jax.tree.map(jnp.copy, params)] for k in fns}

    def jitted(label):
        def run():
            out = fns[label](states[label][0], adapters)
            jax.block_until_ready(out)
            states[label][0] = out[0]

        return run

    steps = {label: jitted(label) for label in fns}
    try:
        twin = _nnx_twin(cfg, params, adapters, lcfg)
        jax.block_until_ready(jax.tree.leaves(rln.merge(twin)))  # compile

        def nnx_merge():
            jax.block_until_ready(jax.tree.leaves(rln.merge(twin)))

        steps["nnx"] = nnx_merge
    except Exception as err:  # recorded; the linen figures still count
        rec["nnx_error"] = f"{type(err).__name__}: {err}"[:500]
    for run in steps.values():  # warm-up
        run()
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in steps}
    rounds = max(args.rounds, 1)
    per_round = max(args.steps // rounds, 2)
    for r in range(rounds):
        names = list(steps)
        order = names[r % len(names) :] + names[: r % len(names)]
        for label in order:
            samples[label].extend(_harness.timed(steps[label]) for _ in range(per_round))
    summary = {k: _harness.summarise(v) for k, v in samples.items()}
    # On CPU compare CPU time (the process is pinned), on a GPU wall time.
    key = "wall_ms" if jax.devices()[0].platform == "gpu" else "cpu_ms"
    ms = {k: v[key] for k, v in summary.items()}
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    rec.update(
        timing=key,
        ms=ms["merge"],
        copy_ms=ms["copy"],
        ref_ms=ms["ref"],
        nnx_ms=ms.get("nnx"),
        merge_over_copy=ms["merge"] / ms["copy"],
        ref_over_copy=ms["ref"] / ms["copy"],
        nnx_over_copy=ms["nnx"] / ms["copy"] if "nnx" in ms else None,
        base_gib=base_bytes / GIB,
        merge_summary=summary,
    )
    return rec


# ------------------------------------------------------------------------------- driver
def configs(args: argparse.Namespace) -> list[str]:
    if args.configs:
        return args.configs
    names = ["floor"]
    for r in args.ranks:
        names += [f"lora-{r}-auto", f"lora-{r}-fused", f"lora-{r}-factored"]
    if args.remat:
        names.append("floor-remat")
        for r in args.ranks:
            names += [f"lora-{r}-auto-remat", f"lora-{r}-fused-remat"]
    if args.full:
        names.append("full")
    if not args.compile_only:
        names += [f"merge-{r}" for r in args.ranks]
    return names


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The command-line options a per-configuration subprocess inherits."""
    drop_valued = {"--only", "--serve", "--json", "--peft-json", "--configs"}
    drop_flags = {"--peft"}
    out, skip = [], False
    for item in args.raw_argv:
        if skip:
            skip = False
            continue
        key = item.split("=")[0]
        if key in drop_valued:
            skip = "=" not in item
            continue
        if key in drop_flags:
            continue
        out.append(item)
    return out


def _child_env(name: str) -> dict[str, str]:
    env = dict(os.environ)
    if "lhs" in name.split("-"):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + LHS_FLAGS).strip()
    return env


def _subprocess(args: argparse.Namespace, name: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--only", name, *_child_argv(args)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, env=_child_env(name)
        )
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"timed out after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"config": name, "error": (proc.stderr or proc.stdout)[-2000:]}


def _peft_args(args: argparse.Namespace):
    import bench_peft_torch as bpt

    return bpt.make_args(
        size=args.size,
        ranks=list(args.ranks),
        batch=args.batch,
        seq=args.seq,
        dtype={"float32": "f32", "bfloat16": "bf16"}.get(args.dtype, args.dtype),
        full_finetune=False,
        threads=1,
    )


def _peft_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.peft_json:
        return json.loads(Path(args.peft_json).read_text())["results"]
    if not args.peft:
        return []
    try:
        import bench_peft_torch as bpt
    except ImportError as err:
        return [{"method": "peft", "status": "error", "error": str(err)}]
    return bpt.run(_peft_args(args), log=None)["results"]


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
    """The sequential (GPU) table: ms/step, tokens/s, peak memory, ratios to floor and PEFT."""
    by = {r["config"]: r for r in results}
    lines = [
        f"{'config':24} {'ms/step':>9} {'tokens/s':>10} {'peak GiB':>9} {'/floor':>7} "
        f"{'x PEFT eager':>12} {'x PEFT compile':>14}"
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['config']:24} ERROR {r['error'][-200:]!r}")
            continue
        if "ms" not in r:  # --compile-only: XLA's static estimates
            floor = by.get(_floor_of(r["config"]))
            extra = ""
            if floor and r is not floor and "xla_gbytes" in floor:
                extra = f"  (+{r['xla_gbytes'] - floor['xla_gbytes']:.4g} GB over the floor)"
            lines.append(
                f"{r['config']:24} XLA: {r.get('xla_tflop', float('nan')):.4g} TFLOP, "
                f"{r.get('xla_gbytes', float('nan')):.4g} GB accessed, "
                f"{r.get('xla_estimate_gib', float('nan')):.4g} GiB{extra}"
            )
            continue
        if r["config"].startswith("merge"):
            lines.append(_merge_line(r))
            continue
        floor = by.get(_floor_of(r["config"]))
        ratio = r["ms"] / floor["ms"] if floor and "ms" in floor else float("nan")
        peak = r.get("peak_gib", r.get("xla_estimate_gib", float("nan")))
        eager = compiled = ""
        if r["config"].startswith("lora"):
            rank = int(r["config"].split("-")[1])
            e, c = _peft_ms(peft_rows, rank, "eager"), _peft_ms(peft_rows, rank, "compile")
            eager = f"{e / r['ms']:.2f}x" if e else "-"
            compiled = f"{c / r['ms']:.2f}x" if c else "-"
        lines.append(
            f"{r['config']:24} {r['ms']:9.2f} {r['tokens_per_s']:10.0f} {peak:9.2f} "
            f"{ratio:7.3f} {eager:>12} {compiled:>14}"
        )
    return "\n".join(lines)


def _floor_of(config: str) -> str:
    parts = config.split("-")
    keep = [p for p in parts if p in ("remat", "rematfull", "xla", "blocked", "cudnn", "lhs")]
    return "-".join(["floor", *keep])


def _merge_line(r: dict[str, Any]) -> str:
    nnx = f", nnx.merge {r['nnx_ms']:.2f} ms" if r.get("nnx_ms") else ""
    return (
        f"{r['config']:24} {r['ms']:9.2f}   merge/copy {r['merge_over_copy']:.2f} "
        f"(copy of the {r['base_gib']:.3g} GiB base {r['copy_ms']:.2f} ms; product-then-add "
        f"{r['ref_ms']:.2f} ms = {r['ref_over_copy']:.2f}x{nnx}; {r['timing']})"
    )


# ------------------------------------------------------------------------------- interleaved CPU
def interleaved(args: argparse.Namespace, names: list[str], log=print) -> dict[str, Any]:
    """CPU mode: one pinned single-thread worker per system, interleaved rounds, CPU time."""
    step_names = [n for n in names if not n.startswith("merge")]
    merge_names = [n for n in names if n.startswith("merge")]
    child = _child_argv(args)
    workers: dict[str, _harness.Worker] = {}
    load_before = _harness.load_average()
    for name in step_names:
        if name.startswith("peft-"):
            _, variant, rank = name.split("-")
            cmd = [
                sys.executable,
                str(HERE / "bench_peft_torch.py"),
                "--serve",
                f"{variant}:{rank}",
                "--size",
                args.size,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--dtype",
                {"float32": "f32", "bfloat16": "bf16"}.get(args.dtype, args.dtype),
                "--warmup",
                str(args.warmup),
                "--threads",
                "1",
                "--device",
                "cpu",
            ]
        else:
            cmd = [sys.executable, __file__, "--serve", name, *child]
        workers[name] = _harness.Worker(cmd, pin=args.pin)
        if args.sequential_setup:  # one set-up at a time (less memory, slower)
            _harness.start_all({name: workers[name]}, log=log)
    infos = _harness.start_all(workers, log=log)
    live = {n: w for n, w in workers.items() if "worker_error" not in infos[n]}
    try:
        samples = _harness.interleave(live, args.rounds, args.steps_per_round, log=log)
    finally:
        for w in workers.values():
            w.close()
    rows: dict[str, Any] = {}
    for name in step_names:
        row = dict(infos[name])
        if name in samples:
            row.update(_harness.summarise(samples[name]))
            row["tokens_per_s_cpu"] = args.batch * args.seq / (row["cpu_ms"] / 1e3)
        rows[name] = row
    merges = []
    for name in merge_names:
        merges.append(_pinned_subprocess(args, name) if args.pin else run_one(args, name))
    return {
        "mode": "interleaved",
        "pinned": args.pin,
        "core": _harness.pick_core() if args.pin else None,
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "load_average_before": load_before,
        "load_average_after": _harness.load_average(),
        "systems": rows,
        "merges": merges,
        "samples": samples,
    }


def _pinned_subprocess(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """``--only name`` in a subprocess with one thread, pinned to the workers' core."""
    core = _harness.pick_core()
    cmd = [sys.executable, __file__, "--only", name, *_child_argv(args)]
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.timeout, env=_harness.single_thread_env()
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"config": name, "error": (proc.stderr or proc.stdout)[-2000:]}


def interleaved_table(out: dict[str, Any]) -> str:
    rows = out["systems"]
    refs = [n for n in ("floor", "peft-eager-16", "peft-compile-16") if n in rows]
    refs += [n for n in rows if n.startswith("peft-") and n not in refs]
    lines = [
        f"CPU ms per step: medians over {out['rounds']} interleaved rounds x "
        f"{out['steps_per_round']} steps, each system pinned to core {out['core']} with one "
        f"thread; load average before {out['load_average_before']}, after "
        f"{out['load_average_after']}",
        _harness.ratio_table(rows, refs),
    ]
    lines += [_merge_line(m) if "ms" in m else f"{m['config']} ERROR" for m in out["merges"]]
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
        help="forward of plain lora-R configs (lora-R-auto/-fused/-factored name theirs)",
    )
    p.add_argument("--attention", default="auto", help="auto (cudnn on GPU), xla, cudnn, blocked")
    p.add_argument("--steps", type=int, help="timed steps (sequential mode; merges)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--remat", action="store_true", help="also measure per-layer remat")
    p.add_argument("--full", action="store_true", help="also measure full fine-tuning")
    p.add_argument(
        "--peft", action="store_true", help="also measure PEFT (eager, compiled) in this run"
    )
    p.add_argument("--peft-json", help="PEFT results written earlier by bench_peft_torch.py")
    p.add_argument(
        "--interleave",
        choices=["auto", "yes", "no"],
        default="auto",
        help="one pinned single-thread worker per system, interleaved rounds, CPU time per step "
        "(default on CPU); 'no': one configuration after the other",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps-per-round", type=int, default=2, help="steps per system per round")
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="interleaved mode without pinning and one-thread settings (not recommended)",
    )
    p.add_argument(
        "--sequential-setup",
        action="store_true",
        help="interleaved mode: set the workers up one at a time (less peak memory)",
    )
    p.add_argument(
        "--isolate",
        choices=["auto", "yes", "no"],
        default="auto",
        help="sequential mode: one subprocess per configuration (default on GPU: exact peaks)",
    )
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument(
        "--profile", action="store_true", help="GPU: device time by kernel category (jax.profiler)"
    )
    p.add_argument(
        "--configs",
        type=lambda s: s.split(","),
        help="explicit list, e.g. floor,lora-16-auto,lora-16-remat,full,merge-16,peft-eager-16",
    )
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="compile each configuration from shapes alone (layers unrolled) and report XLA's "
        "static estimates (FLOPs, bytes accessed, memory) without running: any model size on CPU",
    )
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="compile each configuration from shapes alone, exactly as a timed run would, into "
        "the persistent compilation cache (--cache-dir), without running",
    )
    p.add_argument("--cache-dir", help="JAX persistent compilation cache directory")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    args.raw_argv = list(argv if argv is not None else sys.argv[1:])
    size = SIZES[args.size]
    for key in ("batch", "seq", "dtype", "ranks", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, size[key])
    return args


def _init_jax(args: argparse.Namespace) -> None:
    if args.cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv=None) -> int:
    args = parse(argv)
    _init_jax(args)
    if args.serve:
        serve_one(args, args.serve)
        return 0
    if args.only:
        print("RESULT " + json.dumps(run_one(args, args.only)), flush=True)
        return 0
    import jax

    on_gpu = jax.devices()[0].platform == "gpu"
    names = configs(args)
    if args.peft and not on_gpu and not args.compile_only:
        names += [f"peft-{v}-{r}" for r in args.ranks for v in ("eager", "compile")]
    t0 = time.time()
    out: dict[str, Any] = {
        "size": args.size,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "adapter_dtype": args.adapter_dtype,
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "machine": _harness.machine(),
    }
    interleave = args.interleave == "yes" or (
        args.interleave == "auto" and not on_gpu and not args.compile_only and not args.warm_cache
    )
    if interleave:
        out.update(interleaved(args, names))
        out["wall_s"] = time.time() - t0
        print(interleaved_table(out))
    else:
        isolate = args.isolate == "yes" or (args.isolate == "auto" and on_gpu)
        peft_rows = _peft_rows(args)
        results = []
        for name in [n for n in names if not n.startswith("peft-")]:
            rec = _subprocess(args, name) if isolate else run_one(args, name)
            results.append(rec)
            print(json.dumps(rec), flush=True)
        out.update(results=results, peft=peft_rows, wall_s=time.time() - t0)
        print(table(results, peft_rows))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
