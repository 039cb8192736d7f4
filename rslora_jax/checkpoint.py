"""Moved to `rslora_jax.ops.checkpoint`; this module re-exports it for existing imports."""

from rslora_jax.ops.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_adapters,
    manifest,
    save_adapters,
)

__all__ = ["CheckpointError", "CheckpointManager", "load_adapters", "manifest", "save_adapters"]
