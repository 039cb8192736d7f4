"""Data for multi-process runs: which part of a global batch this process loads.

Under ``jax.distributed`` every process runs the same program on a global mesh, and a global
array is assembled from the pieces each process holds. A data loader must therefore know which
rows of the global batch belong to the devices of *this* process; `local_slice` says so for any
sharding, and `make_global_batch` turns the rows a process loaded into global arrays
(`jax.make_array_from_process_local_data`). With one process both are the identity on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Sharding

from rslora_jax._types import PyTree


def local_slice(sharding: Sharding, global_shape: Sequence[int]) -> tuple[slice, ...]:
    """The block of a global array of `global_shape` that this process holds under `sharding`.

    Args:
      sharding: the array's sharding (e.g. ``NamedSharding(mesh, P("data"))`` for a batch).
      global_shape: the global array's shape.

    Returns:
      One slice per axis (with concrete start and stop): load exactly this block, in this
      process, and pass it to `make_global_batch` (or `jax.make_array_from_process_local_data`).

    Raises:
      ValueError: if this process's devices hold a block that is not contiguous (a mesh whose
        devices of one process are not adjacent along the sharded axes).

    Example:
      >>> import jax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> local_slice(NamedSharding(mesh, P("data")), (8, 3))  # one process: everything
      (slice(0, 8, None), slice(0, 3, None))
    """
    shape = tuple(int(s) for s in global_shape)
    indices = sharding.addressable_devices_indices_map(shape).values()
    out = []
    for axis, size in enumerate(shape):
        spans = sorted({idx[axis].indices(size)[:2] for idx in indices})
        start, stop = spans[0][0], spans[0][1]
        for lo, hi in spans[1:]:
            if lo > stop:
                raise ValueError(
                    f"this process (index {jax.process_index()}) holds a non-contiguous part of "
                    f"axis {axis} of an array of shape {shape} under {sharding}: blocks {spans}. "
                    "Order the mesh so that each process's devices are adjacent on that axis "
                    "(e.g. jax.make_mesh), or load per device"
                )
            stop = max(stop, hi)
        out.append(slice(start, stop))
    return tuple(out)


def make_global_batch(local_batch: PyTree, sharding: Sharding, global_batch_size: int) -> PyTree:
    """Assembles global arrays from the rows of a batch this process loaded.

    Every leaf of `local_batch` has the rows ``local_slice(sharding, ...)[0]`` of the global
    batch on its leading axis and the full extent on the others.

    Args:
      local_batch: a tree of arrays (numpy or jax), this process's rows.
      sharding: the sharding of the global batch (leading axis sharded, e.g. ``P("data")``).
      global_batch_size: the global batch size (leading axis of the result).

    Returns:
      The tree of global `jax.Array` s.

    Raises:
      ValueError: if a leaf does not have the number of rows this process should provide.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> sh = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P("data"))
      >>> rows = local_slice(sh, (8, 2))[0]
      >>> batch = make_global_batch({"x": np.ones((rows.stop - rows.start, 2))}, sh, 8)
      >>> batch["x"].shape
      (8, 2)
    """

    def one(leaf):
        leaf = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
        global_shape = (int(global_batch_size), *leaf.shape[1:])
        rows = local_slice(sharding, global_shape)[0]
        if leaf.shape[0] != rows.stop - rows.start:
            raise ValueError(
                f"process {jax.process_index()} must provide rows {rows.start}:{rows.stop} "
                f"({rows.stop - rows.start}) of the global batch of {global_batch_size}, got "
                f"a local batch with leading size {leaf.shape[0]}"
            )
        return jax.make_array_from_process_local_data(sharding, leaf, global_shape)

    return jax.tree.map(one, local_batch)


__all__ = ["local_slice", "make_global_batch"]
