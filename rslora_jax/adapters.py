"""Moved to `rslora_jax.core.tree` and `rslora_jax.ops.init`; re-exported for existing imports."""

from rslora_jax.core.sites import target_paths
from rslora_jax.core.tree import (
    KERNEL,
    adapted_holders,
    adapter_paths,
    combine,
    is_adapter_key,
    is_adapter_path,
    iter_holders,
    join_path,
    num_adapter_params,
    split,
)
from rslora_jax.ops.init import init, init_adapters

__all__ = [
    "KERNEL",
    "adapted_holders",
    "adapter_paths",
    "combine",
    "init",
    "init_adapters",
    "is_adapter_key",
    "is_adapter_path",
    "iter_holders",
    "join_path",
    "num_adapter_params",
    "split",
    "target_paths",
]
