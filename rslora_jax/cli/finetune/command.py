"""The command as a whole: parse, check (and agree across processes), train, exit status."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

from rslora_jax.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, UsageError
from rslora_jax.cli.finetune.args import LAUNCH_ARGS, PROG, RUNS_DIR, args_to_json, parse_args
from rslora_jax.cli.finetune.guards import Interrupted, clear
from rslora_jax.cli.finetune.loop import train
from rslora_jax.cli.finetune.plan import prepare
from rslora_jax.cli.finetune.runtime import (
    agree,
    barrier,
    broadcast_text,
    check_distributed,
    same_run,
    start_runtime,
    stop_runtime,
)


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
    check_distributed(args)
    start_runtime(args)
    if jax.process_count() > 1 and args.out is None:  # one run directory: process 0's name
        args.out = RUNS_DIR / broadcast_text(time.strftime("rslora-%Y%m%d-%H%M%S"))
    try:
        plan, error = prepare(args), None
    except UsageError as err:
        plan, error = None, err
    agree(error)
    if jax.process_count() > 1:  # the same run everywhere, before any weight is read
        resolved = {k: v for k, v in args_to_json(plan.args).items() if k not in LAUNCH_ARGS}
        same_run({**{f"--{k.replace('_', '-')}": v for k, v in resolved.items()},
                  "the data (tokens)": plan.data_sha256})  # fmt: skip
    if jax.process_index() == 0:  # every process accepted the run: replace what it replaces
        if plan.out_note:
            print(f"{PROG}: {plan.out_note}", file=sys.stderr, flush=True)
        clear(plan.out, plan.out_clear)
    barrier("rslora-finetune: --out prepared")
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
            # Every process has agreed to stop (`agree`); leave without the runtime's shutdown
            # barrier, which can wait forever once a peer has gone (seen on a loaded CI machine).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USAGE)
        status = EXIT_USAGE
    except Interrupted as stop:  # a Ctrl-C outside the step loop: what was kept, no traceback
        print(f"\n{PROG}: {stop}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if not jax.distributed.is_initialized():
            print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        # A second Ctrl-C in a multi-process run: leave at once. A normal exit would wait at
        # the runtime's shutdown barrier for processes that wait for this one.
        print(f"\n{PROG}: aborted (process {jax.process_index()})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
    else:
        status = EXIT_INTERRUPTED if result.get("interrupted") else 0
    stop_runtime()  # every process gets here together (errors are agreed on first)
    return status
