"""The fine-tuning command: ``python -m rslora_jax.finetune`` (console script ``rslora-finetune``).

Fine-tunes a Llama-family causal LM (a Hugging Face checkpoint directory: Llama, Mistral,
Qwen2 in safetensors) with rsLoRA adapters and leaves in ``--out`` everything needed to serve the
result or to continue it::

    adapters/       the adapter checkpoint (`rslora_jax.load_adapters`)
    peft/           the adapter in PEFT's format (``peft.PeftModel.from_pretrained``)
    merged/         adapters merged into the base, with the tokenizer: a Hugging Face model dir
    checkpoints/    adapters + optimizer state + step, for ``--resume``
    loss.png        training and held-out loss curves
    metrics.json    losses, held-out losses, tokens/s, timings and the full configuration
    run.json        the arguments of the run (``--resume`` reads them back)

With no arguments it runs offline on a CPU in a few minutes: the built-in base model
(``rslora_jax/assets/base``: a 3.7M-parameter Llama pretrained on CPython's help topics and
standard-library code, made by ``scripts/pretrain_base.py``) fine-tuned on the built-in corpus
(the source of the standard-library modules in `rslora_jax.data.FINETUNE_MODULES`, held out
from pretraining; the last 5% of its sequences are the held-out evaluation set).

The training step runs ``rslora_jax.lora(model.apply, config)`` (``mode="auto"``: at training
batch sizes each projection is one matmul with ``W + gamma*A@B`` formed per step and low-rank
adapter gradients, `rslora_jax.fused`), differentiated with respect to the adapters only
(`split` / `combine`), with AdamW through
`rslora_jax.optimizer`. ``--mesh data=2,model=4`` runs on several devices: the batch is split
over ``data`` (and ``fsdp``) and the base is sharded FSDP-style over ``fsdp`` and
tensor-parallel over ``model``; the adapters follow the base (`rslora_jax.partition_specs`).

Batches are a function of (seed, step) (`rslora_jax.data.batch_iterator`) and the dropout key is
``fold_in(key, step)``, so ``--resume`` continues an interrupted run exactly where it stopped:
on CPU the adapters after resuming are bit-identical to those of an uninterrupted run. Ctrl-C
finishes the current step, saves a checkpoint and exits with status 130 (a second Ctrl-C aborts
at once). Every input is checked before any weight is read or anything is compiled; a bad one
stops the command with exit status 2 and a message that says what to fix.

Several processes (hosts) run one job under JAX's distributed runtime: start the same command in
every process with ``--coordinator HOST:PORT --num-processes N --process-id I`` (or
``--distributed auto`` on TPU pods, SLURM and Open MPI). The mesh then spans the devices of all
processes, each process materialises only its own rows of every global batch, checkpoints are
written and restored by all processes together, and process 0 writes the exports, the metrics
and the progress bar. A Ctrl-C in any process stops all of them after the next step, with one
checkpoint. The numbers do not depend on the number of processes: a run on 2
processes x 2 devices computes the losses and adapters of a run on 1 process x 4 devices
(``docs/multihost.md``, "The fine-tuning command").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax import data, distributed
from rslora_jax._types import PyTree
from rslora_jax.config import ALL_LINEAR
from rslora_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss, init_params

PROG = "rslora-finetune"
#: The built-in base model (config.json, model.safetensors, tokenizer files).
DEFAULT_MODEL: Path = Path(__file__).resolve().parent / "assets" / "base"
#: Where runs go when ``--out`` is not given: ``runs/rslora-<date>-<time>`` (relative to the cwd).
RUNS_DIR = Path("runs")
MESH_AXES = ("data", "fsdp", "model")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Projections whose output features are split over the "model" axis (column-parallel), and
# those whose input features are (row-parallel).
_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_ROW_PARALLEL = ("o_proj", "down_proj")
# Arguments of one launch, not of the run: --resume does not read them back from run.json.
_LAUNCH_ARGS = (
    "resume",
    "no_progress",
    "coordinator",
    "num_processes",
    "process_id",
    "distributed",
    "cpu_devices",
)
# Arguments that define the training trajectory: --resume refuses to change them.
_TRAJECTORY_ARGS = (
    "model",
    "tokenizer",
    "text_field",
    "eval_fraction",
    "rank",
    "alpha",
    "scaling",
    "targets",
    "lora_dropout",
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
)


class UsageError(ValueError):
    """Bad input to the command: reported as ``rslora-finetune: error: ...``, exit status 2."""


# --------------------------------------------------------------------------------------------
# Arguments


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help  # no "(default: None)"
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors go through UsageError too
        raise UsageError(message)


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _float_in(
    low: float, high: float, *, low_open: bool = True, high_open: bool = False
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(
                f"expected a number in {lo}{low}, {high}{hi}, got {text!r}"
            )
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (its errors raise `UsageError`)."""
    p = _Parser(
        prog=PROG,
        description="Fine-tune a causal LM with rank-stabilised LoRA (rsLoRA) adapters.",
        formatter_class=_Help,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Hugging Face checkpoint directory (Llama/Mistral/Qwen2, config.json + "
        "safetensors); default: the built-in base model",
    )
    g.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer directory; default: --model"
    )
    g.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=None,
        help="plain-text files (one document each) or JSON Lines files (.jsonl: 'text', "
        "'prompt'+'completion' or 'instruction'+'output'); default: the built-in corpus "
        "(source code of standard-library modules, rslora_jax.data.FINETUNE_MODULES)",
    )
    g.add_argument("--text-field", default="text", help="JSONL field holding the text")
    g.add_argument(
        "--eval-fraction",
        type=_float_in(0.0, 1.0, high_open=True),
        default=0.05,
        help="fraction of the sequences (the last ones) held out for evaluation",
    )
    g.add_argument(
        "--eval-rows",
        type=_nonnegative_int,
        default=64,
        help="evaluate on at most this many held-out sequences (0: all)",
    )
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=_positive_int, default=16, help="adapter rank r")
    g.add_argument(
        "--alpha", type=_float_in(0.0, math.inf, high_open=True), default=16.0, help="alpha"
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
        help="adapted layers: 'all-linear' or a comma list of module names (e.g. q_proj,v_proj)",
    )
    g.add_argument(
        "--lora-dropout",
        type=_float_in(0.0, 1.0, low_open=False, high_open=True),
        default=0.0,
        help="dropout on the adapters' input",
    )
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps")
    g.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per step")
    g.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence")
    g.add_argument(
        "--lr", type=_float_in(0.0, math.inf, high_open=True), default=2e-3, help="learning rate"
    )
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning-rate schedule")
    g.add_argument(
        "--warmup-steps",
        type=_nonnegative_int,
        default=None,
        help="linear warmup steps; default: min(10, steps // 10)",
    )
    g.add_argument(
        "--weight-decay",
        type=_float_in(0.0, math.inf, low_open=False, high_open=True),
        default=0.0,
        help="AdamW weight decay (on the adapters)",
    )
    g.add_argument(
        "--max-grad-norm",
        type=_float_in(0.0, math.inf, low_open=False, high_open=True),
        default=1.0,
        help="clip the adapters' gradient to this global norm (0: no clipping)",
    )
    g.add_argument("--seed", type=_nonnegative_int, default=0, help="adapter init and data order")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (activations)")
    g.add_argument(
        "--param-dtype", choices=DTYPES, default="float32", help="dtype of the frozen base"
    )
    g.add_argument("--remat", action="store_true", help="recompute layer activations (memory)")
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
        type=_nonnegative_int,
        default=50,
        help="save a checkpoint every N steps (0: only at the end and on Ctrl-C)",
    )
    g.add_argument("--keep", type=_positive_int, default=2, help="checkpoints to keep")
    g.add_argument(
        "--eval-every",
        type=_nonnegative_int,
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
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        "--num-processes", metavar="N", type=_positive_int, default=None, help="number of processes"
    )
    g.add_argument(
        "--process-id",
        metavar="I",
        type=_nonnegative_int,
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
        "--cpu-devices",
        metavar="K",
        type=_positive_int,
        default=None,
        help="run on this many CPU devices per process (for testing a multi-device or "
        "multi-process setup on one machine; CPU collectives: gloo)",
    )
    return p


