"""The training loop: steps, held-out evaluation, periodic checkpoints, resume and Ctrl-C.

`train` runs (or resumes) a `Plan`; at the end it hands the adapters to
`rslora_jax.cli.finetune.outputs`. A first Ctrl-C stops after the current step and saves a
checkpoint (`StopRequest`); a second one aborts. A Ctrl-C before the first step or while the
outputs are written stops with a message that says what was kept (`guards.Interrupted`). A step
whose loss or gradient is not finite, a held-out loss that is not, or a full disk stops the run
with a message naming the last good checkpoint (`guards.RunError`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import rslora_jax as rl
from rslora_jax import _files, distributed
from rslora_jax._types import PyTree
from rslora_jax.cli.common import log, progress_bar
from rslora_jax.cli.finetune import guards
from rslora_jax.cli.finetune.args import PROG, args_to_json
from rslora_jax.cli.finetune.layout import LocalRows, named, train_batch
from rslora_jax.cli.finetune.outputs import build_metrics, mean_tail, write_metrics, write_outputs
from rslora_jax.cli.finetune.plan import Plan
from rslora_jax.cli.finetune.program import (
    OptimSettings,
    Program,
    make_schedule,
    program,
)
from rslora_jax.cli.finetune.runtime import barrier
from rslora_jax.cli.finetune.samples import Samples
from rslora_jax.cli.finetune.tracking import Trackers


class StopRequest:
    """Set by the first Ctrl-C; the loop saves and stops after the current step.

    With several processes, the flag travels through the training step (`Program.stop_flags`),
    so every process stops after the same step (the one after the Ctrl-C) and they save
    together.
    """

    def __init__(self, multi: bool = False) -> None:
        self.requested = False
        self.multi = multi

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            self.requested = True
            # A second Ctrl-C aborts at once.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            which = f" (process {jax.process_index()})" if self.multi else ""
            when = (
                "all processes stop after the next step"
                if self.multi
                else "stopping after this step"
            )
            print(
                f"\n{PROG}: Ctrl-C{which}: {when} and save a checkpoint "
                "(Ctrl-C again to abort without saving)",
                file=sys.stderr,
                flush=True,
            )

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: KeyboardInterrupt is caught instead
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class Evaluator:
    """Held-out loss: the mean over the counted targets of every held-out row (the answers'
    loss for instruction data), the rows padded to whole batches with empty rows.

    Every process keeps the (small) held-out set and materialises its own rows of each batch.
    """

    def __init__(self, prog: Program, rows: np.ndarray, local: LocalRows) -> None:
        batch_size = local.batch_size
        pad = (-len(rows)) % batch_size
        self.prog = prog
        self.local = local
        self.rows = np.concatenate([rows, np.zeros((pad, *rows.shape[1:]), rows.dtype)])

    def __call__(self, adapters: PyTree, base: PyTree) -> float:
        size, mine = self.local.batch_size, self.local.rows
        total = count = 0.0
        for i in range(0, len(self.rows), size):
            rows = distributed.make_global_batch(
                self.rows[i : i + size][mine], self.prog.batch, size
            )
            s, c = self.prog.eval_sums(adapters, base, rows)
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)


def train(plan: Plan) -> dict[str, Any]:
    """Runs (or resumes) the fine-tuning described by `plan`; writes the outputs.

    Under ``jax.distributed`` every process calls this together: each trains on its own rows
    of every global batch, all save checkpoints together, and process 0 prints and writes the
    exports and metrics (the others wait for it).

    Returns:
      The metrics (also written to ``metrics.json``); ``metrics["interrupted"]`` is True when
      Ctrl-C stopped the run (a checkpoint was saved, no final outputs were written).
    """
    args, out = plan.args, plan.out
    multi = jax.process_count() > 1
    lead = jax.process_index() == 0
    say = functools.partial(print, flush=True) if lead else _silent
    t_start = time.perf_counter()
    if lead:
        guards.clean_out(out)  # staging that a killed run left behind
    if not args.resume and lead:
        run = {"args": {**args_to_json(args), "out": str(out)}, "data_sha256": plan.data_sha256}
        text = json.dumps(run, indent=2) + "\n"
        with guards.writing(out / "run.json", out):
            _files.write_file(out / "run.json", lambda tmp: _write_text(tmp, text), who=PROG)
    try:
        return _train(plan, t_start, say)
    except KeyboardInterrupt:
        if multi:
            raise  # every process must stop at once: main leaves without the shutdown barrier
        raise guards.Interrupted(_interrupted_message(plan)) from None


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _interrupted_message(plan: Plan) -> str:
    """What a Ctrl-C outside the step loop leaves, and how to go on."""
    out = plan.out
    kept = guards.last_checkpoint(out)
    final = out / "checkpoints" / str(plan.args.steps)
    if final.is_dir() and not (out / "metrics.json").exists():
        return (
            f"interrupted while writing the outputs; the training is complete and {kept}: "
            "--resume writes the outputs without training"
        )
    return f"interrupted; {kept}"


def _train(plan: Plan, t_start: float, say: Any) -> dict[str, Any]:
    """`train` after run.json: load, resume, step, evaluate, save, export."""

    args, out = plan.args, plan.out
    multi = jax.process_count() > 1
    lead = jax.process_index() == 0
    optim = OptimSettings.from_args(args)
    prog = program(
        plan.model_config,
        plan.lora_config,
        optim,
        plan.mesh,
        args.forward,
        getattr(args, "quantize", "none"),
        args.grad_accum,
        plan.layers,
        getattr(args, "loss_chunk", 0),
    )
    accum = args.grad_accum
    local = LocalRows.of(prog.batch, args.batch_size * accum)  # the rows of a step
    local_eval = LocalRows.of(prog.batch, args.batch_size)
    schedule = make_schedule(optim)
    try:
        base = _load_base(plan, prog)
    except ValueError as err:  # e.g. a tensor holding NaN: nothing to train on
        raise guards.RunError(f"--model {str(plan.model_dir)!r}: {err}") from None
    key_init, key_dropout = jax.random.split(jax.random.key(args.seed))
    adapters, base = init_run_adapters(plan, prog, base, key_init)
    samples = Samples(plan, getattr(args, "samples", 0))
    samples.run_before(adapters, base)  # the initial adapters, on a resumed run too
    opt_state = prog.init_state(adapters)
    evaluate = Evaluator(prog, plan.eval_rows, local_eval)

    losses: list[float] = []
    evals: list[list[float]] = []
    start_step = 0
    previous_seconds = 0.0
    manager = rl.CheckpointManager(
        out / "checkpoints", config=plan.lora_config, max_to_keep=args.keep
    )
    if args.resume:
        skipped: list[int] = []

        def report(step: int, problem: str) -> None:
            skipped.append(step)
            if lead:
                print(
                    f"{PROG}: checkpoint step {step} is damaged ({problem}); skipping it",
                    file=sys.stderr,
                    flush=True,
                )

        try:
            restored, opt_state, start_step, extra = manager.restore(
                rl.combine(adapters, base), opt_state, on_skip=report
            )
        except rl.CheckpointError as err:
            raise guards.RunError(f"--resume: {err}. Start the run over with --overwrite") from None
        for step in skipped:  # newer than the one restored: training writes them again
            manager.delete(step)  # every process (orbax synchronises them)
        adapters, _ = rl.split(restored)
        losses = [float(x) for x in extra.get("losses", [])]
        evals = [list(e) for e in extra.get("evals", [])]
        previous_seconds = float(extra.get("train_seconds", 0.0))
        say(f"resuming {out} at step {start_step} of {args.steps}")

    saved_steps = set(manager.all_steps())
    timer = {"train": 0.0, "steady": 0.0, "first": None}
    steady_tokens = 0

    def save(step: int) -> None:
        if step in saved_steps:
            return
        extra = {
            "losses": losses,
            "evals": evals,
            "train_seconds": previous_seconds + timer["train"],
        }
        with guards.writing(out / "checkpoints" / str(step), out):
            manager.save(step, rl.combine(adapters, base), opt_state, extra=extra, force=True)
            manager.wait_until_finished()
        saved_steps.add(step)

    def evaluated(step: int) -> list[float]:
        loss = evaluate(adapters, base)
        if not math.isfinite(loss):
            raise guards.RunError(
                f"the held-out loss at step {step} is {loss}: the model's outputs are not "
                f"finite (the base weights, or adapters that diverged; try a lower --lr); "
                f"{guards.last_checkpoint(out)}"
            )
        return [step, loss]

    n_adapter = rl.num_adapter_params(adapters)
    n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base, is_leaf=rl.is_quantized))
    quant = getattr(args, "quantize", "none")
    base_memory = f"{rl.base_bytes(base) / 2**20:,.1f} MiB" + (
        f" with {quant} kernels" if quant != "none" else ""
    )
    tokens_per_step = args.batch_size * accum * args.seq_len
    processes = f", {jax.process_count()} processes" if multi else ""
    say(
        f"model {plan.model_dir} ({n_base:,} parameters, frozen; {base_memory})\n"
        f"adapters: {n_adapter:,} parameters, {describe_adapters(plan)}\n"
        f"{_extras_line(plan)}{describe_data(plan)}\n"
        f"batch: {args.batch_size} rows x {args.grad_accum} micro-batch(es) of {args.seq_len} "
        f"tokens per optimizer step\ndevices: {dict(plan.mesh.shape)} "
        f"({plan.mesh.devices.flat[0].platform}{processes})"
    )
    trackers = (
        Trackers(plan.trackers, out, args_to_json(args), start_step)
        if lead and plan.trackers
        else None
    )
    setup_seconds = time.perf_counter() - t_start
    if not evals:
        evals.append(evaluated(0))
        say(f"held-out loss before training: {evals[0][1]:.4f}")
        if trackers is not None:
            trackers.log(0, {"eval/loss": evals[0][1]})

    stop = StopRequest(multi)
    flags = {False: prog.stop_flags(False), True: prog.stop_flags(True)}
    stop_all = False  # a Ctrl-C in any process, as the last step saw it
    rng = jax.jit(lambda k: k, out_shardings=prog.replicated)(key_dropout)
    batches = local.batches(plan.train_rows, seed=args.seed, start_step=start_step)
    step = start_step
    bar = (
        progress_bar(
            args.steps, initial=start_step, desc="fine-tuning", enabled=not args.no_progress
        )
        if lead
        else None
    )

    def stopping() -> bool:
        # One process stops on its own Ctrl-C; several stop together, on what the step said.
        return stop_all if multi else stop.requested

    try:
        with stop.installed():
            while step < args.steps and not stopping():
                batch = train_batch(next(batches), prog.train_batch, accum, args.batch_size)
                t0 = time.perf_counter()
                new_adapters, new_state, loss, grad_norm, any_stop = prog.train_step(
                    adapters,
                    opt_state,
                    base,
                    batch,
                    rng,
                    jnp.int32(step),
                    flags[stop.requested],
                )
                loss_value = float(loss)  # waits for the step
                if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
                    # Not applied: `adapters` and `opt_state` keep the last good step's values.
                    what = "loss" if not math.isfinite(loss_value) else "gradient"
                    raise guards.RunError(
                        f"step {step + 1}: the training {what} is not finite (loss "
                        f"{loss_value}, gradient norm {float(grad_norm)}); stopped without "
                        "applying it (diverging adapters: try a lower --lr or --max-grad-norm); "
                        f"{guards.last_checkpoint(out)}"
                    )
                stop_all = bool(any_stop)
                adapters, opt_state = new_adapters, new_state
                elapsed = time.perf_counter() - t0
                timer["train"] += elapsed
                if timer["first"] is None:
                    timer["first"] = elapsed  # includes compilation
                else:
                    steady_tokens += tokens_per_step
                    timer["steady"] += elapsed
                step += 1
                losses.append(loss_value)
                if step == start_step + 1 and lead:
                    log(bar, f"train loss at the first step: {loss_value:.4f}")
                if trackers is not None:
                    trackers.log(
                        step,
                        {
                            "train/loss": loss_value,
                            "train/learning_rate": float(schedule(step - 1)),
                            "train/grad_norm": float(grad_norm),
                            "train/tokens_per_second": tokens_per_step / elapsed,
                        },
                    )
                if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                    evals.append(evaluated(step))
                    if trackers is not None:
                        trackers.log(step, {"eval/loss": evals[-1][1]})
                if args.save_every and step % args.save_every == 0:
                    save(step)
                if bar is not None:
                    postfix = {"loss": f"{mean_tail(losses):.4f}"}
                    if timer["steady"]:
                        postfix["tok/s"] = f"{steady_tokens / timer['steady']:,.0f}"
                    if len(evals) > 1:
                        postfix["eval"] = f"{evals[-1][1]:.4f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
    except KeyboardInterrupt:
        if stop.requested or multi:
            raise  # a second Ctrl-C (or one outside the step loop's handler): no saving
        stop.requested = True  # no handler (not the main thread): stop and save
    finally:
        if bar is not None:
            bar.close()
    if stopping() and step < args.steps:
        if trackers is not None:
            trackers.close()
        save(step)
        manager.close()
        if lead:
            print(
                f"{PROG}: interrupted at step {step} of {args.steps}; checkpoint saved in "
                f"{out / 'checkpoints'}.\nContinue with: {PROG} --resume --out {out}",
                file=sys.stderr,
                flush=True,
            )
        return {"interrupted": True, "step": step, "out": str(out)}

    if not evals or evals[-1][0] != args.steps:
        evals.append(evaluated(args.steps))
        if trackers is not None:
            trackers.log(args.steps, {"eval/loss": evals[-1][1]})
    if trackers is not None:
        trackers.close()
    samples.run_after(adapters, base)
    save(args.steps)
    manager.close()
    t_export = time.perf_counter()
    written = write_outputs(plan, adapters, base, losses, evals)
    seconds = {
        "setup": setup_seconds,
        "first_step_with_compilation": timer["first"],
        "train_this_process": timer["train"],
        "train_total": previous_seconds + timer["train"],
        "export": time.perf_counter() - t_export,
        "total_this_process": time.perf_counter() - t_start,
    }
    metrics = build_metrics(
        plan,
        written,
        losses=losses,
        evals=evals,
        resumed_from_step=start_step if args.resume else None,
        tokens_per_step=tokens_per_step,
        tokens_per_second=steady_tokens / timer["steady"] if timer["steady"] else None,
        seconds=seconds,
        parameters={"base": n_base, "adapters": n_adapter},
    )
    metrics["samples"] = samples.records()
    if lead:
        with guards.writing(written["metrics"], out):
            write_metrics(metrics, written["metrics"], out)
    barrier("rslora-finetune: outputs written")
    return metrics


def _extras_line(plan: Plan) -> str:
    """What is trained beside the adapters (--modules-to-save, --train-tokens, --bias)."""
    cfg, parts = plan.lora_config, []
    if cfg.modules_to_save:
        parts.append(f"modules {', '.join(cfg.modules_to_save)} in full")
    if plan.token_ids:
        grown = f", vocabulary {plan.vocab_from} -> {plan.model_config.vocab_size}"
        parts.append(f"token rows {list(plan.token_ids)}{grown if plan.vocab_from else ''}")
    if cfg.bias != "none":
        parts.append(f"biases ({cfg.bias})")
    return f"also trained: {'; '.join(parts)}\n" if parts else ""


def _load_base(plan: Plan, prog: Program) -> PyTree:
    """The base on the run's shardings; with --train-tokens, grown to the larger vocabulary
    (new rows: the mean of the others, `rslora_jax.hf.resize_vocab`)."""
    from rslora_jax.hf import load_pretrained, resize_vocab
    from rslora_jax.models.decoder import init_params
    from rslora_jax.models.sharding import param_specs

    args = plan.args
    shardings = prog.load_base  # the plain base (before --quantize)
    original = plan.model_config
    if plan.vocab_from is not None:  # the checkpoint's shapes, on the same mesh
        original = plan.model_config.replace(vocab_size=plan.vocab_from)
        abstract = jax.eval_shape(lambda k: init_params(original, k), jax.random.key(0))
        shardings = named(plan.mesh, param_specs(abstract, tuple(plan.mesh.shape)))
    _, base = load_pretrained(
        plan.model_dir,
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        scan_layers=True,
        shardings=shardings,
        remat=args.remat,
        transform=_quantizer(args, plan.lora_config),
    )
    if plan.vocab_from is None:
        return base
    size = plan.model_config.vocab_size  # the tables are never quantized (not "all-linear")
    return jax.jit(lambda p: resize_vocab(p, original, size)[0], out_shardings=prog.base)(base)


def init_run_adapters(
    plan: Plan, prog: Program, base: PyTree, key: jax.Array
) -> tuple[PyTree, PyTree]:
    """The run's initial adapters, and its base (PiSSA / OLoRA change it: ``W - gamma*A@B``).

    Created in place, sharded: every process computes its own shards of the same values. With
    ``--layers`` and a method with shared pools (RaSA), the other layers' per-layer entries
    start at zero, so the pool adds nothing to them (`rslora_jax.cli.finetune.adapters`).
    """
    config = plan.lora_config
    if config.base_modifying_init:
        adapters, base = jax.jit(
            lambda b, k: rl.principal_init(b, config, k),
            out_shardings=(prog.adapters, prog.base),
        )(base, key)
    else:
        # The base is an argument (DoRA reads the kernels for its magnitudes; the others only
        # their shapes).
        adapters = jax.jit(
            lambda b, k: rl.init_adapters(b, config, k), out_shardings=prog.adapters
        )(base, key)
        if plan.layers is not None and config.method.shared_key is not None:
            masks = plan.layers.masks(adapters)
            adapters = jax.jit(lambda a: plan.layers.apply(a, masks), out_shardings=prog.adapters)(
                adapters
            )
    return adapters, base


def describe_adapters(plan: Plan) -> str:
    """The adapters in one line: method, rank, alpha, scale, init, targets, layers."""
    args, config = plan.args, plan.lora_config
    method = config.method
    if method.name == "rasa":
        what = f"RaSA (k {method.k or max(args.rank // 8, 1)}, {method.init} diagonal)"
    else:
        scale = config.scale_for("model/layers/self_attn/q_proj")
        title = {"lora": "LoRA", "dora": "DoRA"}.get(method.name, method.name)
        what = f"{title} {args.scaling} (scale {scale:.4g})"
    extra = [f"init {config.init.spec}"] if config.init.spec != "kaiming_uniform" else []
    if args.lora_plus_ratio:
        extra.append(f"LoRA+ ratio {args.lora_plus_ratio:g}")
    if args.rank_pattern:
        extra.append(f"rank pattern {args.rank_pattern}")
    if args.alpha_pattern:
        extra.append(f"alpha pattern {args.alpha_pattern}")
    if plan.layers is not None:
        extra.append(f"trained: {plan.layers.describe()}")
    return f"{what}, rank {args.rank}, alpha {args.alpha:g}, targets {args.targets}" + "".join(
        f", {e}" for e in extra
    )


def describe_data(plan: Plan) -> str:
    """The data in a few lines: source, formats, template, masking, packing, cut-off answers."""
    args, run = plan.args, plan.run_data
    if run is None:
        return f"data: {plan.data_description}"
    formats = ", ".join(f"{n} {k}" for k, n in sorted(run.formats.items()))
    lines = [f"data: {run.description} ({formats} rows)"]
    if run.chat_template is not None:
        lines.append(f"  chat template: {run.chat_template}")
    lines.append(
        "  loss on: "
        + ("every token (--train-on-prompt)" if args.train_on_prompt else "answers only")
        + f"; {'one example per row' if args.no_packing else 'packed, attention kept per example'}"
    )
    lines.append(f"  training: {run.train_stats.describe()}")
    lines.append(f"  held-out: {run.eval_stats.describe()}; {len(run.eval_rows)} rows evaluated")
    return "\n".join(lines)


def _quantizer(args: Any, lora_config: rl.LoraConfig) -> Any:
    """The loader's per-tensor transform for ``--quantize`` (None for ``none``)."""
    from rslora_jax.ops.quantize import loader_transform

    scheme = getattr(args, "quantize", "none")
    return None if scheme == "none" else loader_transform(scheme, config=lora_config)


def _silent(*args: Any, **kwargs: Any) -> None:
    """`print` for the processes other than process 0."""
