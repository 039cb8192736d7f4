"""How a run lies on the device mesh: the shardings of base, adapters and batches, and which
rows of each global batch this process materialises.

The base follows the Llama family's policy (`rslora_jax.models.sharding.param_specs`: FSDP over
``fsdp``, tensor parallelism over ``model``), the adapters follow the base
(`rslora_jax.partition_specs`), and a batch is split by rows over ``data`` and ``fsdp``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax import data, distributed
from rslora_jax._types import PyTree
from rslora_jax.models.sharding import param_specs


def run_specs(
    abstract_base: PyTree, abstract_adapters: PyTree, lora_config: rl.LoraConfig, mesh: Mesh
) -> tuple[PyTree, PyTree]:
    """(base specs, adapter specs): `param_specs` for the base, `partition_specs` for adapters.

    Example:
      >>> from rslora_jax.models import LlamaConfig, init_params
      >>> base = jax.eval_shape(lambda: init_params(LlamaConfig.tiny(), jax.random.key(0)))
      >>> config = rl.LoraConfig(rank=2, kernel_axes={"model/layers/.*": "lio"})
      >>> adapters = jax.eval_shape(lambda: rl.init_adapters(base, config, jax.random.key(0)))
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "model"))
      >>> _, specs = run_specs(base, adapters, config, mesh)
      >>> specs["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
      P(None, 'fsdp', None)
    """
    base_specs = param_specs(abstract_base, tuple(mesh.shape))
    full = rl.partition_specs(rl.combine(abstract_adapters, abstract_base), base_specs, lora_config)
    adapter_specs, base_specs = rl.split(full)
    return base_specs, adapter_specs


def named(mesh: Mesh, specs: PyTree) -> PyTree:
    """A tree of `PartitionSpec` as `NamedSharding` on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_ways(mesh: Mesh) -> int:
    """Into how many blocks of rows the mesh splits a batch (data x fsdp)."""
    return mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A batch's sharding: rows split over the mesh's ``data`` and ``fsdp`` axes."""
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    return NamedSharding(mesh, P(batch_axes or None))


def accum_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a training batch ``(grad_accum, rows, ...)``: each micro-batch's rows
    split as `batch_sharding` splits a batch."""
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
    return NamedSharding(mesh, P(None, batch_axes or None))


def train_batch(
    local: np.ndarray, sharding: NamedSharding, grad_accum: int, rows: int
) -> jax.Array:
    """The global training batch ``(grad_accum, rows, ...)`` from this process's rows of the
    ``grad_accum * rows`` rows of a step (`LocalRows.batches` with that batch size).

    Global row ``b * grad_accum + a`` of a step is row ``b`` of micro-batch ``a``, so the rows a
    process holds of the step are its rows of every micro-batch, and a step is the same batch
    (the same rows, the same token weighting) for any ``--grad-accum`` that divides it.

    Example:
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
      >>> batch = train_batch(np.arange(6)[:, None], accum_sharding(mesh), 2, 3)
      >>> batch[:, :, 0].tolist()
      [[0, 2, 4], [1, 3, 5]]
    """
    local = np.asarray(local)
    micro = np.swapaxes(local.reshape(-1, grad_accum, *local.shape[1:]), 0, 1)
    return jax.make_array_from_process_local_data(
        sharding, np.ascontiguousarray(micro), (grad_accum, rows, *local.shape[1:])
    )


@dataclasses.dataclass(frozen=True)
class LocalRows:
    """The rows of each global batch that this process materialises.

    The batch sharding cuts a global batch into `ways` equal blocks of rows; this process's
    devices hold blocks ``first .. first + count - 1`` (all of them with one process).
    """

    ways: int
    first: int
    count: int
    batch_size: int

    @classmethod
    def of(cls, sharding: NamedSharding, batch_size: int) -> LocalRows:
        """This process's blocks of a batch of `batch_size` rows sharded as `sharding`.

        Raises:
          ValueError: if the sharding does not split `batch_size` rows evenly.
        """
        rows = distributed.local_slice(sharding, (batch_size, 1))[0]
        ways = batch_ways(sharding.mesh)
        size = batch_size // ways
        return cls(ways, rows.start // size, (rows.stop - rows.start) // size, batch_size)

    @property
    def rows(self) -> slice:
        """This process's rows of a global batch."""
        size = self.batch_size // self.ways
        return slice(self.first * size, (self.first + self.count) * size)

    def batches(
        self, train_rows: np.ndarray, *, seed: int, start_step: int
    ) -> Iterator[np.ndarray]:
        """This process's rows of the global batches ``start_step, start_step + 1, ...``."""
        if self.ways % self.count == 0 and self.first % self.count == 0:  # always, in practice
            return data.batch_iterator(
                train_rows,
                self.batch_size,
                seed=seed,
                start_step=start_step,
                process_index=self.first // self.count,
                process_count=self.ways // self.count,
            )
        parts = [
            data.batch_iterator(
                train_rows,
                self.batch_size,
                seed=seed,
                start_step=start_step,
                process_index=block,
                process_count=self.ways,
            )
            for block in range(self.first, self.first + self.count)
        ]
        return (np.concatenate(blocks) for blocks in zip(*parts))