def _args_to_json(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for key, val in vars(args).items():
        if isinstance(val, Path):
            val = str(val.expanduser().absolute())
        elif isinstance(val, list):
            val = [str(Path(v).expanduser().absolute()) for v in val]
        out[key] = val
    return out


def _args_from_json(saved: dict[str, Any]) -> dict[str, Any]:
    out = dict(saved)
    for key in ("model", "tokenizer", "out"):
        if out.get(key) is not None:
            out[key] = Path(out[key])
    if out.get("data") is not None:
        out["data"] = [Path(p) for p in out["data"]]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line; with ``--resume``, missing arguments come from the run's run.json.

    Raises:
      UsageError: for bad arguments, or ``--resume`` without a run to resume.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
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
    defaults = _args_from_json(saved)
    for key in _LAUNCH_ARGS:  # not the run's: this invocation's
        defaults.pop(key, None)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.out = out
    changed = {
        k: (defaults.get(k), getattr(args, k))
        for k in _TRAJECTORY_ARGS
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


# --------------------------------------------------------------------------------------------
# Several processes: jax.distributed


def _check_distributed(args: argparse.Namespace) -> None:
    """Checks the multi-process arguments; reads nothing and touches no JAX state.

    Raises:
      UsageError: for an incomplete or inconsistent ``--coordinator`` / ``--num-processes`` /
        ``--process-id`` / ``--distributed`` set, or a ``--batch-size`` that the processes
        cannot share.

    Example:
      >>> _check_distributed(build_parser().parse_args(["--coordinator", "10.0.0.1:1234",
      ...     "--num-processes", "2", "--process-id", "1"]))
    """
    given = {
        "--coordinator": args.coordinator,
        "--num-processes": args.num_processes,
        "--process-id": args.process_id,
    }
    present = [flag for flag, value in given.items() if value is not None]
    if args.distributed == "auto":
        if present:
            raise UsageError(
                f"--distributed auto finds the coordinator, process count and index itself: "
                f"drop {', '.join(present)} (or drop --distributed auto and give all three)"
            )
        return
    if not present:
        return
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise UsageError(
            f"{', '.join(present)} without {', '.join(missing)}: a multi-process run needs "
            "--coordinator HOST:PORT, --num-processes N and --process-id I in every process "
            "(or --distributed auto on TPU pods, SLURM and Open MPI)"
        )
    host, sep, port = args.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(
            f"--coordinator {args.coordinator!r}: expected HOST:PORT with a port in 1..65535 "
            "(e.g. 10.0.0.1:1234, the address of process 0)"
        )
    if args.process_id >= args.num_processes:
        raise UsageError(
            f"--process-id {args.process_id} must be smaller than --num-processes "
            f"{args.num_processes} (process ids are 0 .. {args.num_processes - 1})"
        )
    if args.batch_size % args.num_processes:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by --num-processes "
            f"{args.num_processes}: every process holds an equal share of each global batch"
        )


def _start_runtime(args: argparse.Namespace) -> None:
    """Applies ``--cpu-devices`` and joins the distributed runtime if asked to."""
    multi = args.distributed == "auto" or args.coordinator is not None
    try:
        if args.cpu_devices is not None:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        if multi and args.cpu_devices is not None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except RuntimeError as err:  # JAX already started (an in-process call)
        raise UsageError(f"--cpu-devices {args.cpu_devices}: {err}") from None
    if not multi:
        return
    try:
        if args.distributed == "auto":
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(
                args.coordinator, num_processes=args.num_processes, process_id=args.process_id
            )
    except (RuntimeError, ValueError) as err:
        where = (
            "--distributed auto"
            if args.distributed == "auto"
            else f"--coordinator {args.coordinator} (process {args.process_id} of "
            f"{args.num_processes})"
        )
        raise UsageError(f"{where}: could not join the distributed runtime: {err}") from None


def _stop_runtime() -> None:
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def _broadcast_text(text: str) -> str:
    """Process 0's `text` (of the same length in every process), in every process."""
    from jax.experimental import multihost_utils

    codes = np.frombuffer(text.encode("ascii"), np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(codes))).decode("ascii")


