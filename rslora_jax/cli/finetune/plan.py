"""Every input checked, before any weight is read or anything is compiled: `prepare` -> `Plan`.

Each check raises `UsageError` naming the argument to fix; `prepare` removes the ``--out``
directory again if it made it and a later check fails, so a rejected run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax import data
from rslora_jax._types import PyTree
from rslora_jax.cli.common import DTYPES, UsageError, parse_mesh
from rslora_jax.cli.finetune.args import DEFAULT_MODEL, RUNS_DIR
from rslora_jax.cli.finetune.layout import LocalRows, batch_sharding, batch_ways, run_specs
from rslora_jax.core.config import ALL_LINEAR
from rslora_jax.models.decoder import init_params
from rslora_jax.models.families import family


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


def _check_out(args: argparse.Namespace) -> tuple[Path, bool]:
    """The output directory, created and probed for writing; and whether it was created."""
    out = args.out if args.out is not None else RUNS_DIR / time.strftime("rslora-%Y%m%d-%H%M%S")
    out = out.expanduser().absolute()
    if args.resume:
        if not checkpoint_steps(out / "checkpoints"):
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
        model_config = family(hf_config.model_type, "--model").from_hf(
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
    args: argparse.Namespace, tokenizer: Any, config: Any
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
        _check_quantize(args, abstract_base, lora_config)
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
