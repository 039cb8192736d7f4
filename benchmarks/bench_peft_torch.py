"""Training-step benchmark of Hugging Face PEFT rsLoRA on a PyTorch Llama (issue 5, PyTorch half).

Measures one optimisation step (forward with the loss, backward, ``AdamW.step``, ``zero_grad``) of a
transformers ``LlamaForCausalLM`` built from a config (random init, nothing is downloaded) with PEFT
LoRA adapters (``use_rslora=True``, ``lora_alpha=16``, ``lora_dropout=0.0``) on every linear layer of
the decoder (q, k, v, o, gate, up, down) and AdamW over the adapter parameters only. Each
configuration runs eagerly and under ``torch.compile`` (default mode); a compile failure is recorded
in the results instead of stopping the run. Optional extras: full fine-tuning (every parameter
trainable, AdamW) for scale, and the time of PEFT's ``merge_and_unload``.

Reported per configuration: the median step time over the timed steps (after warm-up), tokens per
second (batch * seq / median step time) and peak memory (``torch.cuda.max_memory_allocated`` on a
GPU; on CPU the peak resident set size of the process, reset before the timed steps where Linux
allows it).

The loss is the one transformers computes from ``labels=input_ids`` (its ``ForCausalLMLoss``: logits
upcast to float32, shifted next-token cross-entropy, mean over tokens). The KV cache is off
(``use_cache=False``) and gradient checkpointing is not used. Adapters follow PEFT's default
``autocast_adapter_dtype=True``: with bf16 base weights, A and B (and AdamW's state) are float32 and
each adapted layer casts its input to float32; ``--adapter-dtype base`` keeps them in bf16 instead.
Full fine-tuning keeps every parameter and AdamW's state in the base dtype (pure bf16 at bf16).

Run standalone (CPU, about a minute)::

    python benchmarks/bench_peft_torch.py --size tiny --json peft_tiny.json

or on a GPU at TinyLlama-1.1B shapes::

    python benchmarks/bench_peft_torch.py --size tinyllama --rank 16 --rank 256 --json peft.json

From another benchmark script::

    from bench_peft_torch import make_args, run
    result = run(make_args(size="tiny", ranks=[16], steps=5))
    rows = result["results"]

Only torch, transformers and peft are needed (known to work with torch 2.11-2.13, transformers
5.17-5.23, peft 0.21).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

LORA_ALPHA = 16
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 1e-4
VARIANTS = ("eager", "compile")
GIB = float(1 << 30)

# Model shapes and per-size defaults. Llama configs are built from these; nothing is downloaded.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {
            "hidden_size": 256,
            "num_hidden_layers": 4,
            "intermediate_size": 688,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "vocab_size": 1024,
            "max_position_embeddings": 512,
        },
        "batch": 2,
        "seq": 128,
        "dtype": "f32",
        "device": "cpu",
        "ranks": [16],
        "steps": 10,
        "warmup": 3,
    },
    "tinyllama": {
        "model": {
            "hidden_size": 2048,
            "num_hidden_layers": 22,
            "intermediate_size": 5632,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 2048,
        },
        "batch": 4,
        "seq": 2048,
        "dtype": "bf16",
        "device": "cuda",
        "ranks": [16, 256],
        "steps": 20,
        "warmup": 5,
    },
}

DTYPES = ("bf16", "f32")


def build_parser() -> argparse.ArgumentParser:
    """Returns the command-line parser; options left at ``None`` take the size's defaults."""
    p = argparse.ArgumentParser(
        description=(
            "Time PEFT rsLoRA training steps (eager and torch.compile) on a random-init "
            "transformers Llama."
        )
    )
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape preset")
    p.add_argument(
        "--rank",
        dest="ranks",
        action="append",
        nargs="+",
        default=None,
        help="LoRA rank(s); repeatable, space- or comma-separated (e.g. --rank 16 --rank 256, "
        "--rank 16,256). Default: tiny 16, tinyllama 16 and 256.",
    )
    p.add_argument("--batch", type=int, default=None, help="sequences per step")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="base weight dtype")
    p.add_argument("--steps", type=int, default=None, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="torch device")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention kernel")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of eager,compile (default: both)",
    )
    p.add_argument(
        "--adapter-dtype",
        choices=("f32", "base"),
        default="f32",
        help="f32: PEFT's default (autocast_adapter_dtype=True keeps bf16 models' adapters in "
        "float32); base: adapters in the base weight dtype",
    )
    p.add_argument(
        "--full-finetune",
        action="store_true",
        help="also time full fine-tuning (all parameters trainable, AdamW)",
    )
    p.add_argument(
        "--merge", action="store_true", help="also time PEFT merge_and_unload (per rank)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for CPU runs (default: torch's choice); 1 is steadier on a "
        "busy shared machine",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for weights and token batches")
    p.add_argument(
        "--serve",
        default=None,
        metavar="VARIANT:RANK",
        help="worker of an interleaved benchmark (benchmarks/_harness.py): build and warm up one "
        "rsLoRA configuration, e.g. eager:16 or compile:16, then time steps on request",
    )
    p.add_argument("--json", dest="json_path", default=None, help="write results here")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses ``argv`` (``sys.argv[1:]`` when None) into the namespace that `run` takes."""
    return build_parser().parse_args(argv)


def make_args(**overrides: Any) -> argparse.Namespace:
    """Builds a `run` namespace from the defaults plus keyword overrides.

    Args:
        **overrides: attribute names of the parsed namespace (``size``, ``ranks``, ``batch``,
            ``seq``, ``dtype``, ``steps``, ``warmup``, ``device``, ``attn``, ``variants``,
            ``adapter_dtype``, ``full_finetune``, ``merge``, ``threads``, ``seed``, ``json_path``,
            ``serve``).

    Returns:
        The namespace.

    Raises:
        ValueError: if an override names no option.

    Example:
        >>> make_args(size="tiny", ranks=[8], steps=2).ranks
        [8]
    """
    args = parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise ValueError(f"make_args: unknown option {key!r}={value!r}")
        setattr(args, key, value)
    return args


def _flatten_ranks(ranks: Any) -> list[int]:
    """Accepts ints, strings ``"16,256"`` and nested lists (argparse append + nargs)."""
    out: list[int] = []

    def visit(item: Any) -> None:
        if isinstance(item, (list, tuple)):
            for sub in item:
                visit(sub)
        elif isinstance(item, str):
            for part in item.replace(",", " ").split():
                visit(int(part))
        elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
            out.append(item)
        else:
            raise ValueError(f"--rank: expected positive integers, got {item!r}")

    visit(ranks)
    return list(dict.fromkeys(out))


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills size defaults and validates; returns a new namespace.

    Raises:
        ValueError: on an unknown size, variant or dtype, a non-positive count, or CUDA asked for
            where torch sees none.
    """
    import torch

    if args.size not in SIZES:
        raise ValueError(f"--size: expected one of {sorted(SIZES)}, got {args.size!r}")
    spec = SIZES[args.size]
    a = argparse.Namespace(**vars(args))
    for key in ("batch", "seq", "dtype", "device", "steps", "warmup"):
        if getattr(a, key, None) is None:
            setattr(a, key, spec[key])
    a.ranks = _flatten_ranks(spec["ranks"] if a.ranks is None else a.ranks)
    if isinstance(a.variants, str):
        a.variants = [v for v in a.variants.replace(",", " ").split() if v]
    a.variants = list(dict.fromkeys(a.variants))
    for v in a.variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: expected a subset of {VARIANTS}, got {v!r}")
    if a.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {DTYPES}, got {a.dtype!r}")
    for key in ("batch", "seq", "steps"):
        if int(getattr(a, key)) < 1:
            raise ValueError(f"--{key}: expected a positive integer, got {getattr(a, key)!r}")
    if int(a.warmup) < 0:
        raise ValueError(f"--warmup: expected a non-negative integer, got {a.warmup!r}")
    if a.seq > spec["model"]["max_position_embeddings"]:
        raise ValueError(
            f"--seq: {a.seq} exceeds max_position_embeddings "
            f"{spec['model']['max_position_embeddings']} of size {a.size!r}"
        )
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: 'cuda' asked for, but torch.cuda.is_available() is False")
    if a.threads is not None and int(a.threads) < 1:
        raise ValueError(f"--threads: expected a positive integer, got {a.threads!r}")
    if not a.ranks and not a.full_finetune:
        raise ValueError("--rank: no rank given and --full-finetune not set: nothing to measure")
    return a


# --------------------------------------------------------------------------------------------
# Memory


def _rss_peak_reset() -> bool:
    """Resets the process's peak RSS (VmHWM) on Linux; returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int | None:
    """Peak RSS of this process: VmHWM from /proc (resettable) or getrusage (lifetime peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class _Memory:
    """Peak-memory probe for one device."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device == "cuda" else "rss_peak_process"

    def reset(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.kind = "rss_peak_since_reset" if _rss_peak_reset() else "rss_peak_process"

    def peak(self) -> int | None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return _rss_peak_bytes()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _cleanup(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Model, data, step


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "f32": torch.float32}[name]


def build_model(a: argparse.Namespace) -> Any:
    """Random-init ``LlamaForCausalLM`` of size ``a.size`` on ``a.device`` in ``a.dtype``.

    The same seed gives the same weights, so every configuration starts from one base model.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SIZES[a.size]["model"], use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(a.seed)
    dtype = _torch_dtype(a.dtype)
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=a.attn)
    model.to(device=a.device, dtype=dtype)
    model.config.use_cache = False
    model.train()
    return model


def wrap_lora(model: Any, rank: int, a: argparse.Namespace) -> Any:
    """Wraps ``model`` in PEFT rsLoRA adapters on all seven linear projections of each layer.

    Raises:
        RuntimeError: if PEFT's scaling is not alpha / sqrt(rank) (rsLoRA not applied).
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        use_rslora=True,
        target_modules=list(TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 calls transformers 5's deprecated `is_gradient_checkpointing`: noise here.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=a.adapter_dtype == "f32")
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    want = LORA_ALPHA / math.sqrt(rank)
    got = q.scaling["default"]
    if abs(got - want) > 1e-9 * want:
        raise RuntimeError(f"PEFT scaling {got} != rsLoRA alpha/sqrt(r) = {want} at rank {rank}")
    n_adapted = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    expected = len(TARGET_MODULES) * SIZES[a.size]["model"]["num_hidden_layers"]
    if n_adapted != expected:
        raise RuntimeError(f"PEFT adapted {n_adapted} linear layers, expected {expected}")
    return peft_model


def make_batches(a: argparse.Namespace, count: int) -> list[Any]:
    """``count`` random token batches (batch, seq) int64 on the device, from ``a.seed``."""
    import torch

    gen = torch.Generator().manual_seed(a.seed + 1)
    vocab = SIZES[a.size]["model"]["vocab_size"]
    return [
        torch.randint(0, vocab, (a.batch, a.seq), generator=gen).to(a.device) for _ in range(count)
    ]


def _param_counts(model: Any) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _train_step(forward: Callable[..., Any], optimizer: Any, ids: Any) -> Any:
    """One step; returns the loss tensor (not synchronised)."""
    loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _graph_breaks() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:
        return None


def time_training(model: Any, variant: str, a: argparse.Namespace) -> dict[str, Any]:
    """Times ``a.steps`` training steps after ``a.warmup`` of ``model`` (its trainable params).

    Returns:
        A dict of timings, tokens/s, peak memory and losses.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    forward: Callable[..., Any] = model
    if variant == "compile":
        torch._dynamo.reset()
        forward = torch.compile(model)
    batches = make_batches(a, min(a.warmup + a.steps, 8))
    mem = _Memory(a.device)
    out: dict[str, Any] = {"optimizer": type(optimizer).__name__}

    _sync(a.device)
    t0 = time.perf_counter()
    losses = []
    for i in range(a.warmup):
        losses.append(_train_step(forward, optimizer, batches[i % len(batches)]))
    _sync(a.device)
    out["warmup_s"] = time.perf_counter() - t0
    if variant == "compile":
        out["graph_breaks"] = _graph_breaks()

    mem.reset()
    step_ms = []
    for i in range(a.steps):
        ids = batches[(a.warmup + i) % len(batches)]
        _sync(a.device)
        t = time.perf_counter()
        losses.append(_train_step(forward, optimizer, ids))
        _sync(a.device)
        step_ms.append((time.perf_counter() - t) * 1e3)
    peak = mem.peak()

    loss_values = [float(x) for x in losses]
    if not all(math.isfinite(x) for x in loss_values):
        raise FloatingPointError(f"non-finite loss in {variant} run: {loss_values}")
    median = statistics.median(step_ms)
    out.update(
        ms_per_step_median=median,
        ms_per_step_mean=statistics.fmean(step_ms),
        ms_per_step_min=min(step_ms),
        ms_per_step_max=max(step_ms),
        tokens_per_s=a.batch * a.seq / (median / 1e3),
        peak_mem_bytes=peak,
        peak_mem_gib=None if peak is None else peak / GIB,
        peak_mem_kind=mem.kind,
        loss_first=loss_values[0],
        loss_last=loss_values[-1],
        step_ms=step_ms,
    )
    del optimizer, params, forward, batches
    return out


def time_merge(peft_model: Any, a: argparse.Namespace) -> dict[str, Any]:
    """Times ``merge_and_unload`` of all adapters and checks the merged model's logits.

    One merge/unmerge round is run first (untimed) so kernel start-up stays out of the figure.
    """
    import torch

    ids = make_batches(a, 1)[0][:1]
    with torch.no_grad():
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
        ref = peft_model(input_ids=ids, use_cache=False).logits.float()
    _sync(a.device)
    t = time.perf_counter()
    merged = peft_model.merge_and_unload()
    _sync(a.device)
    ms = (time.perf_counter() - t) * 1e3
    with torch.no_grad():
        got = merged(input_ids=ids, use_cache=False).logits.float()
    rel = float((got - ref).norm() / ref.norm())
    return {"merge_and_unload_ms": ms, "merge_logits_rel_err": rel}


# --------------------------------------------------------------------------------------------
# Driver


def _base_record(a: argparse.Namespace, method: str, variant: str, rank: int | None) -> dict:
    return {
        "framework": "torch-peft",
        "method": method,
        "variant": variant,
        "rank": rank,
        "alpha": LORA_ALPHA if method == "rslora" else None,
        "size": a.size,
        "batch": a.batch,
        "seq": a.seq,
        "dtype": a.dtype,
        "adapter_dtype": a.adapter_dtype if method == "rslora" else None,
        "attn": a.attn,
        "device": a.device,
        "status": "ok",
        "error": None,
        # CPU timings on a shared machine are only as good as its idleness: keep the load with them.
        "loadavg_1min_before": _loadavg(),
    }


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _error_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb[-3:])
    return f"{type(exc).__name__}: {exc}"[:1500] + "\n--- traceback tail ---\n" + tail[-1500:]