def _agree(error: UsageError | None) -> None:
    """Stops every process if any rejected the input (all reach this point, then all exit 2).

    Raises:
      UsageError: this process's own error, or one that names the process that failed.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
        raise error
    bad = [int(i) for i in np.flatnonzero(failed)]
    if bad:
        raise UsageError(
            f"process {bad[0]} of {jax.process_count()} rejected the input (see its message); "
            "every process stops"
        )


# --------------------------------------------------------------------------------------------
# Validation: everything is checked before weights are read or anything is compiled


@dataclasses.dataclass
class Plan:
    """A validated run: what `train` needs, built by `prepare` without reading any weight."""

    args: argparse.Namespace
    out: Path
    model_dir: Path
    hf_config: Any
    model_config: LlamaConfig
    tokenizer: Any
    tokenizer_dir: Path
    data_description: str
    data_sha256: str
    train_rows: np.ndarray
    eval_rows: np.ndarray
    lora_config: rl.LoraConfig
    mesh: Mesh
    merged_dtype: str
    export_peft: Any


def _check_out(args: argparse.Namespace) -> tuple[Path, bool]:
    """The output directory, created and probed for writing; and whether it was created."""
    out = args.out if args.out is not None else RUNS_DIR / time.strftime("rslora-%Y%m%d-%H%M%S")
    out = out.expanduser().absolute()
    if args.resume:
        if not _checkpoint_steps(out / "checkpoints"):
            raise UsageError(
                f"--resume: no checkpoint under {str(out / 'checkpoints')!r}; the run was "
                "interrupted before its first checkpoint: start it again without --resume"
            )
    elif (out / "run.json").exists() or (out / "checkpoints").exists():
        raise UsageError(
            f"--out {str(out)!r} already holds a fine-tuning run: pass --resume to continue it, "
            "or choose another --out"
        )
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UsageError(
            f"--out {str(out)!r}: cannot write there ({err.strerror or err}); choose a writable "
            "directory"
        ) from None
    return out, not existed


def _checkpoint_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _check_model(args: argparse.Namespace) -> tuple[Path, Any, LlamaConfig]:
    from rslora_jax.hf import load_config

    model_dir = (args.model if args.model is not None else DEFAULT_MODEL).expanduser().absolute()
    what = f"--model {str(model_dir)!r}"
    if not model_dir.is_dir():
        raise UsageError(
            f"{what}: no such directory; give a Hugging Face checkpoint directory "
            "(config.json + model.safetensors)"
        )
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{what}: no config.json; is this a Hugging Face checkpoint directory?")
    try:
        hf_config = load_config(model_dir)
        model_config = LlamaConfig.from_hf(
            hf_config,
            dtype=args.dtype,
            param_dtype=args.param_dtype,
            scan_layers=True,
            remat=args.remat,
        )
    except (ValueError, OSError, TypeError, KeyError) as err:
        raise UsageError(f"{what}: {err}") from None
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not any((model_dir / w).is_file() for w in weights):
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (
            f" (it has PyTorch pickles {pickles}: convert them to safetensors with "
            "transformers' save_pretrained(..., safe_serialization=True))"
            if pickles
            else ""
        )
        raise UsageError(f"{what}: no model.safetensors or model.safetensors.index.json{hint}")
    return model_dir, hf_config, model_config


def _check_tokenizer(args: argparse.Namespace, model_dir: Path) -> tuple[Path, Any]:
    from rslora_jax.hf import load_tokenizer

    tok_dir = (args.tokenizer if args.tokenizer is not None else model_dir).expanduser().absolute()
    flag = "--tokenizer" if args.tokenizer is not None else "--model"
    files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not tok_dir.is_dir() or not any((tok_dir / f).is_file() for f in files):
        raise UsageError(
            f"{flag} {str(tok_dir)!r}: no tokenizer files (tokenizer.json, tokenizer.model, ...); "
            "pass --tokenizer DIR"
        )
    try:
        tokenizer = load_tokenizer(tok_dir)
    except Exception as err:  # a third-party loader: report whatever it says
        raise UsageError(f"{flag} {str(tok_dir)!r}: the tokenizer does not load: {err}") from None
    return tok_dir, tokenizer


def _check_data(
    args: argparse.Namespace, tokenizer: Any, config: LlamaConfig
) -> tuple[str, str, np.ndarray, np.ndarray]:
    if args.seq_len > config.max_position_embeddings:
        raise UsageError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings}); lower --seq-len"
        )
    if args.data:
        try:
            documents = data.load_texts(args.data, text_field=args.text_field)
        except ValueError as err:
            raise UsageError(f"--data: {err}") from None
        description = ", ".join(str(p) for p in args.data)
    else:
        documents = data.stdlib_finetune_documents()
        description = (
            f"built-in: source of {len(data.FINETUNE_MODULES)} standard-library modules "
            "(rslora_jax.data.FINETUNE_MODULES)"
        )
    try:
        rows = data.tokenize_and_pack(documents, tokenizer, args.seq_len)
    except ValueError as err:
        raise UsageError(f"--data: {err}") from None
    if int(rows.max()) >= config.vocab_size:
        raise UsageError(
            f"the tokenizer produces token id {int(rows.max())}, but the model's vocabulary has "
            f"{config.vocab_size} entries: pass the --tokenizer that belongs to --model"
        )
    if rows.shape[0] < 2:
        raise UsageError(
            f"--data: {rows.shape[0]} sequence of --seq-len {args.seq_len} + 1 tokens; at least "
            "2 are needed (training and held-out): add data or lower --seq-len"
        )
    train, held = data.split_sequences(rows, args.eval_fraction)
    if args.eval_rows:
        held = held[: args.eval_rows]
    sha = hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()
    return description, sha, train, held


def _check_lora(args: argparse.Namespace, abstract_base: PyTree) -> tuple[rl.LoraConfig, PyTree]:
    if args.targets.strip() == ALL_LINEAR:
        targets: Any = ALL_LINEAR
    else:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        if not targets:
            raise UsageError(f"--targets {args.targets!r}: give 'all-linear' or module names")
    common = dict(
        targets=targets,
        scaling=args.scaling,
        alpha=args.alpha,
        dropout=args.lora_dropout,
        kernel_axes={"model/layers/.*": "lio"},  # scanned layers: (layer, in, out) kernels
    )
    key = jax.random.key(0)
    try:  # targets first (at rank 1), then the rank
        probe = rl.LoraConfig(rank=1, **common)
        jax.eval_shape(lambda k: rl.init_adapters(abstract_base, probe, k), key)
    except ValueError as err:
        raise UsageError(f"--targets {args.targets!r}: {err}") from None
    try:
        config = rl.LoraConfig(rank=args.rank, **common)
        abstract = jax.eval_shape(lambda k: rl.init_adapters(abstract_base, config, k), key)
    except ValueError as err:
        raise UsageError(f"--rank {args.rank}: {err}") from None
    return config, abstract


def parse_mesh(spec: str | None) -> dict[str, int]:
    """Parses ``--mesh`` ("data=2,model=4") into ``{"data": 2, "model": 4}``.

    Raises:
      UsageError: for unknown axes, repeated axes or sizes that are not positive integers.

    Example:
      >>> parse_mesh("data=2,model=4")
      {'data': 2, 'model': 4}
    """
    if spec is None:
        return {}
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = (s.strip() for s in part.partition("="))
        if not sep or name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise UsageError(
                f"--mesh {spec!r}: expected AXIS=SIZE,... with AXIS in {', '.join(MESH_AXES)} "
                f"and SIZE a positive integer (e.g. 'data=2,model=4'); got {part!r}"
            )
        if name in axes:
            raise UsageError(f"--mesh {spec!r}: axis {name!r} is given twice")
        axes[name] = int(size)
    return axes


def llama_specs(abstract: PyTree, axes: Sequence[str]) -> PyTree:
    """PartitionSpecs of a scanned Llama params tree over the mesh axes `axes`.

    ``fsdp`` splits every matrix on its hidden-size axis (ZeRO-3 style), ``model`` splits the
    q/k/v/gate/up projections (and an untied lm_head) on their outputs and o/down on their
    inputs (Megatron tensor parallelism) and the embedding on the vocabulary; norms are
    replicated. Axes not in `axes` are left out.

    Args:
      abstract: the params tree (arrays or `jax.ShapeDtypeStruct`), layers scanned.
      axes: the mesh's axis names.

    Returns:
      A tree of `PartitionSpec` with the structure of `abstract`.

    Example:
      >>> from rslora_jax.models import LlamaConfig, init_params
      >>> shapes = jax.eval_shape(lambda: init_params(LlamaConfig.tiny(), jax.random.key(0)))
      >>> llama_specs(shapes, ("data", "model"))["model"]["layers"]["mlp"]["down_proj"]
      {'kernel': P(None, 'model', None)}
    """
    fsdp = "fsdp" if "fsdp" in axes else None
    tp = "model" if "model" in axes else None

    def spec(path: tuple, leaf: Any) -> P:
        keys = [str(getattr(k, "key", k)) for k in path]
        module, name = (keys[-2] if len(keys) > 1 else ""), keys[-1]
        lead = (None,) if keys[:2] == ["model", "layers"] else ()
        if name == "embedding":
            return P(tp, fsdp)
        if name == "kernel" and module in _COLUMN_PARALLEL:
            return P(*lead, fsdp, tp)
        if name == "kernel" and module in _ROW_PARALLEL:
            return P(*lead, tp, fsdp)
        if name == "bias" and module in _COLUMN_PARALLEL:
            return P(*lead, tp)
        return P()

    return jax.tree_util.tree_map_with_path(spec, abstract)


def _specs(
    abstract_base: PyTree, abstract_adapters: PyTree, lora_config: rl.LoraConfig, mesh: Mesh
) -> tuple[PyTree, PyTree]:
    """(base specs, adapter specs): `llama_specs` for the base, `partition_specs` for adapters."""
    base_specs = llama_specs(abstract_base, tuple(mesh.shape))
    full = rl.partition_specs(rl.combine(abstract_adapters, abstract_base), base_specs, lora_config)
    adapter_specs, base_specs = rl.split(full)
    return base_specs, adapter_specs


def _check_mesh(
    args: argparse.Namespace, abstract_base: PyTree, abstract_adapters: PyTree, lora_config: Any
) -> Mesh:
    axes = parse_mesh(args.mesh)
    # All processes' devices, process by process: each process's devices are adjacent in the
    # mesh, so a process holds a contiguous block of rows of each batch.
    devices = jax.devices()
    processes = jax.process_count()
    if processes > 1:
        devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    if not axes and processes > 1:
        axes = {"data": len(devices)}  # several processes: data-parallel over all devices
    if not axes:
        mesh = Mesh(np.array(devices[:1]), ("data",))
    else:
        size = math.prod(axes.values())
        if size != len(devices):
            across = f" across {processes} processes" if processes > 1 else ""
            raise UsageError(
                f"--mesh {args.mesh!r} has {size} devices, but JAX sees {len(devices)}{across} "
                f"({devices[0].platform}); make the axis sizes multiply to {len(devices)}"
            )
        mesh = Mesh(np.array(devices).reshape(tuple(axes.values())), tuple(axes))
    batch_ways = _batch_ways(mesh)
    if args.batch_size % batch_ways:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by the mesh's batch axes "
            f"(data x fsdp = {batch_ways}); use a multiple of {batch_ways}"
        )
    if args.batch_size % processes:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by the number of processes "
            f"({processes}); use a multiple of {processes}"
        )
    try:
        _LocalRows.of(_batch_sharding(mesh), args.batch_size)
    except ValueError as err:
        raise UsageError(f"--mesh {args.mesh!r}: {err}") from None
    specs = _specs(abstract_base, abstract_adapters, lora_config, mesh)
    trees = (abstract_base, abstract_adapters)
    for tree, spec_tree in zip(trees, specs):
        flat_specs = jax.tree.leaves(spec_tree, is_leaf=lambda x: isinstance(x, P))
        for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(tree), flat_specs):
            for dim, entry in zip(leaf.shape, spec):
                for name in (entry,) if isinstance(entry, str) else (entry or ()):
                    if dim % mesh.shape[name]:
                        where = "/".join(str(getattr(k, "key", k)) for k in path)
                        raise UsageError(
                            f"--mesh {args.mesh!r}: {where} has shape {tuple(leaf.shape)}; its "
                            f"dimension {dim} is not divisible by mesh axis {name!r} of size "
                            f"{mesh.shape[name]}: choose axis sizes that divide the model's "
                            "widths"
                        )
    return mesh


def _batch_ways(mesh: Mesh) -> int:
    """Into how many blocks of rows the mesh splits a batch (data x fsdp)."""
    return mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)


def _batch_sharding(mesh: Mesh) -> NamedSharding:
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    return NamedSharding(mesh, P(batch_axes or None))


@dataclasses.dataclass(frozen=True)
class _LocalRows:
    """The rows of each global batch that this process materialises.

    The batch sharding cuts a global batch into `ways` equal blocks of rows; this process's
    devices hold blocks ``first .. first + count - 1`` (all of them with one process).
    """

    ways: int
    first: int
    count: int
    batch_size: int

    @classmethod
    def of(cls, sharding: NamedSharding, batch_size: int) -> _LocalRows:
        rows = distributed.local_slice(sharding, (batch_size, 1))[0]
        ways = _batch_ways(sharding.mesh)
        size = batch_size // ways
        return cls(ways, rows.start // size, (rows.stop - rows.start) // size, batch_size)

    @property
    def rows(self) -> slice:
        size = self.batch_size // self.ways
        return slice(self.first * size, (self.first + self.count) * size)

    def batches(
        self, train_rows: np.ndarray, *, seed: int, start_step: int
    ) -> Iterator[np.ndarray]:
        """This process's rows of the global batches ``start_step, start_step + 1, ...``."""
        if self.ways % self.count == 0 and self.first % self.count == 0:  # always, in practice
            return data.batch_iterator(
                train_rows,
                self.batch_size,
                seed=seed,
                start_step=start_step,
                process_index=self.first // self.count,
                process_count=self.ways // self.count,
            )
        parts = [
            data.batch_iterator(
                train_rows,
                self.batch_size,
                seed=seed,
                start_step=start_step,
                process_index=block,
                process_count=self.ways,
            )
            for block in range(self.first, self.first + self.count)
        ]
        return (np.concatenate(blocks) for blocks in zip(*parts))


