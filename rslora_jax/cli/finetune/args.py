"""The command line of ``rslora-finetune``: the parser, `parse_args`, and run.json <-> arguments.

A run's arguments are written to ``<out>/run.json`` (`args_to_json`); ``--resume`` reads them
back (`args_from_json`) as the defaults of the resumed run, refusing to change those that define
the training trajectory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rslora_jax.cli.common import (
    DTYPES,
    ArgumentParser,
    HelpFormatter,
    UsageError,
    float_in,
    nonnegative_int,
    positive_int,
)
from rslora_jax.cli.finetune.config_file import config_tokens, find_config
from rslora_jax.cli.finetune.options import (
    BUILTIN_PREFIX,
    add_data_options,
    add_method_options,
    add_output_options,
    add_training_options,
    data_entry,
)
from rslora_jax.core.config import ALL_LINEAR
from rslora_jax.ops.quantize import CHOICES as QUANTIZE_CHOICES

PROG = "rslora-finetune"
#: The built-in base model (config.json, model.safetensors, tokenizer files).
DEFAULT_MODEL: Path = Path(__file__).resolve().parents[2] / "assets" / "base"
#: Where runs go when ``--out`` is not given: ``runs/rslora-<date>-<time>`` (relative to the cwd).
RUNS_DIR = Path("runs")
SCHEDULES = ("constant", "cosine", "linear")
# Arguments of one launch, not of the run: --resume does not read them back from run.json.
LAUNCH_ARGS = (
    "resume",
    "no_progress",
    "coordinator",
    "num_processes",
    "process_id",
    "distributed",
    "cpu_devices",
    "config",
    "connect_timeout",
    "overwrite",
)
# Arguments that define the training trajectory: --resume refuses to change them.
TRAJECTORY_ARGS = (
    "model",
    "tokenizer",
    "text_field",
    "eval_fraction",
    "rank",
    "alpha",
    "scaling",
    "targets",
    "lora_dropout",
    "modules_to_save",
    "train_tokens",
    "bias",
    "lr",
    "schedule",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "batch_size",
    "seq_len",
    "seed",
    "dtype",
    "param_dtype",
    "quantize",
    # instruction tuning and methods (issue 13)
    "data_format",
    "chat_template",
    "train_on_prompt",
    "no_packing",
    "method",
    "rasa_k",
    "rasa_init",
    "init",
    "lora_plus_ratio",
    "rank_pattern",
    "alpha_pattern",
    "layers",
    "grad_accum",
)


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (its errors raise `UsageError`)."""
    p = ArgumentParser(
        prog=PROG,
        description="Fine-tune a causal LM with rank-stabilised LoRA (rsLoRA) adapters.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Hugging Face checkpoint directory (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3: "
        "config.json + safetensors); default: the built-in base model",
    )
    g.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer directory; default: --model"
    )
    g.add_argument(
        "--data",
        type=data_entry,
        nargs="+",
        default=None,
        help="data files: JSON Lines (.jsonl), JSON arrays (.json) or Parquet with rows "
        "'messages' (chat), 'prompt'+'completion', 'instruction'(+'input')+'output' (Alpaca) or "
        "'text'; any other file is one plain-text document; or a built-in set: builtin:instruct "
        "(questions on standard-library APIs answered from their docstrings, chat rows) or "
        "builtin:code (standard-library source, plain text). Default: builtin:instruct",
    )
    g.add_argument("--text-field", default="text", help="field holding the text of text rows")
    add_data_options(g)
    g.add_argument(
        "--eval-fraction",
        type=float_in(0.0, 1.0, high_open=True),
        default=0.05,
        help="fraction of the sequences (the last ones) held out for evaluation",
    )
    g.add_argument(
        "--eval-rows",
        type=nonnegative_int,
        default=64,
        help="evaluate on at most this many held-out sequences (0: all)",
    )
    g.add_argument(
        "--samples",
        type=nonnegative_int,
        default=3,
        help="greedy completions of this many held-out prompts before and after training, in "
        "the summary and metrics.json (0: none)",
    )
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=positive_int, default=16, help="adapter rank r")
    g.add_argument(
        "--alpha", type=float_in(0.0, math.inf, high_open=True), default=16.0, help="alpha"
    )
    g.add_argument(
        "--scaling",
        choices=("rslora", "lora"),
        default="rslora",
        help="adapter scale: alpha/sqrt(r) (rsLoRA) or alpha/r (LoRA)",
    )
    g.add_argument(
        "--targets",
        default=ALL_LINEAR,
        help="adapted layers: 'all-linear', a comma list of module names (e.g. q_proj,v_proj), "
        "or a regex fullmatched against paths such as model/layers/self_attn/q_proj (e.g. "
        "'.*self_attn/(q|v)_proj')",
    )
    g.add_argument(
        "--lora-dropout",
        type=float_in(0.0, 1.0, low_open=False, high_open=True),
        default=0.0,
        help="dropout on the adapters' input",
    )
    add_method_options(g)
    g.add_argument(
        "--modules-to-save",
        default=None,
        help="comma list of modules trained in full beside the adapters (PEFT's modules_to_save: "
        "a module whose path ends with a name, e.g. lm_head,model.norm)",
    )
    g.add_argument(
        "--train-tokens",
        default=None,
        help="comma list of new special tokens (e.g. '<|user|>,<|assistant|>'): added to the "
        "tokenizer, with new embedding and LM-head rows (the mean of the others) that are "
        "trained (PEFT's trainable_token_indices); the merged model has the larger vocabulary",
    )
    g.add_argument(
        "--bias",
        choices=("none", "all", "lora_only"),
        default="none",
        help="train biases too (PEFT's bias): all of them, or those of the adapted layers",
    )
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=200, help="optimizer steps")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="rows per micro-batch (rows per optimizer step: --batch-size x --grad-accum)",
    )
    add_training_options(g)
    g.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence")
    g.add_argument(
        "--lr", type=float_in(0.0, math.inf, high_open=True), default=2e-3, help="learning rate"
    )
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning-rate schedule")
    g.add_argument(
        "--warmup-steps",
        type=nonnegative_int,
        default=None,
        help="linear warmup steps; default: min(10, steps // 10)",
    )
    g.add_argument(
        "--weight-decay",
        type=float_in(0.0, math.inf, low_open=False, high_open=True),
        default=0.0,
        help="AdamW weight decay (on the adapters)",
    )
    g.add_argument(
        "--max-grad-norm",
        type=float_in(0.0, math.inf, low_open=False, high_open=True),
        default=1.0,
        help="clip the adapters' gradient to this global norm (0: no clipping)",
    )
    g.add_argument("--seed", type=nonnegative_int, default=0, help="adapter init and data order")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (activations)")
    g.add_argument(
        "--param-dtype", choices=DTYPES, default="float32", help="dtype of the frozen base"
    )
    g.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="store the frozen base's targeted kernels quantized (QLoRA): int8 (per output "
        "channel), nf4 (4-bit NormalFloat, blocks of 64), fp8 (e4m3); quantized while loading, "
        "dequantized per layer in the forward pass; embeddings, norms and lm_head stay in "
        "--param-dtype",
    )
    g.add_argument("--remat", action="store_true", help="recompute layer activations (memory)")
    g.add_argument(
        "--remat-policy",
        default=None,
        metavar="NAME",
        help="what --remat keeps of a layer for the backward pass: a jax.checkpoint_policies "
        "name (default dots_with_no_batch_dims_saveable: the matmul outputs, fastest; "
        "nothing_saveable: only the layer's input, least memory); implies --remat",
    )
    g.add_argument(
        "--loss-chunk",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="compute the loss N positions at a time inside the model, each chunk "
        "rematerialised, so the (rows, seq, vocab) logits are never held whole (large "
        "vocabularies); 0 (default): all at once",
    )
    g.add_argument(
        "--forward",
        choices=("auto", "fused", "factored"),
        default="auto",
        help="how adapted layers are computed (rslora_jax.lora's mode): fused = one matmul with "
        "W + gamma*A@B per step and low-rank gradients; factored = x@W + gamma*(x@A)@B; auto "
        "(default) picks per layer by a cost rule (fused at training batch sizes)",
    )
    g.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. 'data=2,model=4' (axes: data, fsdp, model; the sizes must "
        "multiply to the number of devices); default: one device",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: runs/rslora-<date>-<time>; with --resume: the "
        "newest run under runs/)",
    )
    g.add_argument(
        "--save-every",
        type=nonnegative_int,
        default=50,
        help="save a checkpoint every N steps (0: only at the end and on Ctrl-C)",
    )
    g.add_argument("--keep", type=positive_int, default=2, help="checkpoints to keep")
    g.add_argument(
        "--eval-every",
        type=nonnegative_int,
        default=50,
        help="held-out loss every N steps (0: only before and after training)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (arguments not given are "
        "read from its run.json)",
    )
    g.add_argument(
        "--merged-dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="dtype of the merged checkpoint (auto: that of the --model checkpoint)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out replace what is there: a finished or interrupted run, or adapters/, "
        "peft/, merged/ ... that this command did not write",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_options(g)
    g = p.add_argument_group(
        "multi-process (jax.distributed: start the same command in every process)"
    )
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=None,
        help="address of process 0's coordination service, reachable by every process "
        "(with --num-processes and --process-id)",
    )
    g.add_argument(
        "--num-processes", metavar="N", type=positive_int, default=None, help="number of processes"
    )
    g.add_argument(
        "--process-id",
        metavar="I",
        type=nonnegative_int,
        default=None,
        help="this process's index",
    )
    g.add_argument(
        "--distributed",
        choices=("auto",),
        default=None,
        help="'auto': a bare jax.distributed.initialize(), which finds the coordinator, "
        "process count and index on TPU pods, under SLURM and under Open MPI",
    )
    g.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        type=positive_int,
        default=300,
        help="stop with a message if not every process has joined within this many seconds",
    )
    g.add_argument(
        "--cpu-devices",
        metavar="K",
        type=positive_int,
        default=None,
        help="run on this many CPU devices per process (for testing a multi-device or "
        "multi-process setup on one machine; CPU collectives: gloo)",
    )
    return p