def _measure(a: argparse.Namespace, method: str, variant: str, rank: int | None) -> dict:
    rec = _base_record(a, method, variant, rank)
    model = None
    try:
        model = build_model(a)
        if method == "rslora":
            model = wrap_lora(model, rank, a)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        rec["trainable_params"], rec["total_params"] = _param_counts(model)
        rec.update(time_training(model, variant, a))
        if a.merge and method == "rslora" and variant == "eager":
            rec.update(time_merge(model, a))
    except Exception as exc:  # recorded, e.g. torch.compile failures or OOM
        rec["status"] = "error"
        rec["error"] = _error_text(exc)
    finally:
        del model
        if variant == "compile":
            import torch

            torch._dynamo.reset()
        _cleanup(a.device)
    return rec


def environment(a: argparse.Namespace) -> dict[str, Any]:
    """Versions and hardware of this run."""
    import peft
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if a.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def run(args: argparse.Namespace, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Runs every configuration of ``args`` and returns the results.

    Configurations: each rank of ``args.ranks`` x each variant of ``args.variants`` with rsLoRA,
    then (with ``--full-finetune``) full fine-tuning for each variant. A configuration that fails
    (compile error, out of memory) becomes a row with ``status="error"`` and its message. With
    ``args.json_path`` the JSON file is rewritten after every row, so a run cut short keeps what
    it measured.

    Args:
        args: a namespace from `parse_args` or `make_args`; size defaults fill ``None`` options.
        log: called with the table header and then each row as it is measured; None for quiet.

    Returns:
        ``{"benchmark", "settings", "environment", "results"}``; ``results`` is a list of rows with
        ``framework``, ``method`` (``rslora`` or ``full``), ``variant``, ``rank``,
        ``ms_per_step_median``, ``tokens_per_s``, ``peak_mem_bytes``/``peak_mem_gib``,
        ``peak_mem_kind``, ``trainable_params``, ``status``, ``error`` and more.

    Raises:
        ValueError: on invalid options (see `resolve_args`).
    """
    a = resolve_args(args)
    if a.threads is not None:
        import torch

        torch.set_num_threads(int(a.threads))
    settings = {
        "size": a.size,
        "model": SIZES[a.size]["model"],
        "ranks": a.ranks,
        "lora_alpha": LORA_ALPHA,
        "use_rslora": True,
        "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES),
        "batch": a.batch,
        "seq": a.seq,
        "dtype": a.dtype,
        "adapter_dtype": a.adapter_dtype,
        "attn": a.attn,
        "device": a.device,
        "variants": a.variants,
        "steps": a.steps,
        "warmup": a.warmup,
        "seed": a.seed,
        "optimizer": f"torch.optim.AdamW(lr={LEARNING_RATE}), default foreach/fused choice",
        "loss": "transformers ForCausalLMLoss from labels=input_ids (float32 logits, mean CE)",
        "compile_mode": "default",
        "full_finetune": bool(a.full_finetune),
        "merge": bool(a.merge),
    }
    result: dict[str, Any] = {
        "benchmark": "peft_torch_train_step",
        "settings": settings,
        "environment": environment(a),
        "results": [],
    }
    plan = [("rslora", v, r) for r in a.ranks for v in a.variants]
    if a.full_finetune:
        plan += [("full", v, None) for v in a.variants]
    if log is not None:
        log(HEADER)
    for method, variant, rank in plan:
        rec = _measure(a, method, variant, rank)
        result["results"].append(rec)
        if log is not None:
            log(_row(rec))
        if a.json_path:
            write_json(result, a.json_path)
    return result


def write_json(result: dict[str, Any], path: str) -> None:
    """Writes ``result`` to ``path`` (atomically, via a temporary file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


HEADER = (
    f"{'method':<7} {'variant':<8} {'rank':>5} {'ms/step':>9} {'tok/s':>10} "
    f"{'peak GiB':>9} {'trainable':>12} {'merge ms':>9}  status"
)


def _row(rec: dict[str, Any]) -> str:
    status = rec["status"]
    if rec["error"]:
        status += ": " + rec["error"].splitlines()[0][:80]
    return (
        f"{rec['method']:<7} {rec['variant']:<8} {_fmt(rec['rank'], 'd'):>5} "
        f"{_fmt(rec.get('ms_per_step_median'), '.1f'):>9} "
        f"{_fmt(rec.get('tokens_per_s'), ',.0f'):>10} "
        f"{_fmt(rec.get('peak_mem_gib'), '.2f'):>9} "
        f"{_fmt(rec.get('trainable_params'), ',d'):>12} "
        f"{_fmt(rec.get('merge_and_unload_ms'), '.1f'):>9}  {status}"
    )


def format_table(result: dict[str, Any]) -> str:
    """A short text table of ``result["results"]``."""
    s = result["settings"]
    env = result["environment"]
    head = (
        f"PEFT rsLoRA train step | {s['size']} batch {s['batch']} x seq {s['seq']} {s['dtype']} "
        f"attn={s['attn']} on {env.get('gpu', s['device'])} | torch {env['torch']}, "
        f"transformers {env['transformers']}, peft {env['peft']} | "
        f"median of {s['steps']} steps after {s['warmup']} warm-up"
    )
    kind = next((r["peak_mem_kind"] for r in result["results"] if r.get("peak_mem_kind")), None)
    lines = [head, HEADER, *(_row(r) for r in result["results"])]
    if kind:
        lines.append(f"peak memory: {kind}")
    return "\n".join(lines)


def serve_worker(a: argparse.Namespace, variant: str, rank: int) -> None:
    """Worker of an interleaved benchmark: one rsLoRA configuration, steps timed on request.

    Builds the model, wraps it, runs ``a.warmup`` steps (the compile for ``compile``), then hands
    a one-step callable to ``_harness.serve`` (which announces ``READY`` with this record).

    Raises:
        ValueError: on an unknown variant.
    """
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"--serve: variant must be one of {VARIANTS}, got {variant!r}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _harness

    if a.threads is not None:
        torch.set_num_threads(int(a.threads))
        torch.set_num_interop_threads(int(a.threads))
    rec = _base_record(a, "rslora", variant, rank)
    model = wrap_lora(build_model(a), rank, a)
    rec["trainable_params"], rec["total_params"] = _param_counts(model)
    rec["environment"] = environment(a)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    forward: Callable[..., Any] = model
    if variant == "compile":
        torch._dynamo.reset()
        forward = torch.compile(model)
    batches = make_batches(a, 8)
    t0 = time.perf_counter()
    for i in range(max(int(a.warmup), 1)):
        loss = _train_step(forward, optimizer, batches[i % len(batches)])
    _sync(a.device)
    rec["warmup_s"] = time.perf_counter() - t0
    rec["loss_after_warmup"] = float(loss)
    if variant == "compile":
        rec["graph_breaks"] = _graph_breaks()
    count = [0]

    def step() -> None:
        count[0] += 1
        _train_step(forward, optimizer, batches[count[0] % len(batches)])
        _sync(a.device)

    _harness.serve(step, rec)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 1 if an eager configuration failed, else 0."""
    args = parse_args(argv)
    try:
        a = resolve_args(args)
    except ValueError as exc:
        build_parser().error(str(exc))
    if a.serve:
        variant, _, rank = a.serve.partition(":")
        serve_worker(a, variant, int(rank or a.ranks[0]))
        return 0
    result = run(a, log=lambda line: print(line, flush=True))
    print()
    print(format_table(result))
    if a.json_path:
        print(f"wrote {a.json_path}")
    failed = [r for r in result["results"] if r["status"] != "ok" and r["variant"] == "eager"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
