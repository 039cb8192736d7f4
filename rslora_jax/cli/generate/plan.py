"""Every input of ``rslora-generate`` checked before any weight is read (`prepare` -> `Job`),
then the weights and adapters loaded (`load`), still before anything is compiled.

Each check raises `UsageError` naming the argument to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax._types import Params
from rslora_jax.cli.common import (
    UsageError,
    check_divisible,
    check_model,
    check_tokenizer,
    parse_mesh,
)
from rslora_jax.cli.generate.args import DEFAULT_MODEL
from rslora_jax.data import DEFAULT_CHAT_TEMPLATE, load_chat_template
from rslora_jax.generate import SamplingConfig
from rslora_jax.models.decoder import init_params
from rslora_jax.models.families import family_of
from rslora_jax.models.sharding import param_specs


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its text as shown and written to ``--out``, and its token ids."""

    text: str
    ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class AdapterSource:
    """An adapter directory and its format (``"checkpoint"``: rslora-finetune's, or ``"peft"``)."""

    path: Path
    kind: str


@dataclasses.dataclass
class Job:
    """A validated generation job: what `load` and the command need."""

    args: argparse.Namespace
    model_dir: Path
    model_config: Any  # the family's config (e.g. rslora_jax.models.LlamaConfig)
    tokenizer: Any
    prompts: list[Prompt]
    adapter: AdapterSource | None
    mesh: Mesh | None
    sampling: SamplingConfig


def _check_model(args: argparse.Namespace) -> tuple[Path, Any]:
    model_dir, _, config = check_model(
        args.model, DEFAULT_MODEL, dtype=args.dtype, param_dtype=args.param_dtype, scan_layers=True
    )
    return model_dir, config


def _check_tokenizer(args: argparse.Namespace, model_dir: Path) -> Any:
    return check_tokenizer(args.tokenizer, model_dir)[1]


def render_chat(tokenizer: Any, messages: Any, where: str, template: str | None = None) -> str:
    """A chat rendered as fine-tuning renders chats (`template`, else the tokenizer's own
    template, else `rslora_jax.data.DEFAULT_CHAT_TEMPLATE`), ending with the generation prompt.

    Raises:
      UsageError: for messages that are not ``[{"role": ..., "content": ...}, ...]`` strings,
        or a template that fails on them.
    """
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise UsageError(
                f"{where}: messages[{i}] must be an object with string 'role' and 'content'"
            )
    template = template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as err:  # jinja errors of a third-party template
        raise UsageError(f"{where}: the chat template fails on this chat: {err}") from None


def _read_prompts(args: argparse.Namespace, tokenizer: Any) -> list[str]:
    texts = list(args.prompt or [])
    if args.prompts is not None:
        path = args.prompts.expanduser()
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--prompts {str(path)!r}: cannot be read: {err}") from None
        template = None
        if args.chat_template is not None:
            try:
                template = load_chat_template(args.chat_template)
            except ValueError as err:
                raise UsageError(str(err)) from None
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for n, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                where = f"--prompts {str(path)!r}, line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UsageError(f"{where}: not JSON: {err}") from None
                if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                    texts.append(row["prompt"])
                elif isinstance(row, dict) and "messages" in row:
                    texts.append(render_chat(tokenizer, row["messages"], where, template))
                else:
                    raise UsageError(
                        f"{where}: expected an object with a string 'prompt' or a 'messages' chat"
                    )
        else:
            texts.extend(line for line in content.splitlines() if line.strip())
        if len(texts) == len(args.prompt or []):
            raise UsageError(f"--prompts {str(path)!r}: the file holds no prompt")
    if not texts:
        raise UsageError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    return texts


def _encode(texts: list[str], tokenizer: Any, config: Any, max_new: int) -> list[Prompt]:
    limit = config.max_position_embeddings
    prompts = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        shown = text if len(text) <= 40 else text[:37] + "..."
        where = f"prompt {i + 1} ({shown!r})"
        if not ids:
            raise UsageError(f"{where}: encodes to no token")
        if max(ids) >= config.vocab_size:
            raise UsageError(
                f"{where}: the tokenizer produces token id {max(ids)}, but the model's "
                f"vocabulary has {config.vocab_size} entries: pass the --tokenizer of --model"
            )
        if len(ids) > limit:
            raise UsageError(
                f"{where} has {len(ids)} tokens, more than the model's {limit} positions "
                "(max_position_embeddings): shorten it"
            )
        if len(ids) + max_new > limit:
            raise UsageError(
                f"{where} has {len(ids)} tokens: with --max-new-tokens {max_new} it would reach "
                f"position {len(ids) + max_new}, past the model's {limit} positions; lower "
                f"--max-new-tokens to {limit - len(ids)} or less"
            )
        prompts.append(Prompt(text, tuple(int(t) for t in ids)))
    return prompts


