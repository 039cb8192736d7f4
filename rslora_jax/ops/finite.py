"""Finiteness checks on parameter trees: which leaves hold a NaN or an infinity.

One jitted reduction per tree (a scalar per leaf comes back to the host, never the arrays), so
the check costs a read of the values on their devices. Used by `merge(..., safe_merge=True)`,
the Hugging Face and PEFT exports and imports, and the fine-tuning command.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rslora_jax._types import PyTree


class NonFiniteError(ValueError):
    """A tree that must hold finite values holds a NaN or an infinity."""


def _key(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


@functools.partial(jax.jit, static_argnums=1)
def _all_finite(leaves: list[jax.Array], dtype: Any) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x if dtype is None else x.astype(dtype))) for x in leaves]


def nonfinite_paths(tree: PyTree, dtype: Any = None) -> list[str]:
    """The '/'-joined paths of the floating-point leaves of `tree` holding a NaN or an infinity.

    Args:
      tree: a pytree of arrays (jax or numpy); integer leaves and other objects are skipped.
      dtype: check the values cast to this dtype (what a file of that dtype would hold: large
        values overflow float16); None checks them as they are. The cast is fused into the
        check, no copy is made.

    Returns:
      The paths, in tree order (empty when every value is finite).

    Raises:
      ValueError: if a leaf is a tracer (inside `jax.jit`: the values are not known yet).

    Example:
      >>> import numpy as np
      >>> nonfinite_paths({"a": np.ones(2), "b": {"kernel": np.array([1.0, np.nan])}})
      ['b/kernel']
    """
    device: list[tuple[str, jax.Array]] = []
    bad: dict[str, bool] = {}
    order: list[str] = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not _is_float(leaf):
            continue
        name = "/".join(_key(k) for k in path)
        order.append(name)
        if isinstance(leaf, jax.core.Tracer):
            raise ValueError(
                f"the finiteness of {name!r} cannot be checked inside jax.jit (a traced value); "
                "check the concrete result instead"
            )
        if isinstance(leaf, jax.Array):
            device.append((name, leaf))
        else:
            x = np.asarray(leaf)
            bad[name] = not bool(np.isfinite(x if dtype is None else x.astype(dtype)).all())
    if device:
        flags = _all_finite([x for _, x in device], None if dtype is None else np.dtype(dtype))
        for (name, _), ok in zip(device, flags):
            bad[name] = not bool(ok)
    return [name for name in order if bad[name]]


def check_finite(tree: PyTree, what: str) -> None:
    """Raises `NonFiniteError` naming the leaves of `tree` that hold a NaN or an infinity.

    Args:
      tree: the tree to check.
      what: what the tree is, for the message (e.g. ``"export_peft: the adapters"``).

    Raises:
      NonFiniteError: (a ValueError) listing up to 10 paths and how many there are.

    Example:
      >>> import numpy as np
      >>> check_finite({"w": np.array([np.inf])}, "the example")
      Traceback (most recent call last):
      ...
      rslora_jax.ops.finite.NonFiniteError: the example hold NaN or Inf values at 1 leaf: ['w']
    """
    bad = nonfinite_paths(tree)
    if bad:
        raise NonFiniteError(
            f"{what} hold NaN or Inf values at {len(bad)} leaf{'s' if len(bad) > 1 else ''}: "
            f"{bad[:10]}{' ...' if len(bad) > 10 else ''}"
        )


__all__ = ["NonFiniteError", "check_finite", "nonfinite_paths"]
