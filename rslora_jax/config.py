"""Moved to `rslora_jax.core.config`; this module re-exports it for existing imports."""

from rslora_jax.core.config import ALL_LINEAR, LoraConfig, matches

__all__ = ["ALL_LINEAR", "LoraConfig", "matches"]
