"""Runs the fine-tuning command with one fault injected, for tests/test_faults.py.

    python tests/_fault_driver.py FAULT [ARGS...]

FAULT is one of (the process kills itself with SIGKILL, as ``kill -9`` would, at that point):

    kill-at-checksums:STEP        orbax has finished checkpoint STEP; its checksums are not written
    kill-in-staging:NAME          NAME's weights are written into its staging directory, which is
                                  not swapped in yet (NAME: merged or peft)
    kill-between-renames:NAME     between the two renames that put the finished NAME directory in
                                  place (the fallback used where renameat2 cannot exchange)
    none                          no fault

ARGS are the command's arguments. The faults patch the library's functions from outside (no
hook in the library); everything else runs as ``python -m rslora_jax.finetune`` would.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    from rslora_jax import _files
    from rslora_jax.hf import io as hf_io
    from rslora_jax.ops import checkpoint

    kind, _, arg = fault.partition(":")
    if kind == "none":
        return
    if kind == "kill-at-checksums":
        real_checksums = checkpoint.write_checksums

        def write_checksums(directory):
            if Path(directory).name == arg:
                _die()
            real_checksums(directory)

        checkpoint.write_checksums = write_checksums
    elif kind == "kill-in-staging":
        real_write = hf_io.write_safetensors

        def write_safetensors(path, tensors, metadata=None):
            real_write(path, tensors, metadata)
            if Path(path).parent.name.startswith(f".{arg}.tmp-"):
                _die()

        hf_io.write_safetensors = write_safetensors
    elif kind == "kill-between-renames":
        real_move_in = _files._move_in
        _files._exchange = lambda a, b: False  # the two-rename fallback

        def move_in(new, target):
            if Path(target).name == arg:
                _die()  # the old directory is already at .<name>.old
            real_move_in(new, target)

        _files._move_in = move_in
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from rslora_jax.cli.finetune import main

    sys.exit(main(sys.argv[2:]))