def args_to_json(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON values (paths absolute), as run.json and metrics.json hold them.

    Example:
      >>> args_to_json(build_parser().parse_args(["--rank", "4"]))["rank"]
      4
    """
    out = {}
    for key, val in vars(args).items():
        if isinstance(val, Path):
            val = str(val.expanduser().absolute())
        elif isinstance(val, list):
            val = [
                v if str(v).startswith(BUILTIN_PREFIX) else str(Path(v).expanduser().absolute())
                for v in val
            ]
        out[key] = val
    return out


def args_from_json(saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `args_to_json`: run.json's arguments, with paths as `Path` again.

    Example:
      >>> saved = args_from_json({"model": "/models/llama", "rank": 4})
      >>> saved["model"].name, saved["rank"]
      ('llama', 4)
    """
    out = dict(saved)
    for key in ("model", "tokenizer", "out", "chat_template", "config"):
        if out.get(key) is not None:
            out[key] = Path(out[key])
    if out.get("data") is not None:
        out["data"] = [data_entry(p) for p in out["data"]]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line; with ``--resume``, missing arguments come from the run's run.json.

    With ``--config FILE`` the file's flags come first and the command line overrides them
    (`rslora_jax.cli.finetune.config_file`).

    Raises:
      UsageError: for bad arguments, or ``--resume`` without a run to resume.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    config = find_config(argv)
    if config is not None:  # the file's flags first: the command line overrides them
        argv = config_tokens(parser, config) + argv
    args = parser.parse_args(argv)
    if not args.resume:
        if args.warmup_steps is None:
            args.warmup_steps = min(10, args.steps // 10)
        return args
    out = args.out if args.out is not None else _newest_run()
    run_file = out / "run.json"
    if not run_file.is_file():
        raise UsageError(
            f"--resume: {str(out)!r} holds no run to resume (no run.json); give the --out of "
            "an interrupted run"
        )
    saved = json.loads(run_file.read_text(encoding="utf-8"))["args"]
    defaults = args_from_json(saved)
    for key in LAUNCH_ARGS:  # not the run's: this invocation's
        defaults.pop(key, None)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.out = out
    changed = {
        k: (defaults.get(k), getattr(args, k))
        for k in TRAJECTORY_ARGS
        if _normalise(defaults.get(k)) != _normalise(getattr(args, k))
    }
    if args.schedule != "constant" and defaults.get("steps") != args.steps:
        changed["steps"] = (defaults.get("steps"), args.steps)
    if changed:
        shown = ", ".join(
            f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changed.items()
        )
        raise UsageError(
            f"--resume: these arguments differ from the interrupted run's ({shown}); a resumed "
            "run must train the same way. Drop them (they are read from run.json) or start a "
            "new run with another --out"
        )
    return args


def _normalise(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.expanduser().absolute())
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def _newest_run() -> Path:
    runs = [p for p in RUNS_DIR.glob("rslora-*") if (p / "run.json").is_file()]
    if not runs:
        raise UsageError(
            f"--resume without --out: no run under {str(RUNS_DIR.absolute())!r}; pass the --out "
            "of the run to resume"
        )
    return max(runs, key=lambda p: (p / "run.json").stat().st_mtime)
