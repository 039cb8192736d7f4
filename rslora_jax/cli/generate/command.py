"""The command as a whole: parse, check, load, generate batch by batch, print, ``--out``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rslora_jax.cli.common import EXIT_USAGE, UsageError
from rslora_jax.cli.generate.args import PROG, parse_args
from rslora_jax.cli.generate.plan import Job, load, prepare
from rslora_jax.generate import generate


class _Steps:
    """The decode loop's host callback: time to first token, and the streamed text of a
    single prompt (one object per command run, so the compiled loop is reused across batches).
    """

    def __init__(self, tokenizer: Any, stream: bool, stops: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.stream = stream
        self.stops = stops
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, step: int, tokens: np.ndarray, active: np.ndarray) -> None:
        if step == 0:
            self.first = time.perf_counter() - self.start
        if not self.stream or not bool(active[0]) or int(tokens[0]) in self.stops:
            return
        self.tokens.append(int(tokens[0]))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.shown):  # print what is new (a token may complete a character)
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
            self.shown = text


def _completion_text(tokenizer: Any, tokens: list[int], stops: tuple[int, ...]) -> str:
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parses `argv`, checks it, loads the model and adapter, and generates.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
      One record per prompt (as ``--out`` writes them): prompt, completion, token counts,
      whether it stopped at the end-of-sequence token, timing of its batch.

    Raises:
      UsageError: for bad input, before anything is compiled.
    """
    args = parse_args(argv)
    if args.cpu_devices is not None:
        try:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        except RuntimeError as err:  # JAX already started (an in-process call)
            raise UsageError(f"--cpu-devices {args.cpu_devices}: {err}") from None
    if args.out is not None:
        out = args.out.expanduser()
        if out.is_dir() or not out.parent.is_dir():
            raise UsageError(f"--out {str(out)!r}: not a writable file path")
    job: Job = prepare(args)
    model, params, lora_config = load(job)
    stops = job.sampling.stop_tokens
    stream = len(job.prompts) == 1 and not args.no_stream
    steps = _Steps(job.tokenizer, stream, stops)
    key = jax.random.key(args.seed)
    records: list[dict[str, Any]] = []
    for start in range(0, len(job.prompts), args.batch_size):
        batch = job.prompts[start : start + args.batch_size]
        if stream:
            print(batch[0].text, end="", flush=True)
        steps.reset()
        t0 = time.perf_counter()
        result = generate(
            model,
            params,
            [p.ids for p in batch],
            job.sampling,
            lora_config=lora_config,
            key=jax.random.fold_in(key, start),
            mesh=job.mesh,
            on_token=steps,
        )
        seconds = time.perf_counter() - t0
        first = steps.first if steps.first is not None else seconds
        new_tokens = int(result.lengths.sum())
        decode_rate = (new_tokens - len(batch)) / (seconds - first) if seconds > first else None
        for i, (prompt, tokens) in enumerate(zip(batch, result.completions())):
            text = _completion_text(job.tokenizer, tokens, stops)
            records.append(
                {
                    "prompt": prompt.text,
                    "completion": text,
                    "prompt_tokens": len(prompt.ids),
                    "completion_tokens": len(tokens),
                    "stopped": bool(result.stopped[i]),
                    "batch_size": len(batch),
                    "batch_seconds": seconds,
                    "time_to_first_token_s": first,
                    "decode_tokens_per_second": decode_rate,
                }
            )
            if stream:
                print(text[len(steps.shown) :] if text.startswith(steps.shown) else "", flush=True)
            else:
                n = start + i + 1
                end = "end of sequence" if result.stopped[i] else "max new tokens"
                print(f"=== prompt {n} ({len(prompt.ids)} tokens) ===\n{prompt.text}")
                print(f"--- completion ({len(tokens)} tokens, {end}) ---\n{text}\n", flush=True)
    if args.out is not None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        args.out.expanduser().write_text(lines, encoding="utf-8")
    total = sum(r["completion_tokens"] for r in records)
    print(
        f"{PROG}: {len(records)} prompt(s), {total} new tokens"
        + (f"; written to {args.out}" if args.out is not None else ""),
        file=sys.stderr,
        flush=True,
    )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rslora-generate`` / ``python -m rslora_jax.generate``.

    Returns:
      The exit status: 0 when done, 2 for bad input (the message goes to stderr).
    """
    try:
        run(argv)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0