def _merged_dtype(args: argparse.Namespace, model_dir: Path) -> str:
    if args.merged_dtype != "auto":
        return args.merged_dtype
    stored = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = stored.get("dtype") or stored.get("torch_dtype")
    return name if name in DTYPES else "float32"


def prepare(args: argparse.Namespace) -> Plan:
    """Checks every input and plans the run; reads no weights and compiles nothing.

    Raises:
      UsageError: naming the argument to fix.
    """
    try:
        from rslora_jax.hf.peft import export_peft
    except ImportError as err:  # pragma: no cover - a broken installation
        raise UsageError(f"rslora_jax.hf.peft is unavailable: {err}") from None
    if args.warmup_steps >= args.steps:
        raise UsageError(
            f"--warmup-steps {args.warmup_steps} must be smaller than --steps {args.steps}"
        )
    out, created = _check_out(args)
    try:
        model_dir, hf_config, model_config = _check_model(args)
        tokenizer_dir, tokenizer = _check_tokenizer(args, model_dir)
        description, sha, train_rows, eval_rows = _check_data(args, tokenizer, model_config)
        if args.resume:
            saved = json.loads((out / "run.json").read_text(encoding="utf-8"))
            if saved.get("data_sha256") != sha:
                raise UsageError(
                    "--resume: the training data differ from the interrupted run's (its tokens "
                    "hash differently); resume with the same --data, --tokenizer and --seq-len"
                )
        abstract_base = jax.eval_shape(lambda k: init_params(model_config, k), jax.random.key(0))
        lora_config, abstract_adapters = _check_lora(args, abstract_base)
        mesh = _check_mesh(args, abstract_base, abstract_adapters, lora_config)
    except UsageError:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty
        raise
    return Plan(
        args=args,
        out=out,
        model_dir=model_dir,
        hf_config=hf_config,
        model_config=model_config,
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer_dir,
        data_description=description,
        data_sha256=sha,
        train_rows=train_rows,
        eval_rows=eval_rows,
        lora_config=lora_config,
        mesh=mesh,
        merged_dtype=_merged_dtype(args, model_dir),
        export_peft=export_peft,
    )


