"""Moved to `rslora_jax.execution.fused`; this module re-exports it for existing imports."""

from rslora_jax.execution.fused import merged_matmul, prefers_fused

__all__ = ["merged_matmul", "prefers_fused"]
