"""Experiment tracking: TensorBoard event files (``--out/tb``, tensorboardX) and Weights & Biases.

``--report-to tensorboard`` (the default) writes ``train/loss``, ``train/learning_rate``,
``train/grad_norm``, ``train/tokens_per_second`` every step and ``eval/loss`` at every
evaluation; ``tensorboard --logdir <out>/tb`` shows them. ``--report-to wandb`` logs the same to
a wandb run (``wandb`` must be installed and logged in; offline with ``WANDB_MODE=offline``).
Only process 0 reports. `check_trackers` runs before training: a tracker that cannot start is a
usage error, not a crash at the end.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from rslora_jax.cli.common import UsageError

_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb"}


def check_trackers(names: tuple[str, ...]) -> None:
    """Fails early when a tracker's package is not installed.

    Raises:
      UsageError: naming the tracker and how to install it or turn it off.
    """
    for name in names:
        package = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise UsageError(
                f"--report-to {name}: the {package} package is not installed (pip install "
                f"{package}); or pass --report-to none"
            )


class Trackers:
    """The trackers of a run (none of them in processes other than 0)."""

    def __init__(self, names: tuple[str, ...], out: Path, config: dict[str, Any], step: int):
        self.writers: list[Any] = []
        self.wandb: Any = None
        if "tensorboard" in names:
            from tensorboardX import SummaryWriter

            # purge_step: a resumed run drops the events an interrupted one wrote past its
            # last checkpoint.
            writer = SummaryWriter(str(out / "tb"), purge_step=step or None, flush_secs=10)
            writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)
            self.writers.append(writer)
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(
                project="rslora-finetune",
                name=out.name,
                dir=str(out),
                config=config,
                resume="allow",
                id=out.name,
            )

    def log(self, step: int, values: dict[str, float | None]) -> None:
        """Logs ``{"train/loss": ..., ...}`` at `step` (None values are skipped)."""
        values = {k: float(v) for k, v in values.items() if v is not None}
        for writer in self.writers:
            for key, value in values.items():
                writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()