# --------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """The optimizer's hyperparameters (hashable: compiled programs are cached on them)."""

    lr: float
    schedule: str
    warmup_steps: int
    decay_steps: int  # steps after the warmup (unused by the constant schedule)
    weight_decay: float
    max_grad_norm: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimSettings:
        decay = max(args.steps - args.warmup_steps, 1) if args.schedule != "constant" else 0
        return cls(
            lr=args.lr,
            schedule=args.schedule,
            warmup_steps=args.warmup_steps,
            decay_steps=decay,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
        )


def make_schedule(s: OptimSettings) -> optax.Schedule:
    """The learning-rate schedule: linear warmup, then constant, cosine or linear decay to 0.

    Example:
      >>> s = OptimSettings(1.0, "linear", 2, 4, 0.0, 1.0)
      >>> [round(float(make_schedule(s)(t)), 3) for t in range(7)]
      [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if s.schedule == "constant":
        main = optax.constant_schedule(s.lr)
    elif s.schedule == "cosine":
        main = optax.cosine_decay_schedule(s.lr, s.decay_steps)
    elif s.schedule == "linear":
        main = optax.linear_schedule(s.lr, 0.0, s.decay_steps)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {s.schedule!r}")
    if not s.warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, s.lr, s.warmup_steps)
    return optax.join_schedules([warmup, main], [s.warmup_steps])


def make_optimizer(s: OptimSettings) -> optax.GradientTransformation:
    """AdamW (with global-norm clipping) on the adapters, through `rslora_jax.optimizer`."""
    clip = optax.clip_by_global_norm(s.max_grad_norm) if s.max_grad_norm else optax.identity()
    return rl.optimizer(
        optax.chain(clip, optax.adamw(make_schedule(s), weight_decay=s.weight_decay))
    )


def _named(mesh: Mesh, specs: PyTree) -> PyTree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


@dataclasses.dataclass(frozen=True)
class Program:
    """The jitted functions of a run and the shardings they take (see `program`)."""

    init_state: Any  # adapters -> optimizer state
    # (adapters, state, base, batch, key, step, stop flags) -> (adapters, state, loss, any stop)
    train_step: Any
    eval_sums: Any  # (adapters, base, batch, row weights) -> (summed loss, token count)
    base: PyTree  # NamedShardings
    adapters: PyTree
    state: PyTree
    batch: NamedSharding
    replicated: NamedSharding
    flags: NamedSharding  # one bool per device (`stop_flags`)

    def stop_flags(self, value: bool) -> jax.Array:
        """A global bool vector with one entry per device, `value` on this process's devices.

        `train_step` returns whether any entry is set: a Ctrl-C in one process stops all of
        them after the same step.
        """
        n = self.flags.mesh.size
        return jax.make_array_from_callback(
            (n,), self.flags, lambda index: np.full(len(range(n)[index[0]]), value, np.bool_)
        )


@functools.lru_cache(maxsize=8)
def program(
    model_config: LlamaConfig,
    lora_config: rl.LoraConfig,
    optim: OptimSettings,
    mesh: Mesh,
    forward: str = "auto",
) -> Program:
    """Builds (and caches) the jitted training and evaluation functions of a run.

    Runs with the same model, adapter, optimizer and mesh settings in one process share the
    compiled code (a resumed run, a sweep over seeds). The base parameters are an argument of
    every function (never a compile-time constant), sharded as `llama_specs` says; the
    adapters and the optimizer state follow the base (`rslora_jax.partition_specs`,
    `rslora_jax.opt_state_specs`); the gradient is taken with respect to the adapters only.

    Args:
      model_config: the model (scanned layers).
      lora_config: the adapters.
      optim: the optimizer's hyperparameters.
      mesh: the device mesh.
      forward: the `rslora_jax.lora` mode of the training forward (``"auto"``, ``"fused"``,
        ``"factored"``); the evaluation uses the same.

    Returns:
      The jitted functions and their shardings.
    """
    abstract_base = jax.eval_shape(lambda k: init_params(model_config, k), jax.random.key(0))
    abstract_adapters = jax.eval_shape(
        lambda k: rl.init_adapters(abstract_base, lora_config, k), jax.random.key(0)
    )
    base_specs, adapter_specs = _specs(abstract_base, abstract_adapters, lora_config, mesh)
    opt = make_optimizer(optim)
    replicated = NamedSharding(mesh, P())
    flags = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    base_sh, adapter_sh = _named(mesh, base_specs), _named(mesh, adapter_specs)
    state_sh = _named(mesh, rl.opt_state_specs(opt, abstract_adapters, adapter_specs))
    batch_sh = _batch_sharding(mesh)
    apply = rl.lora(LlamaForCausalLM(model_config).apply, lora_config, mode=forward)
    use_dropout = lora_config.dropout > 0

    def loss_fn(adapters: PyTree, base: PyTree, batch: jax.Array, key: jax.Array) -> jax.Array:
        rngs = {"lora_dropout": key} if use_dropout else None
        logits = apply({"params": rl.combine(adapters, base)}, batch[:, :-1], rngs=rngs)
        return causal_lm_loss(logits, batch[:, 1:])

    def train_step(adapters, opt_state, base, batch, key, step, stop):
        # Gradients of the adapters only: no base-sized gradient is formed.
        loss, grads = jax.value_and_grad(loss_fn)(
            adapters, base, batch, jax.random.fold_in(key, step)
        )
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss, jnp.any(stop)

    def eval_sums(adapters, base, batch, weight):
        logits = apply({"params": rl.combine(adapters, base)}, batch[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch[:, 1:]
        )
        return jnp.sum(ce * weight[:, None]), jnp.sum(weight) * jnp.float32(ce.shape[1])

    return Program(
        init_state=jax.jit(opt.init, in_shardings=(adapter_sh,), out_shardings=state_sh),
        train_step=jax.jit(
            train_step,
            in_shardings=(adapter_sh, state_sh, base_sh, batch_sh, replicated, replicated, flags),
            out_shardings=(adapter_sh, state_sh, replicated, replicated),
        ),
        eval_sums=jax.jit(
            eval_sums,
            in_shardings=(adapter_sh, base_sh, batch_sh, batch_sh),
            out_shardings=(replicated, replicated),
        ),
        base=base_sh,
        adapters=adapter_sh,
        state=state_sh,
        batch=batch_sh,
        replicated=replicated,
        flags=flags,
    )


class _StopRequest:
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


def _mean_tail(values: Sequence[float], n: int = 10) -> float:
    return float(np.mean(values[-n:])) if values else float("nan")


class _Evaluator:
    """Held-out loss: every held-out row once, padded to whole batches with zero weight.

    Every process keeps the (small) held-out set and materialises its own rows of each batch.
    """

    def __init__(self, prog: Program, rows: np.ndarray, local: _LocalRows) -> None:
        batch_size = local.batch_size
        pad = (-len(rows)) % batch_size
        self.prog = prog
        self.local = local
        self.rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
        self.weight = np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)])

    def __call__(self, adapters: PyTree, base: PyTree) -> float:
        size, mine = self.local.batch_size, self.local.rows
        total = count = 0.0
        for i in range(0, len(self.rows), size):
            local = (self.rows[i : i + size][mine], self.weight[i : i + size][mine])
            rows, weight = distributed.make_global_batch(local, self.prog.batch, size)
            s, c = self.prog.eval_sums(adapters, base, rows, weight)
            total, count = total + float(s), count + float(c)
        return total / count


def train(plan: Plan) -> dict[str, Any]:
    """Runs (or resumes) the fine-tuning described by `plan`; writes the outputs.

    Under ``jax.distributed`` every process calls this together: each trains on its own rows
    of every global batch, all save checkpoints together, and process 0 prints and writes the
    exports and metrics (the others wait for it).

    Returns:
      The metrics (also written to ``metrics.json``); ``metrics["interrupted"]`` is True when
      Ctrl-C stopped the run (a checkpoint was saved, no final outputs were written).
    """
    from rslora_jax.hf import load_pretrained

    args, out = plan.args, plan.out
    multi = jax.process_count() > 1
    lead = jax.process_index() == 0
    say = functools.partial(print, flush=True) if lead else _silent
    t_start = time.perf_counter()
    if not args.resume and lead:
        run = {"args": {**_args_to_json(args), "out": str(out)}, "data_sha256": plan.data_sha256}
        (out / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    prog = program(
        plan.model_config,
        plan.lora_config,
        OptimSettings.from_args(args),
        plan.mesh,
        args.forward,
    )
    local = _LocalRows.of(prog.batch, args.batch_size)
    _, base = load_pretrained(
        plan.model_dir,
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        scan_layers=True,
        shardings=prog.base,
        remat=args.remat,
    )
    key_init, key_dropout = jax.random.split(jax.random.key(args.seed))
    # Created in place, sharded: every process computes its own shards of the same values.
    abstract_base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    adapters = jax.jit(
        lambda k: rl.init_adapters(abstract_base, plan.lora_config, k), out_shardings=prog.adapters
    )(key_init)
    opt_state = prog.init_state(adapters)
    evaluate = _Evaluator(prog, plan.eval_rows, local)

    losses: list[float] = []
    evals: list[list[float]] = []
    start_step = 0
    previous_seconds = 0.0
    manager = rl.CheckpointManager(
        out / "checkpoints", config=plan.lora_config, max_to_keep=args.keep
    )
    saved_steps = set(manager.all_steps())
    if args.resume:
        restored, opt_state, start_step, extra = manager.restore(
            rl.combine(adapters, base), opt_state
        )
        adapters, _ = rl.split(restored)
        losses = [float(x) for x in extra.get("losses", [])]
        evals = [list(e) for e in extra.get("evals", [])]
        previous_seconds = float(extra.get("train_seconds", 0.0))
        say(f"resuming {out} at step {start_step} of {args.steps}")

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
        manager.save(step, rl.combine(adapters, base), opt_state, extra=extra, force=True)
        manager.wait_until_finished()
        saved_steps.add(step)

    n_adapter = rl.num_adapter_params(adapters)
    n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base))
    tokens_per_step = args.batch_size * args.seq_len
    scale = plan.lora_config.scale_for("model/layers/self_attn/q_proj")
    processes = f", {jax.process_count()} processes" if multi else ""
    say(
        f"model {plan.model_dir} ({n_base:,} parameters, frozen)\nadapters: {n_adapter:,} "
        f"parameters, rank {args.rank}, alpha {args.alpha:g}, {args.scaling} (scale "
        f"{scale:.4g}), targets {args.targets}\ndata: {plan.data_description}: "
        f"{len(plan.train_rows)} training and {len(plan.eval_rows)} held-out sequences of "
        f"{args.seq_len} tokens\ndevices: {dict(plan.mesh.shape)} "
        f"({plan.mesh.devices.flat[0].platform}{processes})"
    )
    setup_seconds = time.perf_counter() - t_start
    if not evals:
        evals.append([0, evaluate(adapters, base)])
        say(f"held-out loss before training: {evals[0][1]:.4f}")

    stop = _StopRequest(multi)
    flags = {False: prog.stop_flags(False), True: prog.stop_flags(True)}
    stop_all = False  # a Ctrl-C in any process, as the last step saw it
    rng = jax.jit(lambda k: k, out_shardings=prog.replicated)(key_dropout)
    batches = local.batches(plan.train_rows, seed=args.seed, start_step=start_step)
    step = start_step
    bar = _progress(args, start_step) if lead else None

    def stopping() -> bool:
        # One process stops on its own Ctrl-C; several stop together, on what the step said.
        return stop_all if multi else stop.requested

    try:
        with stop.installed():
            while step < args.steps and not stopping():
                batch = distributed.make_global_batch(next(batches), prog.batch, args.batch_size)
                t0 = time.perf_counter()
                new_adapters, new_state, loss, any_stop = prog.train_step(
                    adapters,
                    opt_state,
                    base,
                    batch,
                    rng,
                    jnp.int32(step),
                    flags[stop.requested],
                )
                loss_value = float(loss)  # waits for the step
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
                    _log(bar, f"train loss at the first step: {loss_value:.4f}")
                if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                    evals.append([step, evaluate(adapters, base)])
                if args.save_every and step % args.save_every == 0:
                    save(step)
                if bar is not None:
                    postfix = {"loss": f"{_mean_tail(losses):.4f}"}
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
        evals.append([args.steps, evaluate(adapters, base)])
    save(args.steps)
    manager.close()
    t_export = time.perf_counter()
    outputs = _write_outputs(plan, adapters, base, losses, evals)
    metrics = {
        "interrupted": False,
        "steps": args.steps,
        "resumed_from_step": start_step if args.resume else None,
        "train_losses": losses,
        "eval_losses": evals,
        "first_train_loss": losses[0] if losses else None,
        "first_10_train_loss": float(np.mean(losses[:10])) if losses else None,
        "last_train_loss": _mean_tail(losses),
        "eval_loss_before": evals[0][1],
        "eval_loss_after": evals[-1][1],
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": steady_tokens / timer["steady"] if timer["steady"] else None,
        "seconds": {
            "setup": setup_seconds,
            "first_step_with_compilation": timer["first"],
            "train_this_process": timer["train"],
            "train_total": previous_seconds + timer["train"],
            "export": time.perf_counter() - t_export,
            "total_this_process": time.perf_counter() - t_start,
        },
        "parameters": {"base": n_base, "adapters": n_adapter},
        "devices": {
            "mesh": dict(plan.mesh.shape),
            "platform": plan.mesh.devices.flat[0].platform,
            "processes": jax.process_count(),
        },
        "data": {
            "description": plan.data_description,
            "train_sequences": len(plan.train_rows),
            "eval_sequences": len(plan.eval_rows),
            "sha256": plan.data_sha256,
        },
        "config": {
            "args": {**_args_to_json(args), "out": str(out)},
            "lora": plan.lora_config.to_dict(),
            "model": plan.hf_config.to_dict(),
        },
        "outputs": {k: str(v) for k, v in outputs.items()},
    }
    if lead:
        outputs["metrics"].write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        print(_summary(metrics, out), flush=True)
    _barrier("rslora-finetune: outputs written")
    return metrics


def _silent(*args: Any, **kwargs: Any) -> None:
    """`print` for the processes other than process 0."""


def _barrier(name: str) -> None:
    """Every process waits here for all the others (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_outputs(
    plan: Plan, adapters: PyTree, base: PyTree, losses: list[float], evals: list[list[float]]
) -> dict[str, Path]:
    """Adapter checkpoint, PEFT adapter, merged checkpoint + tokenizer, loss curve.

    Every process calls this: the adapter checkpoint is written by all together; the rest is
    gathered to every process (`process_allgather`) and written by process 0.
    """
    from jax.experimental import multihost_utils

    from rslora_jax.hf import save_pretrained

    args, out = plan.args, plan.out
    outputs = {
        "adapters": out / "adapters",
        "peft": out / "peft",
        "merged": out / "merged",
        "checkpoints": out / "checkpoints",
        "loss_curve": out / "loss.png",
        "metrics": out / "metrics.json",
    }
    params = rl.combine(adapters, base)
    rl.save_adapters(outputs["adapters"], params, plan.lora_config)
    merged = jax.jit(rl.merge, static_argnums=1)(params, plan.lora_config)
    if jax.process_count() > 1:  # pieces in every process: gather them
        merged = multihost_utils.process_allgather(merged, tiled=True)
        # export_peft reads the adapters' values and only the kernels' shapes.
        params = rl.combine(multihost_utils.process_allgather(adapters, tiled=True), base)
    if jax.process_index() == 0:
        plan.export_peft(
            outputs["peft"],
            params,
            plan.lora_config,
            plan.model_config,
            base_model_name_or_path=str(plan.model_dir),
        )
        save_pretrained(outputs["merged"], merged, plan.hf_config, dtype=plan.merged_dtype)
        plan.tokenizer.save_pretrained(str(outputs["merged"]))
        title = (
            f"{args.scaling} r={args.rank} alpha={args.alpha:g} lr={args.lr:g} ({args.schedule})"
        )
        plot_losses(outputs["loss_curve"], losses, evals, title)
    return outputs


def _log(bar: Any, message: str) -> None:
    if bar is not None:
        bar.write(message, file=sys.stdout)
    else:
        print(message, flush=True)
    sys.stdout.flush()


def _progress(args: argparse.Namespace, start: int) -> Any:
    if args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=args.steps,
        initial=start,
        unit="step",
        desc="fine-tuning",
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stderr,
    )


