"""`optimizer(tx, params)`: train the adapters, freeze the rest.

Built on `optax.partition`: adapter leaves get `tx`, every other leaf gets
`optax.set_to_zero()`, so the base receives zero updates and no optimizer state (``optax.masked``
alone would pass the base's updates through unchanged).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from rslora_jax._types import PyTree
from rslora_jax.adapters import is_adapter_path

ADAPTER = "adapter"
FROZEN = "frozen"


def labels(tree: PyTree) -> PyTree:
    """``"adapter"`` for adapter leaves, ``"frozen"`` for the rest (same structure as `tree`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ADAPTER if is_adapter_path(path) else FROZEN, tree
    )


def optimizer(tx: optax.GradientTransformation, params: PyTree | None = None) -> Any:
    """An optimizer that updates only the adapter leaves.

    Labels are computed from each tree's paths, so the same optimizer works with the whole tree
    (``grad`` over all params; base leaves get zero updates and no state) or with the adapters
    alone (``grad`` over the first output of `split`, which allocates no base-sized gradient):
    call ``init`` and ``update`` on the same kind of tree.

    Args:
      tx: the optax transformation for the adapters (e.g. ``optax.adamw(1e-4)``).
      params: optional; if given, checked to hold at least one adapter leaf.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: if `params` is given and has no adapter leaves.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> p = {"d": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1)),
      ...            "lora_b": jnp.zeros((1, 2))}}
      >>> opt = optimizer(optax.sgd(0.5), p)
      >>> g = {"d": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1)),
      ...            "lora_b": jnp.ones((1, 2))}}
      >>> upd, _ = opt.update(g, opt.init(p), p)
      >>> upd["d"]["kernel"].tolist(), upd["d"]["lora_b"].tolist()
      ([[0.0, 0.0], [0.0, 0.0]], [[-0.5, -0.5]])
    """
    if params is not None:
        flat = jax.tree_util.tree_leaves_with_path(params)
        if not any(is_adapter_path(p) for p, _ in flat):
            raise ValueError(
                "optimizer(tx, params): params hold no adapter leaves (keys starting with "
                "'lora_'); call rslora_jax.init first"
            )
    return optax.partition({ADAPTER: tx, FROZEN: optax.set_to_zero()}, labels)


__all__ = ["labels", "optimizer"]
