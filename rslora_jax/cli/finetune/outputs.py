"""What a finished run leaves in ``--out``: adapter, PEFT and merged exports, the loss curve
(``loss.png``), ``metrics.json`` and the closing summary.

matplotlib is imported inside `plot_losses` only, so importing this module does not load it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import rslora_jax as rl
from rslora_jax import _files
from rslora_jax._types import PyTree
from rslora_jax.cli.finetune import guards
from rslora_jax.cli.finetune.args import args_to_json
from rslora_jax.cli.finetune.plan import Plan, checkpoint_steps


def write_outputs(
    plan: Plan, adapters: PyTree, base: PyTree, losses: list[float], evals: list[list[float]]
) -> dict[str, Path]:
    """Adapter checkpoint, PEFT adapter, merged checkpoint + tokenizer, loss curve.

    Every process calls this: the adapter checkpoint is written by all together; the rest is
    gathered to every process (`process_allgather`) and written by process 0. A method without
    a PEFT format (RaSA) writes no ``peft/``: the merged model is its export. Each directory
    appears whole (the merged model with its tokenizer, in one swap); a full disk stops the
    run with a message naming what was being written (`guards.writing`).
    """
    from jax.experimental import multihost_utils

    from rslora_jax.hf import save_pretrained
    from rslora_jax.hf.io import save_tokenizer

    args, out = plan.args, plan.out
    has_peft = has_peft_format(plan)
    outputs = {
        "adapters": out / "adapters",
        **({"peft": out / "peft"} if has_peft else {}),
        "merged": out / "merged",
        "checkpoints": out / "checkpoints",
        "loss_curve": out / "loss.png",
        "metrics": out / "metrics.json",
    }
    params = rl.combine(adapters, base)
    with guards.writing(outputs["adapters"], out):
        rl.save_adapters(outputs["adapters"], params, plan.lora_config)
    merged = jax.jit(rl.merge, static_argnums=1)(params, plan.lora_config)
    if jax.process_count() > 1:  # pieces in every process: gather them
        merged = multihost_utils.process_allgather(merged, tiled=True)
        # export_peft reads the adapters' values and only the kernels' shapes.
        params = rl.combine(multihost_utils.process_allgather(adapters, tiled=True), base)
    if jax.process_index() == 0:
        if has_peft:
            with guards.writing(outputs["peft"], out):
                plan.export_peft(
                    outputs["peft"],
                    params,
                    plan.lora_config,
                    plan.model_config,
                    base_model_name_or_path=str(plan.model_dir),
                )
                if plan.vocab_from is not None:  # PEFT users resize the base to this first
                    plan.tokenizer.save_pretrained(str(outputs["peft"]))
        with guards.writing(outputs["merged"], out):
            save_pretrained(
                outputs["merged"],
                merged,
                plan.hf_config,
                dtype=plan.merged_dtype,
                extra=lambda staging: save_tokenizer(plan.tokenizer, staging),
            )
        method = plan.lora_config.method.name
        kind = args.scaling if method == "lora" else method
        title = f"{kind} r={args.rank} alpha={args.alpha:g} lr={args.lr:g} ({args.schedule})"
        with guards.writing(outputs["loss_curve"], out):
            plot_losses(outputs["loss_curve"], losses, evals, title)
    return outputs


def has_peft_format(plan: Plan) -> bool:
    """Whether the run's method has a PEFT format (RaSA has none)."""
    return plan.lora_config.method.peft_fields is not None


