"""DoRA and PiSSA/OLoRA: moved to `rslora_jax.methods.dora` and `rslora_jax.methods.inits`;
re-exported here for existing imports."""

from __future__ import annotations

import jax

from rslora_jax._types import PRNGKey
from rslora_jax.core import protocol
from rslora_jax.methods.dora import MAGNITUDE, DoRA, column_norm, dora_matrix
from rslora_jax.methods.inits import OLoRA, PiSSA
from rslora_jax.ops.init import principal_init


def principal_factors(
    w: jax.Array, r: int, scale: float, init: str, key: PRNGKey | None = None
) -> tuple[jax.Array, jax.Array]:
    """PiSSA / OLoRA factors (A, B) of a (..., d_in, d_out) matrix, as PEFT computes them.

    Raises:
      ValueError: for an unknown `init`, or a randomized SVD without a key.

    Example:
      >>> import jax.numpy as jnp
      >>> a, b = principal_factors(jnp.diag(jnp.array([4.0, 1.0])), 1, 2.0, "pissa")
      >>> (2.0 * a @ b).round(5).tolist()
      [[4.0, 0.0], [0.0, 0.0]]
    """
    found = protocol.parse_init(init)
    if found is None or not found.modifies_base:
        raise ValueError(f"principal_factors: unknown init {init!r}")
    if key is None:
        if getattr(found, "niter", None) is not None:
            raise ValueError(f"init={init!r} (randomized SVD) needs a PRNG key")
        key = jax.random.key(0)
    return found.factors(w, r, scale, key)


__all__ = [
    "MAGNITUDE",
    "DoRA",
    "OLoRA",
    "PiSSA",
    "column_norm",
    "dora_matrix",
    "principal_factors",
    "principal_init",
]
