"""The rsLoRA paper's experiment on the built-in base model: LoRA against rsLoRA across ranks.

Kalajdzievski (2023, arXiv 2312.03732) shows that with LoRA's scale ``alpha / r`` the gradient
reaching the adapters shrinks like ``r^-1/2`` and higher ranks learn no better ("the curves
bunch together"), while rsLoRA's ``alpha / sqrt(r)`` keeps the gradient flat in r and the loss
improves with rank. This script fine-tunes the built-in base model (``rslora_jax/assets/base``)
on the built-in corpus at several ranks with each method -- same learning rate, steps, alpha,
data order and adapter seed, every linear layer adapted, constant schedule, AdamW -- and writes
to ``--out``:

* ``loss_curves.png``: training loss against step, one panel per method, one line per rank;
* ``grad_norms.png``: ``||dL/dB||`` at initialisation against rank (log-log), every method;
* ``results.json``: final losses, gradient norms, fitted slopes, the loss curves, timings;

and prints the table. ``||dL/dB||`` is the Frobenius norm of the gradient of all B factors
(``lora_b`` leaves; for RaSA also the shared pools') at step 0, on the first batch; its slope is
a least-squares fit of ``log ||dL/dB||`` against ``log r``. Expected: about -0.5 for LoRA and
about 0 for rsLoRA.

Methods (``--methods``, extensible through `METHODS`): ``lora``, ``rslora``, ``rasa`` (rank
sharing across layers, `rslora_jax.RaSA`, with the RaSA paper's ``alpha / (2(r-k))`` diagonal)
and ``rasa-rs`` (the same with our rank-stabilised diagonal, ``alpha / (2 sqrt(r-k))``, which
neither paper has). All four run by default.

Usage::

    python examples/rank_sweep.py                    # ranks 4,16,64,256 (CPU: see the README)
    python examples/rank_sweep.py --small            # a few steps at ranks 4 and 16 (CI)
    python examples/rank_sweep.py --steps 1000 --batch 32 --seq 256   # longer, on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import rslora_jax as rl  # noqa: E402
from rslora_jax import data  # noqa: E402
from rslora_jax.hf import load_pretrained, load_tokenizer  # noqa: E402
from rslora_jax.models import LlamaForCausalLM, causal_lm_loss  # noqa: E402

DEFAULT_MODEL = REPO / "rslora_jax" / "assets" / "base"
# Every linear layer of the scanned Llama; its kernels are (layer, in, out).
COMMON: dict[str, Any] = {"targets": "all-linear", "kernel_axes": {"model/layers/.*": "lio"}}

#: method name -> (rank, alpha) -> LoraConfig. Add an entry to sweep another method.
METHODS: dict[str, Callable[[int, float], rl.LoraConfig]] = {
    "lora": lambda r, alpha: rl.LoraConfig(rank=r, alpha=alpha, scaling="lora", **COMMON),
    "rslora": lambda r, alpha: rl.LoraConfig(rank=r, alpha=alpha, scaling="rslora", **COMMON),
}
METHODS["rasa"] = lambda r, alpha: rl.LoraConfig(
    rank=r, alpha=alpha, method=rl.RaSA(init="paper"), **COMMON
)
METHODS["rasa-rs"] = lambda r, alpha: rl.LoraConfig(
    rank=r, alpha=alpha, method=rl.RaSA(init="rslora"), **COMMON
)
DEFAULT_METHODS = "lora,rslora,rasa,rasa-rs"
#: RaSA is part of the library (`rslora_jax.RaSA`): always swept.
HAS_RASA = True
PAPER_SLOPES = {"lora": -0.5, "rslora": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="LoRA vs rsLoRA across ranks on the built-in base model (rsLoRA paper).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"from {sorted(METHODS)}")
    p.add_argument("--ranks", default="4,16,64,256", help="comma-separated ranks")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-3, help="constant AdamW learning rate")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="adapter init and data order")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF checkpoint directory")
    p.add_argument("--out", type=Path, default=Path("runs/rank_sweep"), help="output directory")
    p.add_argument("--small", action="store_true", help="CI size: ranks 4,16, 6 steps, batch 4")
    args = p.parse_args(argv)
    if args.small:
        args.ranks, args.steps, args.batch, args.seq = "4,16", 6, 4, 64
    try:
        args.ranks = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError:
        p.error(f"--ranks must be comma-separated integers, got {args.ranks!r}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown --methods {unknown}; available: {sorted(METHODS)}")
    if len(args.ranks) < 2 or min(args.ranks) < 1:
        p.error(f"--ranks needs at least two positive ranks, got {args.ranks}")
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def b_grad_norm(grads: Any) -> jax.Array:
    """Frobenius norm of the gradient of every ``lora_b`` leaf (RaSA pools included)."""
    leaves = [
        g
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
        if getattr(path[-1], "key", None) == "lora_b"
    ]
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


def run_one(
    method: str, rank: int, model: Any, base: Any, rows: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """Fine-tunes one (method, rank); returns its losses and the B-gradient norm at step 0."""
    config = METHODS[method](rank, args.alpha)
    adapters = rl.init_adapters(base, config, jax.random.key(args.seed))
    apply = rl.lora(model.apply, config)
    opt = rl.optimizer(optax.adamw(args.lr, weight_decay=0.0))
    state = opt.init(adapters)

    def loss_fn(adapters, base, batch):
        logits = apply({"params": rl.combine(adapters, base)}, batch[:, :-1])
        return causal_lm_loss(logits, batch[:, 1:])

    @jax.jit
    def step(adapters, state, base, batch):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base, batch)
        updates, state = opt.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, loss, b_grad_norm(grads)

    t0 = time.perf_counter()
    losses, grad_norms = [], []
    for batch in data.batch_iterator(rows, args.batch, seed=args.seed):
        if len(losses) == args.steps:
            break
        adapters, state, loss, gnorm = step(adapters, state, base, jnp.asarray(batch))
        losses.append(float(loss))
        grad_norms.append(float(gnorm))
    tail = max(len(losses) // 10, 1)
    return {
        "method": method,
        "rank": rank,
        "scale": (
            config.scale_for("model/layers/self_attn/q_proj")
            if config.method.name != "rasa"
            else None
        ),
        "adapter_parameters": rl.num_adapter_params(adapters),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-tail:])),
        "grad_norm_b_init": grad_norms[0],
        "train_losses": losses,
        "grad_norms_b": grad_norms,
        "seconds": time.perf_counter() - t0,
    }


def fit_slope(ranks: list[int], norms: list[float]) -> float:
    """Least-squares slope of log(norm) against log(rank)."""
    return float(np.polyfit(np.log(ranks), np.log(norms), 1)[0])


def _smooth(values: np.ndarray, k: int) -> np.ndarray:
    return np.convolve(values, np.ones(k) / k, mode="valid")


def plot_curves(path: Path, runs: list[dict[str, Any]], methods: list[str], title: str) -> None:
    """Top row: training loss per rank, one panel per method. Bottom row: the same minus the
    lowest rank's loss. Every run sees the same batches, so the differences are paired and the
    batch-to-batch noise (much larger than the differences) cancels in the bottom row."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    ranks = sorted({r["rank"] for r in runs})
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(ranks)))
    fig = Figure(figsize=(4.6 * len(methods), 7.0), dpi=110)
    axes = fig.subplots(2, len(methods), sharey="row", sharex=True, squeeze=False)
    for col, method in enumerate(methods):
        by_rank = {r["rank"]: np.asarray(r["train_losses"]) for r in runs if r["method"] == method}
        steps = len(by_rank[ranks[0]])
        k = max(min(steps // 10, 25), 1)
        x = np.arange(k, steps + 1)
        for color, rank in zip(colors, ranks):
            axes[0, col].plot(x, _smooth(by_rank[rank], k), color=color, label=f"r={rank}")
            diff = _smooth(by_rank[rank] - by_rank[ranks[0]], k)
            axes[1, col].plot(x, diff, color=color, label=f"r={rank}")
        axes[0, col].set_title(method)
        axes[1, col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"training loss ({k}-step running mean)")
    axes[1, 0].set_ylabel(f"loss minus rank {ranks[0]}'s (same batches)")
    axes[0, -1].legend(title="rank")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_grad_norms(
    path: Path, runs: list[dict[str, Any]], methods: list[str], slopes: dict[str, float]
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 4.2), dpi=110)
    ax = fig.add_subplot()
    for method in methods:
        points = sorted((r["rank"], r["grad_norm_b_init"]) for r in runs if r["method"] == method)
        ranks, norms = zip(*points)
        ax.loglog(ranks, norms, "o-", label=f"{method} (slope {slopes[method]:+.2f})")
    ax.set_xlabel("rank r")
    ax.set_ylabel("||dL/dB|| at initialisation")
    ax.set_title("adapter gradient norm vs rank (paper: LoRA -0.5, rsLoRA 0)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def table(runs: list[dict[str, Any]], slopes: dict[str, float]) -> str:
    lines = [f"{'method':<9}{'rank':>6}{'first loss':>12}{'final loss':>12}{'||dL/dB|| init':>16}"]
    for r in runs:
        lines.append(
            f"{r['method']:<9}{r['rank']:>6}{r['first_loss']:>12.4f}{r['final_loss']:>12.4f}"
            f"{r['grad_norm_b_init']:>16.4e}"
        )
    lines.append("gradient-norm slope against rank (log-log fit):")
    for method, slope in slopes.items():
        paper = f" (paper: {PAPER_SLOPES[method]:+.1f})" if method in PAPER_SLOPES else ""
        lines.append(f"  {method:<9}{slope:+.3f}{paper}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    model_config, base = load_pretrained(args.model)
    abstract = jax.eval_shape(lambda: base)
    for method in args.methods:  # a rank the model does not allow fails here, not mid-sweep
        for rank in args.ranks:
            try:
                config = METHODS[method](rank, args.alpha)
                jax.eval_shape(
                    lambda k, c=config: rl.init_adapters(abstract, c, k), jax.random.key(0)
                )
            except ValueError as err:
                raise SystemExit(f"rank_sweep: {method} at rank {rank}: {err}") from None
    model = LlamaForCausalLM(model_config)
    tokenizer = load_tokenizer(args.model)
    rows = data.tokenize_and_pack(data.stdlib_finetune_documents(), tokenizer, args.seq)
    train_rows, _ = data.split_sequences(rows, 0.05)
    print(
        f"base {args.model}; methods {args.methods}; ranks {args.ranks}; alpha {args.alpha:g}; "
        f"lr {args.lr:g} (constant, AdamW); {args.steps} steps of {args.batch} x {args.seq} "
        f"tokens; {jax.devices()[0].platform}",
        flush=True,
    )
    runs = []
    for method in args.methods:
        for rank in args.ranks:
            run = run_one(method, rank, model, base, train_rows, args)
            runs.append(run)
            print(
                f"  {method:<8} r={rank:<4} loss {run['first_loss']:.4f} -> "
                f"{run['final_loss']:.4f}  ||dL/dB|| {run['grad_norm_b_init']:.3e}  "
                f"({run['seconds']:.0f}s)",
                flush=True,
            )
    slopes = {
        m: fit_slope(
            [r["rank"] for r in runs if r["method"] == m],
            [r["grad_norm_b_init"] for r in runs if r["method"] == m],
        )
        for m in args.methods
    }
    args.out.mkdir(parents=True, exist_ok=True)
    title = (
        f"alpha={args.alpha:g}, lr={args.lr:g} constant, {args.steps} steps x "
        f"{args.batch * args.seq} tokens, all linear layers"
    )
    plot_curves(args.out / "loss_curves.png", runs, args.methods, title)
    plot_grad_norms(args.out / "grad_norms.png", runs, args.methods, slopes)
    wall = time.perf_counter() - t_start
    results = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "schedule": "constant",
            "optimizer": "adamw (weight_decay 0)",
            "targets": "all-linear",
            "platform": jax.devices()[0].platform,
        },
        "runs": runs,
        "slopes": slopes,
        "final_losses": {f"{r['method']}/r{r['rank']}": r["final_loss"] for r in runs},
        "wall_seconds": wall,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(runs, slopes))
    print(f"wall time: {wall:.0f}s ({wall / 60:.1f} min); wrote {args.out}/")
    return results


if __name__ == "__main__":
    main()
