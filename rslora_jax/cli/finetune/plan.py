"""Every input checked, before any weight is read or anything is compiled: `prepare` -> `Plan`.

Each check raises `UsageError` naming the argument to fix; `prepare` removes the ``--out``
directory again if it made it and a later check fails, so a rejected run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

import rslora_jax as rl
from rslora_jax._types import PyTree
from rslora_jax.cli.common import (
    DTYPES,
    UsageError,
    check_divisible,
    check_model,
    check_tokenizer,
    parse_mesh,
)
from rslora_jax.cli.finetune import guards
from rslora_jax.cli.finetune.adapters import (
    LayerSelection,
    adapted_paths,
    check_patterns,
    lora_config,
)
from rslora_jax.cli.finetune.args import DEFAULT_MODEL, RUNS_DIR
from rslora_jax.cli.finetune.dataset import RunData, prepare_data
from rslora_jax.cli.finetune.layout import LocalRows, batch_sharding, batch_ways, run_specs
from rslora_jax.cli.finetune.options import parse_layers, parse_trackers
from rslora_jax.cli.finetune.tracking import check_trackers
from rslora_jax.models.decoder import init_params


@dataclasses.dataclass
class Plan:
    """A validated run: what `train` needs, built by `prepare` without reading any weight."""

    args: argparse.Namespace
    out: Path
    model_dir: Path
    hf_config: Any
    model_config: Any  # the family's config (e.g. rslora_jax.models.LlamaConfig)
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
    run_data: RunData | None = None
    layers: LayerSelection | None = None
    trackers: tuple[str, ...] = ()
    out_note: str | None = None  # what --out held and what happens to it (`guards.check_out`)
    out_clear: list[str] = dataclasses.field(default_factory=list)  # removed before training
    #: --train-tokens: the checkpoint's vocabulary size before the new rows (None: unchanged),
    #: and the ids of the new tokens.
    vocab_from: int | None = None
    token_ids: tuple[int, ...] = ()


def _check_out(args: argparse.Namespace) -> tuple[Path, bool, str | None, list[str]]:
    """The output directory, created and probed for writing; whether it was created; and what
    `rslora_jax.cli.finetune.guards.check_out` says of what it holds (a note, what to clear
    once every check has passed)."""
    out = args.out if args.out is not None else RUNS_DIR / time.strftime("rslora-%Y%m%d-%H%M%S")
    out = out.expanduser().absolute()
    model = (args.model if args.model is not None else DEFAULT_MODEL).expanduser().absolute()
    inputs = {"--model": model}
    if args.tokenizer is not None:
        inputs["--tokenizer"] = args.tokenizer.expanduser().absolute()
    note, to_clear = guards.check_out(args, out, inputs)
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
    return out, not existed, note, to_clear


def checkpoint_steps(directory: Path) -> list[int]:
    """The steps of the checkpoints under `directory` (its all-digit subdirectories), sorted.

    Example:
      >>> checkpoint_steps(Path("/no/such/run/checkpoints"))
      []
    """
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _check_model(args: argparse.Namespace) -> tuple[Path, Any, Any]:
    return check_model(
        args.model,
        DEFAULT_MODEL,
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        scan_layers=True,
        remat=args.remat or args.remat_policy is not None,
        **({"remat_policy": args.remat_policy} if args.remat_policy else {}),
    )


def _check_tokenizer(args: argparse.Namespace, model_dir: Path) -> tuple[Path, Any]:
    return check_tokenizer(args.tokenizer, model_dir)


def _check_data(args: argparse.Namespace, tokenizer: Any, config: Any) -> RunData:
    if args.seq_len > config.max_position_embeddings:
        raise UsageError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings}); lower --seq-len"
        )
    return prepare_data(args, tokenizer, config.vocab_size)


def _names(flag: str, value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    if not names:
        raise UsageError(f"{flag} {value!r}: give a comma list of names")
    return names


def _add_tokens(
    args: argparse.Namespace, tokenizer: Any, model_config: Any, hf_config: Any
) -> tuple[Any, Any, int | None, tuple[int, ...]]:
    """--train-tokens: the tokens added to the tokenizer, the configs with room for them."""
    from rslora_jax.hf.vocab import add_to_tokenizer, with_vocab_size

    tokens = _names("--train-tokens", args.train_tokens)
    if not tokens:
        return model_config, hf_config, None, ()
    try:
        ids = add_to_tokenizer(tokenizer, tokens)
    except ValueError as err:
        raise UsageError(f"--train-tokens {args.train_tokens!r}: {err}") from None
    size = max(model_config.vocab_size, len(tokenizer), max(ids) + 1)
    if size == model_config.vocab_size:
        return model_config, hf_config, None, ids
    vocab = model_config.vocab_size
    return with_vocab_size(model_config, size), with_vocab_size(hf_config, size), vocab, ids


def _check_lora(
    args: argparse.Namespace,
    abstract_base: PyTree,
    token_ids: tuple[int, ...] = (),
    tied: bool = True,
) -> tuple[rl.LoraConfig, PyTree]:
    config = lora_config(args)
    key = jax.random.key(0)
    # Shapes only: a base-modifying init (PiSSA, OLoRA) gives the shapes of the default one.
    shaped = config.replace(init="kaiming_uniform") if config.init.modifies_base else config
    try:  # targets first (plain LoRA at rank 1), then the rank and the method
        probe = rl.LoraConfig(rank=1, targets=config.targets, kernel_axes=config.kernel_axes)
        jax.eval_shape(lambda k: rl.init_adapters(abstract_base, probe, k), key)
    except ValueError as err:
        raise UsageError(f"--targets {args.targets!r}: {err}") from None
    try:  # the base as an argument: DoRA reads the kernels (here: tracers) for its magnitudes
        abstract = jax.eval_shape(lambda b, k: rl.init_adapters(b, shaped, k), abstract_base, key)
    except ValueError as err:
        raise UsageError(f"--rank {args.rank}: {err}") from None
    check_patterns(args, config, adapted_paths(abstract))
    # What is trained beside the adapters (rslora_jax.core.extras).
    tokens: Any = None
    if token_ids:  # the new rows of the embedding, and of an untied output layer
        tokens = list(token_ids) if tied else {"embed_tokens": token_ids, "lm_head": token_ids}
    extras = dict(
        modules_to_save=_names("--modules-to-save", args.modules_to_save) or None,
        bias=args.bias,
        trainable_token_indices=tokens,
    )
    if extras["modules_to_save"] or tokens or args.bias != "none":
        try:
            config, shaped = config.replace(**extras), shaped.replace(**extras)
            abstract = jax.eval_shape(
                lambda b, k: rl.init_adapters(b, shaped, k), abstract_base, key
            )
        except ValueError as err:
            raise UsageError(f"--modules-to-save / --train-tokens / --bias: {err}") from None
    return config, abstract


def _check_mesh_size(args: argparse.Namespace) -> None:
    """``--mesh``'s syntax and size against the devices JAX sees (the rest: `_check_mesh`)."""
    axes = parse_mesh(args.mesh)
    if axes and math.prod(axes.values()) != jax.device_count():
        across = f" across {jax.process_count()} processes" if jax.process_count() > 1 else ""
        raise UsageError(
            f"--mesh {args.mesh!r} has {math.prod(axes.values())} devices, but JAX sees "
            f"{jax.device_count()}{across} ({jax.devices()[0].platform}); make the axis sizes "
            f"multiply to {jax.device_count()}"
        )


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
    ways = batch_ways(mesh)
    if args.batch_size % ways:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by the mesh's batch axes "
            f"(data x fsdp = {ways}); use a multiple of {ways}"
        )
    if args.batch_size % processes:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by the number of processes "
            f"({processes}); use a multiple of {processes}"
        )
    try:
        LocalRows.of(batch_sharding(mesh), args.batch_size)
    except ValueError as err:
        raise UsageError(f"--mesh {args.mesh!r}: {err}") from None
    specs = run_specs(abstract_base, abstract_adapters, lora_config, mesh)
    for tree, spec_tree in zip((abstract_base, abstract_adapters), specs):
        check_divisible(tree, spec_tree, mesh, args.mesh)
    return mesh


