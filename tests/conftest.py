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


def _has_flax_transformers() -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return int(transformers.__version__.split(".")[0]) < 5


def pytest_collection_modifyitems(config, items):
    """Deselects `hf_flax` tests where transformers has no Flax classes (transformers >= 5).

    They are not skipped silently: `scripts/test.sh` runs them in a transformers<5 environment
    and fails if that run collects none. Deselection is reported in the summary line.
    """
    if _has_flax_transformers():
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("hf_flax") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
