"""The families' sharding policy: FSDP plus Megatron tensor parallelism.

`param_specs` maps a params tree of the shared decoder (`rslora_jax.models.decoder`: every
family, layers scanned or not; each family registers it in `rslora_jax.models.families`) onto
the mesh axes ``fsdp`` and ``model``:

- ``fsdp`` splits every matrix on its hidden-size axis (ZeRO-3 style);
- ``model`` splits the column-parallel projections (q/k/v, gate/up and an untied lm_head) on
  their output features and the row-parallel ones (o, down) on their input features, so that
  an attention or MLP block needs one reduction; the embedding is split on the vocabulary;
- norms (q/k norms included) and anything else are replicated; axes the mesh lacks are left
  out. Phi-3's fused checkpoint modules are split in our tree, so q/k/v and gate/up shard like
  every other family's.

The adapters then follow the base (`rslora_jax.partition_specs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

from rslora_jax._types import PyTree

#: Projections whose output features are split over the ``model`` axis (column-parallel).
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
#: Projections whose input features are split over the ``model`` axis (row-parallel).
ROW_PARALLEL = ("o_proj", "down_proj")


def param_specs(abstract_params: PyTree, mesh_axes: Sequence[str]) -> PyTree:
    """PartitionSpecs of a Llama params tree over the mesh axes `mesh_axes`.

    ``fsdp`` splits every matrix on its hidden-size axis, ``model`` splits the q/k/v/gate/up
    projections (and an untied lm_head) on their outputs, o/down on their inputs and the
    embedding on the vocabulary; norms are replicated. Axes not in `mesh_axes` are left out
    (``data`` shards only the batch). Scanned layers (under ``model/layers``, with a leading
    layer axis) keep that axis unsharded.

    Args:
      abstract_params: the params tree (arrays or `jax.ShapeDtypeStruct`).
      mesh_axes: the mesh's axis names.

    Returns:
      A tree of `PartitionSpec` with the structure of `abstract_params`.

    Example:
      >>> from rslora_jax.models import LlamaConfig, init_params
      >>> shapes = jax.eval_shape(lambda: init_params(LlamaConfig.tiny(), jax.random.key(0)))
      >>> param_specs(shapes, ("data", "model"))["model"]["layers"]["mlp"]["down_proj"]
      {'kernel': P(None, 'model', None)}
      >>> unscanned = LlamaConfig.tiny(scan_layers=False)
      >>> shapes = jax.eval_shape(lambda: init_params(unscanned, jax.random.key(0)))
      >>> param_specs(shapes, ("fsdp", "model"))["model"]["layers"]["0"]["mlp"]["down_proj"]
      {'kernel': P('model', 'fsdp')}
    """
    fsdp = "fsdp" if "fsdp" in mesh_axes else None
    tp = "model" if "model" in mesh_axes else None

    def spec(path: tuple, leaf: Any) -> PartitionSpec:
        keys = [str(getattr(k, "key", k)) for k in path]
        module, name = (keys[-2] if len(keys) > 1 else ""), keys[-1]
        scanned = keys[:2] == ["model", "layers"] and not (len(keys) > 2 and keys[2].isdigit())
        lead = (None,) if scanned else ()
        if name == "embedding":
            return PartitionSpec(tp, fsdp)
        if name == "kernel" and module in COLUMN_PARALLEL:
            return PartitionSpec(*lead, fsdp, tp)
        if name == "kernel" and module in ROW_PARALLEL:
            return PartitionSpec(*lead, tp, fsdp)
        if name == "bias" and module in COLUMN_PARALLEL:
            return PartitionSpec(*lead, tp)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, abstract_params)