def _merged_dtype(args: argparse.Namespace, model_dir: Path) -> str:
    if args.merged_dtype != "auto":
        return args.merged_dtype
    stored = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = stored.get("dtype") or stored.get("torch_dtype")
    return name if name in DTYPES else "float32"


def _check_quantize(args: argparse.Namespace, abstract_base: PyTree, config: Any) -> None:
    """``--quantize``: every targeted kernel can be quantized (shapes only)."""
    scheme = getattr(args, "quantize", "none")
    if scheme == "none":
        return
    from rslora_jax.ops.quantize import abstract_quantize

    try:
        abstract_quantize(abstract_base, scheme, config=config)
    except ValueError as err:
        raise UsageError(f"--quantize {scheme}: {err}") from None


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
    _check_mesh_size(args)  # cheap: before the tokenizer's work
    out, created, note, to_clear = _check_out(args)
    try:
        model_dir, hf_config, model_config = _check_model(args)
        tokenizer_dir, tokenizer = _check_tokenizer(args, model_dir)
        model_config, hf_config, vocab_from, token_ids = _add_tokens(
            args, tokenizer, model_config, hf_config
        )
        trackers = parse_trackers(args.report_to)
        check_trackers(trackers)
        layers = parse_layers(args.layers, model_config.num_hidden_layers)
        run_data = _check_data(args, tokenizer, model_config)
        if args.resume:
            saved = json.loads((out / "run.json").read_text(encoding="utf-8"))
            if saved.get("data_sha256") != run_data.sha256:
                raise UsageError(
                    "--resume: the training data differ from the interrupted run's (its tokens "
                    "hash differently); resume with the same --data, --tokenizer and --seq-len"
                )
        abstract_base = jax.eval_shape(lambda k: init_params(model_config, k), jax.random.key(0))
        config, abstract_adapters = _check_lora(
            args, abstract_base, token_ids, model_config.tie_word_embeddings
        )
        _check_quantize(args, abstract_base, config)
        mesh = _check_mesh(args, abstract_base, abstract_adapters, config)
    except (UsageError, KeyboardInterrupt):
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
        data_description=run_data.description,
        data_sha256=run_data.sha256,
        train_rows=run_data.train_rows,
        eval_rows=run_data.eval_rows,
        lora_config=config,
        mesh=mesh,
        merged_dtype=_merged_dtype(args, model_dir),
        export_peft=export_peft,
        run_data=run_data,
        layers=(None if layers is None else LayerSelection(layers, model_config.num_hidden_layers)),
        trackers=trackers,
        vocab_from=vocab_from,
        token_ids=token_ids,
        out_note=note,
        out_clear=to_clear,
    )
