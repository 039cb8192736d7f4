"""What keeps a run's files safe and its failures readable.

- `check_out`: what ``--out`` may hold. A run writes only the entries of `OUTPUT_NAMES`; an
  ``--out`` that holds such entries it did not write (no run.json of ours) is refused unless
  ``--overwrite``, and so is an ``--out`` that is, or contains, ``--model`` or ``--tokenizer``.
  A run that stopped before its first checkpoint is started over (fresh or ``--resume``).
- `RunError`: a run that cannot go on (a full disk, NaN or Inf, a damaged checkpoint, model
  files that do not load), reported as ``rslora-finetune: error: ...`` with exit status 2.
- `Interrupted`: a Ctrl-C outside the step loop, reported with what was kept; exit status 130.
- `writing`: turns "no space left on device" anywhere below it (orbax, safetensors, matplotlib)
  into one line naming the file and the last good checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from rslora_jax import _files
from rslora_jax.cli.common import UsageError

#: What a run writes in ``--out`` (nothing else there is touched).
OUTPUT_NAMES = (
    "run.json",
    "checkpoints",
    "adapters",
    "peft",
    "merged",
    "loss.png",
    "metrics.json",
)
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class RunError(UsageError):
    """A run that cannot go on: reported like bad input (``error: ...``, exit status 2)."""


class Interrupted(Exception):
    """A Ctrl-C outside the step loop (no checkpoint is written then); the message says what
    was kept and how to go on."""


# ---------------------------------------------------------------------------- --out
def _within(path: Path, directory: Path) -> bool:
    """Whether `path` is `directory` or lies inside it (both resolved)."""
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def _ours(run_json: Path) -> bool:
    """Whether run.json was written by this command (an object with its arguments)."""
    try:
        saved = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("args"), dict)


def _has_checkpoint(out: Path) -> bool:
    ckpt = out / "checkpoints"
    return ckpt.is_dir() and any(p.is_dir() and p.name.isdigit() for p in ckpt.iterdir())


def check_out(
    args: argparse.Namespace, out: Path, inputs: dict[str, Path]
) -> tuple[str | None, list[str]]:
    """Checks what ``--out`` holds against what the run is asked to do (changes nothing there).

    Args:
      args: the arguments (``args.resume`` is cleared when a run with no checkpoint is started
        over).
      out: the output directory (absolute).
      inputs: ``{flag: directory}`` of the run's inputs (``--model``, ``--tokenizer``).

    Returns:
      ``(note, names)``: a note to print (a run started over or replaced) or None, and the
      entries of `OUTPUT_NAMES` to remove (`clear`) once every other check has passed.

    Raises:
      UsageError: ``--out`` is or contains an input; it holds a run to resume or replace, or
        outputs this command did not write, and neither ``--resume`` nor ``--overwrite`` says
        what to do.
    """
    for flag, directory in inputs.items():
        if _within(directory, out):
            raise UsageError(
                f"--out {str(out)!r} {'is' if directory.resolve() == out.resolve() else 'contains'}"
                f" {flag} {str(directory)!r}: the run would write over its own input (merged/ "
                "and the other outputs are replaced); choose another --out"
            )
    if not out.exists():
        return None, []
    run_json = out / "run.json"
    present = [name for name in OUTPUT_NAMES if (out / name).exists() or (out / name).is_symlink()]
    ours = run_json.is_file() and _ours(run_json)
    if args.resume:
        if not ours:
            raise UsageError(
                f"--resume: {str(out)!r} holds no run of this command (its run.json is not "
                "one); give the --out of an interrupted run"
            )
        if not _has_checkpoint(out):
            args.resume = False
            return (
                f"--resume: {out} has no checkpoint yet (the run stopped before its first "
                "one): starting it from step 0"
            ), ["checkpoints"]
        return None, []
    if args.overwrite and present:
        return f"--overwrite: replacing {', '.join(present)} in {out}", present
    if ours and not _has_checkpoint(out) and not (out / "metrics.json").exists():
        note = f"{out} holds a run that stopped before its first checkpoint: starting it again"
        return note, ["checkpoints"]
    if ours:
        raise UsageError(
            f"--out {str(out)!r} already holds a fine-tuning run: pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if present:
        raise UsageError(
            f"--out {str(out)!r} already holds {', '.join(present)}, which this command did not "
            "write (there is no run.json of a run) and would replace: pass --overwrite to let "
            "it, or choose another --out"
        )
    return None, []


def clear(out: Path, names: list[str]) -> None:
    """Removes entries of `OUTPUT_NAMES` (and staging a killed write left) from `out`."""
    for name in names:
        if name not in OUTPUT_NAMES:
            raise ValueError(f"clear: {name!r} is not an output of this command")
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    clean_out(out)


def clean_out(out: Path) -> list[Path]:
    """Removes what a killed run left half written in `out` (staging of our outputs)."""
    removed = []
    for name in OUTPUT_NAMES:
        removed += _files.clean_staging(out / name, everything=True)
    return removed


# ---------------------------------------------------------------------------- failures
def disk_full(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) says the disk or a quota is full."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        todo += [e.__cause__, e.__context__]
    return False


def last_checkpoint(out: Path) -> str:
    """'the last good checkpoint is ...' for `out` (the newest step whose files verify)."""
    from rslora_jax.ops.checkpoint import verify_checksums

    ckpt = out / "checkpoints"
    steps = (
        sorted(
            (int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True
        )
        if ckpt.is_dir()
        else []
    )
    for step in steps:
        if verify_checksums(ckpt / str(step)) in (None, "no checksums"):
            return (
                f"the last good checkpoint is {ckpt / str(step)} (step {step}; continue "
                f"with --resume --out {out})"
            )
    return "there is no checkpoint yet (run the same command again to start over)"


class _DiskFullRecords(logging.Filter):
    """Drops orbax's own log records of a full disk (its writer threads log each failure with
    a traceback before the error reaches us; `writing` says it once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(s in text for s in ("No space left on device", "Disk quota exceeded"))


@contextlib.contextmanager
def writing(what: Path, out: Path) -> Iterator[None]:
    """Turns a full disk while writing `what` into a `RunError` naming it and the last good
    checkpoint."""
    quiet = _DiskFullRecords()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    except Exception as err:
        if disk_full(err):
            raise RunError(
                f"no space left on device while writing {what}; {last_checkpoint(out)}"
            ) from None
        raise
    finally:
        logger.removeFilter(quiet)


__all__ = [
    "OUTPUT_NAMES",
    "Interrupted",
    "RunError",
    "check_out",
    "clean_out",
    "clear",
    "disk_full",
    "last_checkpoint",
    "writing",
]
