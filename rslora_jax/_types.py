"""Type aliases shared across the package."""

from __future__ import annotations

from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any
Params = dict[str, Any]

__all__ = ["Array", "PRNGKey", "Params", "PyTree"]
