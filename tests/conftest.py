"""Test-session setup: 8 fake CPU devices (sharding tests), strict dtype promotion."""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _strict_promotion(request):
    """Silent bf16 -> f32 promotions show up as errors in our own code paths.

    Tests that run third-party code which is not strict-promotion clean (transformers Flax
    classes, optax's Adam bias correction) opt out with the `loose_dtypes` marker.
    """
    if request.node.get_closest_marker("loose_dtypes"):
        yield
        return
    with jax.numpy_dtype_promotion("strict"):
        yield
