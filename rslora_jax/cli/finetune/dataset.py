"""The data of a run: ``--data`` files or a built-in set -> tokenized examples -> held-out split
-> packed rows (`prepare_data` -> `RunData`).

Each stage is `rslora_jax.data`; this module adds the command's choices and messages: the
held-out examples are the last ``--eval-fraction`` of them (file order; the built-in instruction
set is shuffled once, with a fixed seed, when it is built), split before packing so that no row
mixes training and held-out examples; examples whose answer ``--seq-len`` cuts off entirely are
counted, reported and left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib

import numpy as np

from rslora_jax import data
from rslora_jax.cli.common import UsageError
from rslora_jax.cli.finetune.options import BUILTIN_PREFIX, DEFAULT_DATA


@dataclasses.dataclass(frozen=True)
class RunData:
    """What training reads: packed rows and how they were made.

    Attributes:
      description: what ``--data`` was, for the log and metrics.
      formats: how many records of each format.
      chat_template: where the chat template came from (None without chat rows).
      train_rows, eval_rows: packed rows ``(N, 5, seq_len)`` (`rslora_jax.data.FIELDS`).
      train_stats, eval_stats: `rslora_jax.data.PackStats` of each.
      sha256: hash of both arrays (``--resume`` checks it).
    """

    description: str
    formats: dict[str, int]
    chat_template: str | None
    train_rows: np.ndarray
    eval_rows: np.ndarray
    train_stats: data.PackStats
    eval_stats: data.PackStats
    sha256: str


def data_entries(args: argparse.Namespace) -> list:
    """``--data`` as given, or the default built-in set."""
    return list(args.data) if args.data else [DEFAULT_DATA]


def _records(args: argparse.Namespace) -> tuple[list[data.Record], str]:
    entries = data_entries(args)
    records: list[data.Record] = []
    files = [e for e in entries if not str(e).startswith(BUILTIN_PREFIX)]
    described = []
    for entry in entries:
        text = str(entry)
        if not text.startswith(BUILTIN_PREFIX):
            continue
        name = text[len(BUILTIN_PREFIX) :]
        try:
            records += data.builtin_records(name)
        except ValueError as err:
            raise UsageError(f"--data {text}: {err}") from None
        described.append(f"{text} ({data.BUILTIN_DATA[name][0]})")
    if files:
        try:
            records += data.load_records(files, text_field=args.text_field, format=args.data_format)
        except ValueError as err:
            raise UsageError(f"--data: {err}") from None
        described.append(", ".join(str(p) for p in files))
    return records, "; ".join(described)


def prepare_data(args: argparse.Namespace, tokenizer: object, vocab_size: int) -> RunData:
    """Reads, tokenizes, splits and packs the data of a run.

    Raises:
      UsageError: naming the file, line and field of a bad row, a template that fails, too
        little data, or a tokenizer that does not fit the model.
    """
    records, description = _records(args)
    template = None
    template_origin = None
    if any(r.format == "chat" for r in records):
        if args.chat_template is not None:
            try:
                template = data.load_chat_template(args.chat_template)
            except ValueError as err:
                raise UsageError(str(err)) from None
            template_origin = f"--chat-template {args.chat_template}"
        elif getattr(tokenizer, "chat_template", None):
            template_origin = "the tokenizer's"
        else:
            template = data.DEFAULT_CHAT_TEMPLATE
            template_origin = (
                "built-in default (rslora_jax.data.DEFAULT_CHAT_TEMPLATE; the tokenizer has none)"
            )
    try:
        examples = data.tokenize_records(
            records, tokenizer, chat_template=template, train_on_prompt=args.train_on_prompt
        )
    except ValueError as err:
        raise UsageError(f"--data: {err}") from None
    examples = data.window_examples(examples, args.seq_len)
    if len(examples) < 2:
        raise UsageError(
            f"--data: {len(examples)} example of at most --seq-len {args.seq_len} + 1 tokens; "
            "at least 2 are needed (training and held-out): add data or lower seq_len"
        )
    train, held = data.split_examples(examples, args.eval_fraction)
    top = max(int(e.ids.max()) for e in examples if e.ids.size)
    if top >= vocab_size:
        raise UsageError(
            f"the tokenizer produces token id {top}, but the model's vocabulary has "
            f"{vocab_size} entries: pass the --tokenizer that belongs to --model"
        )
    pack = not args.no_packing
    try:
        train_rows, train_stats = data.pack_examples(train, args.seq_len, pack=pack)
        eval_rows, eval_stats = data.pack_examples(held, args.seq_len, pack=pack)
    except ValueError as err:
        raise UsageError(f"--data: {err}; add data or lower seq_len") from None
    if args.eval_rows:
        eval_rows = eval_rows[: args.eval_rows]
    formats: dict[str, int] = {}
    for r in records:
        formats[r.format] = formats.get(r.format, 0) + 1
    sha = hashlib.sha256()
    for rows in (train_rows, eval_rows):
        sha.update(np.ascontiguousarray(rows).tobytes())
    return RunData(
        description=description,
        formats=formats,
        chat_template=template_origin,
        train_rows=train_rows,
        eval_rows=eval_rows,
        train_stats=train_stats,
        eval_stats=eval_stats,
        sha256=sha.hexdigest(),
    )
