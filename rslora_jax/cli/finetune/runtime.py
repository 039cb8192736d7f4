"""Several processes: joining and leaving ``jax.distributed``, and agreeing across processes.

Every process checks its own input; `agree` then stops all of them if any rejected it, so that
they all exit with status 2 together instead of waiting for a peer that has gone; `same_run`
then compares what each process resolved (arguments, the data's hash) before any weight is
read. Joining waits at most ``--connect-timeout`` seconds for every process, then stops with a
message (JAX's own timeout aborts the process from C++ without one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from rslora_jax.cli.common import EXIT_USAGE, UsageError


def check_distributed(args: argparse.Namespace) -> None:
    """Checks the multi-process arguments; reads nothing and touches no JAX state.

    Raises:
      UsageError: for an incomplete or inconsistent ``--coordinator`` / ``--num-processes`` /
        ``--process-id`` / ``--distributed`` set, or a ``--batch-size`` that the processes
        cannot share.

    Example:
      >>> from rslora_jax.cli.finetune.args import build_parser
      >>> check_distributed(build_parser().parse_args(["--coordinator", "10.0.0.1:1234",
      ...     "--num-processes", "2", "--process-id", "1"]))
    """
    given = {
        "--coordinator": args.coordinator,
        "--num-processes": args.num_processes,
        "--process-id": args.process_id,
    }
    present = [flag for flag, value in given.items() if value is not None]
    if args.distributed == "auto":
        if present:
            raise UsageError(
                f"--distributed auto finds the coordinator, process count and index itself: "
                f"drop {', '.join(present)} (or drop --distributed auto and give all three)"
            )
        return
    if not present:
        return
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise UsageError(
            f"{', '.join(present)} without {', '.join(missing)}: a multi-process run needs "
            "--coordinator HOST:PORT, --num-processes N and --process-id I in every process "
            "(or --distributed auto on TPU pods, SLURM and Open MPI)"
        )
    host, sep, port = args.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(
            f"--coordinator {args.coordinator!r}: expected HOST:PORT with a port in 1..65535 "
            "(e.g. 10.0.0.1:1234, the address of process 0)"
        )
    if args.process_id >= args.num_processes:
        raise UsageError(
            f"--process-id {args.process_id} must be smaller than --num-processes "
            f"{args.num_processes} (process ids are 0 .. {args.num_processes - 1})"
        )
    if args.batch_size % args.num_processes:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by --num-processes "
            f"{args.num_processes}: every process holds an equal share of each global batch"
        )


def start_runtime(args: argparse.Namespace) -> None:
    """Applies ``--cpu-devices`` and joins the distributed runtime if asked to."""
    multi = args.distributed == "auto" or args.coordinator is not None
    try:
        if args.cpu_devices is not None:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        if multi and args.cpu_devices is not None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except RuntimeError as err:  # JAX already started (an in-process call)
        raise UsageError(f"--cpu-devices {args.cpu_devices}: {err}") from None
    if not multi:
        return
    where = (
        "--distributed auto"
        if args.distributed == "auto"
        else f"--coordinator {args.coordinator} (process {args.process_id} of {args.num_processes})"
    )
    timeout = getattr(args, "connect_timeout", None) or 300
    # JAX's own deadline (later than ours) aborts from C++ with no word of what to check.
    watchdog = threading.Timer(timeout, _not_joined, args=(where, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        if args.distributed == "auto":
            jax.distributed.initialize(initialization_timeout=timeout + 60)
        else:
            jax.distributed.initialize(
                args.coordinator,
                num_processes=args.num_processes,
                process_id=args.process_id,
                initialization_timeout=timeout + 60,
            )
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"{where}: could not join the distributed runtime: {err}") from None
    finally:
        watchdog.cancel()


def _not_joined(where: str, timeout: int) -> None:
    """The watchdog of `start_runtime`: not every process joined in time; leave with a message."""
    print(
        f"rslora-finetune: error: {where}: not every process joined the distributed runtime "
        f"within --connect-timeout {timeout} s. Check that every process was started with the "
        "same --coordinator HOST:PORT (the address of process 0, reachable from all) and "
        "--num-processes, each with its own --process-id, and that no firewall blocks the port",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_USAGE)


def stop_runtime() -> None:
    """Leaves the distributed runtime, if this process joined it."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def broadcast_text(text: str) -> str:
    """Process 0's `text` (of the same length in every process), in every process."""
    from jax.experimental import multihost_utils

    codes = np.frombuffer(text.encode("ascii"), np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(codes))).decode("ascii")


def agree(error: UsageError | None) -> None:
    """Stops every process if any rejected the input (all reach this point, then all exit 2).

    Raises:
      UsageError: this process's own error, or one that names the process that failed.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
        raise error
    bad = [int(i) for i in np.flatnonzero(failed)]
    if bad:
        raise UsageError(
            f"process {bad[0]} of {jax.process_count()} rejected the input (see its message); "
            "every process stops"
        )


def same_run(values: Mapping[str, Any]) -> None:
    """Stops every process if the processes resolved different `values` (arguments, data hash).

    Each process hashes each value; the hashes are gathered and compared with process 0's,
    so a process started with another ``--rank``, ``--data`` or ``--seed`` is named before any
    weight is read (instead of a collective that hangs or trains on mixed settings).

    Args:
      values: ``{name: JSON-able value}``, the same names in every process.

    Raises:
      UsageError: naming the values that differ and the processes that differ from process 0.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    names = sorted(values)
    digests = np.stack(
        [
            np.frombuffer(
                hashlib.sha256(
                    json.dumps(values[n], sort_keys=True, default=str).encode()
                ).digest(),
                np.uint8,
            )
            for n in names
        ]
    )
    every = np.asarray(multihost_utils.process_allgather(digests))  # (processes, names, 32)
    differ = (every != every[:1]).any(axis=2)  # (processes, names)
    if not differ.any():
        return
    parts = []
    for j, name in enumerate(names):
        procs = [int(i) for i in np.flatnonzero(differ[:, j])]
        if procs:
            mine = " (this process differs)" if jax.process_index() in procs else ""
            parts.append(f"{name}: process(es) {procs} differ from process 0{mine}")
    raise UsageError(
        "the processes of this run were started with different settings; every process must "
        "run the same command but for --process-id: " + "; ".join(parts)
    )


def barrier(name: str) -> None:
    """Every process waits here for all the others (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
