"""The core: the config, paths and target matching, kernel layouts, tree operations, the method
protocol and its registry, and the hook models use to claim their projections.

Imports nothing of ours outside `rslora_jax.core` (and `rslora_jax._types`); methods, execution,
operations and frontends build on it.
"""

from rslora_jax.core.config import ALL_LINEAR, LoraConfig, matches
from rslora_jax.core.layout import KernelLayout
from rslora_jax.core.protocol import (
    Initialiser,
    Leaf,
    Method,
    Site,
    register_init,
    register_method,
)
from rslora_jax.core.sites import layout_for, path_key, target_paths, target_sites
from rslora_jax.core.tree import (
    adapter_paths,
    combine,
    is_adapter_key,
    is_adapter_path,
    join_path,
    num_adapter_params,
    split,
)

__all__ = [
    "ALL_LINEAR",
    "Initialiser",
    "KernelLayout",
    "Leaf",
    "LoraConfig",
    "Method",
    "Site",
    "adapter_paths",
    "combine",
    "is_adapter_key",
    "is_adapter_path",
    "join_path",
    "layout_for",
    "matches",
    "num_adapter_params",
    "path_key",
    "register_init",
    "register_method",
    "split",
    "target_paths",
    "target_sites",
]
