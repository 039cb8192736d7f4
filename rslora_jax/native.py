"""A hook for models that compute their own adapters (faster than per-layer interception).

Inside a `rslora_jax.lora` call, `active()` returns the running `NativeLoRA`. A model that knows
its structure (e.g. `rslora_jax.models.llama`, whose q/k/v and gate/up projections share an
input) can claim adapted projections and compute them itself, for instance with one matmul for
the A factors of all projections that read the same input. The interceptor then leaves claimed
modules alone, so each adapter is applied exactly once. Outside `lora` (plain ``model.apply``, or
``mode="merged"``), `active()` is None and the model ignores adapter leaves, like any linen model.

Only plain LoRA pairs are claimable: RaSA, DoRA and dropout stay with the generic interceptor.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax import fused
from rslora_jax.config import LoraConfig

_ACTIVE: contextvars.ContextVar[NativeLoRA | None] = contextvars.ContextVar(
    "rslora_jax_native", default=None
)
PLAIN_KEYS = frozenset({"kernel", "bias", "lora_a", "lora_b"})


class NativeLoRA:
    """State of one `lora` call, as seen by models that compute adapters themselves."""

    def __init__(
        self,
        config: LoraConfig,
        skip: frozenset[str],
        enabled: bool,
        fused: bool | None = False,
    ):
        self.config = config
        self.skip = skip
        self.enabled = enabled
        # True under ``lora(..., mode="fused")``, None under "auto" (the cost rule decides per
        # call), False under "factored".
        self.fused = fused
        self.claimed: set[str] = set()

    def fuses(self, x: jax.Array, d_outs: list[int]) -> bool:
        """Whether claimed projections of input `x` with outputs `d_outs` use the fused path
        (`rslora_jax.fused.merged_matmul`: merged forward, low-rank gradients)."""
        if self.fused is not None:
            return self.fused
        tokens = math.prod(x.shape[:-1])
        return fused.prefers_fused(tokens, x.shape[-1], sum(d_outs))

    def claim(self, path: str, holder: Mapping[str, Any] | None) -> bool:
        """Claims the adapter at `path` (whose params dict is `holder`) for native computation.

        Returns False (the interceptor keeps it) unless it is a plain LoRA pair that is not
        merged by ``mode="auto"`` and adapter dropout is off.
        """
        if not self.enabled or holder is None or path in self.skip:
            return False
        if "lora_a" not in holder or not set(holder) <= PLAIN_KEYS:
            return False
        self.claimed.add(path)
        return True


def active() -> NativeLoRA | None:
    """The `NativeLoRA` of the enclosing `rslora_jax.lora` call, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(
    config: LoraConfig, skip: frozenset[str], enabled: bool, fused: bool | None = False
) -> Iterator[NativeLoRA]:
    state = NativeLoRA(config, skip, enabled, fused)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def fused_deltas(
    x: jax.Array, holders: list[Mapping[str, Any]], scales: list[float], dtype: Any
) -> list[jax.Array]:
    """``scale_j * (x @ A_j) @ B_j`` for projections that share the input `x`.

    One matmul ``x @ [A_1 | A_2 | ...]`` reads `x` once for all A factors (the products with
    the B factors stay separate). Factors are cast to the compute dtype `dtype`.
    """
    a = jnp.concatenate([h["lora_a"].astype(dtype) for h in holders], axis=-1)
    xa = jnp.matmul(x.astype(dtype), a)
    out, offset = [], 0
    for h, scale in zip(holders, scales):
        r = h["lora_a"].shape[-1]
        part = xa[..., offset : offset + r] * jnp.asarray(scale, dtype)
        out.append(jnp.matmul(part, h["lora_b"].astype(dtype)))
        offset += r
    return out


__all__ = ["NativeLoRA", "activate", "active", "fused_deltas"]
