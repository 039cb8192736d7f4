"""``python -m rslora_jax.finetune``: the fine-tuning command (console script ``rslora-finetune``).

The command lives in the package `rslora_jax.cli.finetune`, whose docstring documents it. This
module keeps ``python -m rslora_jax.finetune`` and ``from rslora_jax import finetune`` working
with the names it has always offered; the library itself never imports it.
"""

from __future__ import annotations

import sys

from rslora_jax.cli.common import DTYPES, MESH_AXES
from rslora_jax.cli.finetune import (
    DEFAULT_MODEL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    RUNS_DIR,
    OptimSettings,
    Plan,
    Program,
    UsageError,
    build_parser,
    checkpoint_steps,
    finetune,
    main,
    make_optimizer,
    make_schedule,
    parse_args,
    parse_mesh,
    plot_losses,
    prepare,
    program,
    train,
)
from rslora_jax.cli.finetune.args import SCHEDULES
from rslora_jax.models.sharding import param_specs as llama_specs

# The name this module gave it before the command became a package (tests use it).
_checkpoint_steps = checkpoint_steps

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "MESH_AXES",
    "PROG",
    "RUNS_DIR",
    "SCHEDULES",
    "OptimSettings",
    "Plan",
    "Program",
    "UsageError",
    "build_parser",
    "checkpoint_steps",
    "finetune",
    "llama_specs",
    "main",
    "make_optimizer",
    "make_schedule",
    "parse_args",
    "parse_mesh",
    "plot_losses",
    "prepare",
    "program",
    "train",
]

if __name__ == "__main__":
    sys.exit(main())
