"""Flax NNX support: moved to `rslora_jax.frontends.nnx`; re-exported here (``import
rslora_jax.nnx as rln`` keeps working)."""

from rslora_jax.frontends.nnx import *  # noqa: F403
from rslora_jax.frontends.nnx import __all__  # noqa: F401