def find_adapter(path: Path) -> AdapterSource:
    """The format of an ``--adapter`` directory.

    Raises:
      UsageError: if it is neither an adapter checkpoint nor a PEFT adapter.
    """
    path = path.expanduser().absolute()
    what = f"--adapter {str(path)!r}"
    if not path.is_dir():
        raise UsageError(f"{what}: no such directory")
    if (path / "adapter_config.json").is_file():
        return AdapterSource(path, "peft")
    if (path / "manifest").is_dir() and (path / "adapters").is_dir():
        return AdapterSource(path, "checkpoint")
    run = path / "adapters"
    if (run / "manifest").is_dir() and (run / "adapters").is_dir():
        return AdapterSource(run, "checkpoint")  # a fine-tuning run directory
    raise UsageError(
        f"{what}: neither an adapter checkpoint written by rslora-finetune (<run>/adapters, "
        "with manifest/ and adapters/) nor a PEFT adapter directory (adapter_config.json + "
        "adapter_model.safetensors)"
    )


def _check_mesh(args: argparse.Namespace, config: Any) -> Mesh | None:
    axes = parse_mesh(args.mesh)
    if not axes:
        return None
    devices = jax.devices()
    size = math.prod(axes.values())
    if size != len(devices):
        raise UsageError(
            f"--mesh {args.mesh!r} has {size} devices, but JAX sees {len(devices)} "
            f"({devices[0].platform}); make the axis sizes multiply to {len(devices)}"
        )
    mesh = Mesh(np.array(devices).reshape(tuple(axes.values())), tuple(axes))
    abstract = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    check_divisible(abstract, param_specs(abstract, tuple(mesh.shape)), mesh, args.mesh)
    return mesh


def prepare(args: argparse.Namespace) -> Job:
    """Checks every input; reads no weights and compiles nothing.

    Raises:
      UsageError: naming the argument to fix.
    """
    model_dir, config = _check_model(args)
    tokenizer = _check_tokenizer(args, model_dir)
    adapter = find_adapter(args.adapter) if args.adapter is not None else None
    prompts = _encode(_read_prompts(args, tokenizer), tokenizer, config, args.max_new_tokens)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    stops = () if args.ignore_eos or eos is None else (int(eos),)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_tokens=tuple(s for s in stops if s < config.vocab_size),
        pad_token=int(pad) if pad is not None and pad < config.vocab_size else 0,
    )
    mesh = _check_mesh(args, config)
    return Job(args, model_dir, config, tokenizer, prompts, adapter, mesh, sampling)


def _named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def load(job: Job) -> tuple[Any, Params, rl.LoraConfig | None]:
    """Reads the weights and the adapter (placed on the mesh, if any); compiles nothing.

    Returns:
      ``(model, params, lora_config)``: params with the adapter's leaves, and its config (None
      without an adapter).

    Raises:
      UsageError: an adapter trained on another base (paths or shapes differ) or unreadable.
    """
    from rslora_jax.hf import import_peft, load_pretrained

    args = job.args
    shardings = None
    if job.mesh is not None:
        abstract = jax.eval_shape(lambda k: init_params(job.model_config, k), jax.random.key(0))
        shardings = _named(job.mesh, param_specs(abstract, tuple(job.mesh.shape)))
    config, base = load_pretrained(
        job.model_dir,
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        scan_layers=True,
        shardings=shardings,
    )
    model = family_of(config).module(config)
    if job.adapter is None:
        return model, base, None
    what = f"--adapter {str(job.adapter.path)!r}"
    try:
        if job.adapter.kind == "peft":
            params, lora_config = import_peft(job.adapter.path, base, config)
        else:
            params, lora_config = rl.load_adapters(job.adapter.path, base)
    except (ValueError, OSError) as err:
        raise UsageError(
            f"{what}: {err} (is it an adapter of --model {str(job.model_dir)!r}?)"
        ) from None
    if lora_config is None:
        raise UsageError(f"{what}: the checkpoint stores no adapter config; cannot apply it")
    if job.mesh is not None:
        base_specs = param_specs(base, tuple(job.mesh.shape))
        specs = rl.partition_specs(params, base_specs, lora_config)
        check_divisible(params, specs, job.mesh, args.mesh)
        params = jax.device_put(params, _named(job.mesh, specs))
    return model, params, lora_config


__all__ = [
    "AdapterSource",
    "Job",
    "Prompt",
    "find_adapter",
    "load",
    "prepare",
    "render_chat",
]