def plot_losses(path: Path, losses: Sequence[float], evals: Sequence[Sequence[float]], title: str):
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
    fig.savefig(path)


def _summary(m: dict[str, Any], out: Path) -> str:
    s = m["seconds"]
    tps = m["tokens_per_second"]
    lines = [
        "",
        f"done: {m['steps']} steps, {s['train_total']:.0f}s training"
        + (f" ({tps:,.0f} tokens/s after compilation)" if tps else "")
        + f", {s['total_this_process']:.0f}s in all",
        f"  train loss     {m['first_train_loss']:.4f} at the first step (mean of the first 10: "
        f"{m['first_10_train_loss']:.4f}) -> {m['last_train_loss']:.4f} (mean of the last 10)",
        f"  held-out loss  {m['eval_loss_before']:.4f} (before) -> {m['eval_loss_after']:.4f} "
        "(after)",
        f"outputs in {out}:",
        "  adapters/      adapter checkpoint: rslora_jax.load_adapters(dir, base_params)",
        "  peft/          PEFT adapter: peft.PeftModel.from_pretrained(base_model, dir)",
        "  merged/        merged model + tokenizer: AutoModelForCausalLM.from_pretrained(dir)",
        f"  checkpoints/   training state for --resume (steps {_checkpoint_steps(out / 'checkpoints')})",
        "  loss.png       loss curves",
        "  metrics.json   losses, held-out losses, tokens/s, timings, configuration",
        "  run.json       the run's arguments",
    ]
    return "\n".join(lines)