def plot_losses(
    path: Path, losses: Sequence[float], evals: Sequence[Sequence[float]], title: str
) -> None:
    """Writes the training-loss curve (per step and a running mean) and held-out losses as PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
    if len(losses) >= 5:
        k = min(20, max(len(losses) // 10, 2))
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="tab:blue", lw=1.8, label=f"train ({k}-step mean)")
    if evals:
        e = np.asarray(evals, dtype=float)
        ax.plot(e[:, 0], e[:, 1], "o-", color="tab:orange", lw=1.5, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _files.write_file(path, lambda tmp: fig.savefig(tmp, format="png"), who="plot_losses")


def summary(m: dict[str, Any], out: Path) -> str:
    """The closing report printed by process 0: losses, speed, and what is in `out`."""
    s = m["seconds"]
    saved = checkpoint_steps(out / "checkpoints")
    tps = m["tokens_per_second"]
    lines = [
        "",
        f"done: {m['steps']} steps, {s['train_total']:.0f}s training"
        + (f" ({tps:,.0f} tokens/s after compilation)" if tps else "")
        + f", {s['total_this_process']:.0f}s in all",
        f"  train loss     {m['first_train_loss']:.4f} at the first step (mean of the first 10: "
        f"{m['first_10_train_loss']:.4f}) -> {m['last_train_loss']:.4f} (mean of the last 10)",
        f"  held-out loss  {m['eval_loss_before']:.4f} (before) -> {m['eval_loss_after']:.4f} "
        f"(after){' (answers only)' if m['data'].get('answers_only') else ''}",
    ]
    if m.get("samples"):
        from rslora_jax.cli.finetune.samples import summary_lines

        lines.append("  held-out prompts, greedy completions before -> after training:")
        lines += summary_lines(m["samples"])
    dropped = m["data"].get("dropped_examples", 0)
    if dropped:
        lines.append(
            f"  {dropped} examples left out: their answer was cut off entirely by --seq-len "
            f"(first: {', '.join(m['data']['dropped_sources'])}); raise --seq-len to keep them"
        )
    lines.append(f"outputs in {out}:")
    lines.append("  adapters/      adapter checkpoint: rslora_jax.load_adapters(dir, base_params)")
    if "peft" in m["outputs"]:
        lines.append(
            "  peft/          PEFT adapter: peft.PeftModel.from_pretrained(base_model, dir)"
        )
    else:
        lines.append(
            f"  (no peft/: {m['method']} has no PEFT format; serve merged/, which holds it)"
        )
    lines += [
        "  merged/        merged model + tokenizer: AutoModelForCausalLM.from_pretrained(dir)",
        f"  checkpoints/   training state for --resume (steps {saved})",
        "  loss.png       loss curves",
        "  metrics.json   losses, held-out losses, tokens/s, timings, configuration",
        "  run.json       the run's arguments",
    ]
    if m.get("trackers"):
        if "tensorboard" in m["trackers"]:
            lines.append(f"  tb/            TensorBoard events: tensorboard --logdir {out / 'tb'}")
    return "\n".join(lines)


def mean_tail(values: Sequence[float], n: int = 10) -> float:
    """The mean of the last `n` values (NaN when there are none).

    Example:
      >>> mean_tail([4.0, 3.0, 2.0, 1.0], n=2)
      1.5
    """
    return float(np.mean(values[-n:])) if values else float("nan")


def build_metrics(
    plan: Plan,
    outputs: dict[str, Path],
    *,
    losses: list[float],
    evals: list[list[float]],
    resumed_from_step: int | None,
    tokens_per_step: int,
    tokens_per_second: float | None,
    seconds: dict[str, Any],
    parameters: dict[str, int],
) -> dict[str, Any]:
    """The metrics of a finished run, as ``metrics.json`` holds them.

    Args:
      plan: the run.
      outputs: what `write_outputs` wrote ({name: path}).
      losses: the training loss of every step (all steps, resumed or not).
      evals: ``[step, held-out loss]`` pairs, the first before training.
      resumed_from_step: the step this process resumed at (None for a fresh run).
      tokens_per_step: tokens in a global batch.
      tokens_per_second: training throughput after compilation (None if unmeasured).
      seconds: the timings.
      parameters: ``{"base": ..., "adapters": ...}`` parameter counts.

    Returns:
      A JSON-serialisable dict (paths as strings, up to ``default=str``).
    """
    args, out = plan.args, plan.out
    run = plan.run_data
    data_info: dict[str, Any] = {
        "description": plan.data_description,
        "train_sequences": len(plan.train_rows),
        "eval_sequences": len(plan.eval_rows),
        "sha256": plan.data_sha256,
    }
    if run is not None:
        data_info.update(
            formats=run.formats,
            chat_template=run.chat_template,
            answers_only=not args.train_on_prompt and set(run.formats) != {"text"},
            packed=not args.no_packing,
            train_packing=_stats(run.train_stats),
            eval_packing=_stats(run.eval_stats),
            truncated_examples=run.train_stats.truncated + run.eval_stats.truncated,
            dropped_examples=run.train_stats.dropped + run.eval_stats.dropped,
            dropped_sources=list(run.train_stats.dropped_sources + run.eval_stats.dropped_sources)[
                :5
            ],
        )
    return {
        "interrupted": False,
        "method": plan.lora_config.method.name,
        "trackers": list(plan.trackers),
        "steps": args.steps,
        "grad_accum": args.grad_accum,
        "resumed_from_step": resumed_from_step,
        "train_losses": losses,
        "eval_losses": evals,
        "first_train_loss": losses[0] if losses else None,
        "first_10_train_loss": float(np.mean(losses[:10])) if losses else None,
        "last_train_loss": mean_tail(losses),
        "eval_loss_before": evals[0][1],
        "eval_loss_after": evals[-1][1],
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": tokens_per_second,
        "seconds": seconds,
        "parameters": parameters,
        "devices": {
            "mesh": dict(plan.mesh.shape),
            "platform": plan.mesh.devices.flat[0].platform,
            "processes": jax.process_count(),
        },
        "data": data_info,
        "config": {
            "args": {**args_to_json(args), "out": str(out)},
            "lora": plan.lora_config.to_dict(),
            "model": plan.hf_config.to_dict(),
        },
        "outputs": {k: str(v) for k, v in outputs.items()},
    }


def _stats(stats: Any) -> dict[str, Any]:
    out = dataclasses.asdict(stats)
    out["dropped_sources"] = list(out["dropped_sources"])
    out["fill"] = stats.fill
    return out


def write_metrics(metrics: dict[str, Any], path: Path, out: Path) -> None:
    """Writes ``metrics.json`` to `path` and prints the `summary` (process 0 only)."""
    text = json.dumps(metrics, indent=2, default=str) + "\n"
    _files.write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(summary(metrics, out), flush=True)
