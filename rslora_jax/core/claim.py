"""The hook a model uses to compute its own adapters (faster than per-layer interception).

Inside a `rslora_jax.lora` call, `active()` returns the running `Claims`. A model that knows its
structure (e.g. `rslora_jax.models.llama`, whose q/k/v and gate/up projections share an input)
claims adapted projections and computes them itself with
`rslora_jax.frontends.site.group_output` (one ``x @ [A_1 | A_2 | ...]`` for all projections of
one input, or one merged matmul each). The linen interceptor leaves claimed modules alone, so
each adapter is applied exactly once. Outside `lora` (plain ``model.apply``, or
``mode="merged"``), `active()` is None and the model ignores adapter leaves, like any linen model.
Every method can be claimed: the computation goes through the method protocol.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

from rslora_jax.core.config import LoraConfig
from rslora_jax.core.tree import is_adapted

_ACTIVE: contextvars.ContextVar[Claims | None] = contextvars.ContextVar(
    "rslora_jax_claims", default=None
)


class Claims:
    """State of one `lora` call, as seen by models that compute adapters themselves.

    Attributes:
      config: the adapter config.
      skip: paths that are merged by the caller (not to be claimed).
      mode: ``"factored"``, ``"fused"`` or ``"auto"``.
      shared: the params' top-level adapter entries (e.g. RaSA pools), by key.
      rows: one adapter index per batch row when several adapters (stacked on a leading axis)
        serve one batch, else None.
      claimed: the paths claimed so far.
    """

    def __init__(
        self,
        config: LoraConfig,
        skip: frozenset[str],
        mode: str,
        shared: Mapping[str, Any] | None = None,
        rows: Any = None,
    ):
        self.config = config
        self.skip = skip
        self.mode = mode
        self.shared = dict(shared or {})
        self.rows = rows
        self.claimed: set[str] = set()

    def claim(self, path: str, holder: Mapping[str, Any] | None) -> bool:
        """Claims the adapter at `path` (whose params dict is `holder`) for the model to compute.

        Returns False (the interceptor keeps it, or it has no adapter) if the dict has no adapter
        leaves or the path is merged by the caller.
        """
        if holder is None or path in self.skip or not is_adapted(holder):
            return False
        self.claimed.add(path)
        return True


def active() -> Claims | None:
    """The `Claims` of the enclosing `rslora_jax.lora` call, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(
    config: LoraConfig,
    skip: frozenset[str],
    mode: str,
    shared: Mapping[str, Any] | None = None,
    rows: Any = None,
) -> Iterator[Claims]:
    """Makes a `Claims` active for the duration of a model call."""
    state = Claims(config, skip, mode, shared, rows)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


__all__ = ["Claims", "activate", "active"]