def finetune(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses `argv`, validates it, and runs the fine-tuning.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
      The metrics dict (see `train`).

    Raises:
      UsageError: for bad input, before any weight is read or anything is compiled. With
        several processes, every process raises it (they all check, then agree).
    """
    args = parse_args(argv)
    _check_distributed(args)
    _start_runtime(args)
    if jax.process_count() > 1 and args.out is None:  # one run directory: process 0's name
        args.out = RUNS_DIR / _broadcast_text(time.strftime("rslora-%Y%m%d-%H%M%S"))
    try:
        plan, error = prepare(args), None
    except UsageError as err:
        plan, error = None, err
    _agree(error)
    return train(plan)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rslora-finetune`` / ``python -m rslora_jax.finetune``.

    Returns:
      The exit status: 0 when done, 2 for bad input (the message goes to stderr), 130 when
      interrupted by Ctrl-C (after saving a checkpoint). The same in every process of a
      multi-process run.
    """
    try:
        result = finetune(argv)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        if jax.distributed.is_initialized():
            # Every process has agreed to stop (`_agree`); leave without the runtime's shutdown
            # barrier, which can wait forever once a peer has gone (seen on a loaded CI machine).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USAGE)
        status = EXIT_USAGE
    except KeyboardInterrupt:
        if not jax.distributed.is_initialized():
            raise
        # A second Ctrl-C in a multi-process run: leave at once. A normal exit would wait at
        # the runtime's shutdown barrier for processes that wait for this one.
        print(f"\n{PROG}: aborted (process {jax.process_index()})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
    else:
        status = EXIT_INTERRUPTED if result.get("interrupted") else 0
    _stop_runtime()  # every process gets here together (errors are agreed on first)
    return status


if __name__ == "__main__":
    sys.exit(main())
