"""`optimizer(tx, params)`: train the adapters, freeze the rest.

Built on `optax.partition`: adapter leaves get `tx`, every other leaf gets
`optax.set_to_zero()`, so the base receives zero updates and no optimizer state (``optax.masked``
alone would pass the base's updates through unchanged).

Which adapter leaves are trained and which LoRA+ speeds up is declared by the adapter methods
(`rslora_jax.core.Leaf`: ``trainable``, ``fast``), looked up by leaf name; an adapter leaf no
registered method declares is trained.

LoRA+ (Hayou et al. 2024, PEFT's ``create_loraplus_optimizer``): ``lora_plus_ratio`` gives the
B factors a learning rate ``ratio`` times that of the A factors. Which leaves count as "B"
follows PEFT's rule (``lora_B`` or any 1-D trainable parameter): ``lora_b`` (RaSA's shared
``lora_b`` included), DoRA's ``lora_magnitude`` and RaSA's ``lora_d``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

from rslora_jax._types import PyTree
from rslora_jax.core import extras as ex
from rslora_jax.core.protocol import leaf_role
from rslora_jax.core.tree import is_adapter_path

ADAPTER = "adapter"
FROZEN = "frozen"
# LoRA+ groups: leaves that get `ratio` times the learning rate, and the other leaves.
FAST = "fast"
OTHER = "other"


def _leaf_name(path: tuple) -> Any:
    return getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None


def _role(path: tuple) -> Any:
    name = _leaf_name(path)
    return ex.role(name) or leaf_role(name)


def _trained(path: tuple) -> bool:
    if not is_adapter_path(path):
        return False
    role = _role(path)
    return role is None or role.trainable


def labels(tree: PyTree) -> PyTree:
    """``"adapter"`` for trained adapter leaves, ``"frozen"`` for the rest (same structure).

    Example:
      >>> labels({"d": {"kernel": 0, "lora_a": 0}})
      {'d': {'kernel': 'frozen', 'lora_a': 'adapter'}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ADAPTER if _trained(path) else FROZEN, tree
    )


def lora_plus_labels(tree: PyTree) -> PyTree:
    """``"fast"`` for the leaves LoRA+ speeds up (their `Leaf` says ``fast``), ``"other"`` else.

    Example:
      >>> import jax.numpy as jnp
      >>> lora_plus_labels({"d": {"kernel": 0, "lora_a": 0, "lora_b": 0}})
      {'d': {'kernel': 'other', 'lora_a': 'other', 'lora_b': 'fast'}}
    """

    def label(path: tuple, leaf: Any) -> str:
        if not is_adapter_path(path):
            return OTHER
        keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
        if ex.FULL in keys:
            return FAST if ex.is_fast_copy(keys, leaf) else OTHER
        if ex.TOKENS in keys:
            return OTHER
        role = _role(path)
        return FAST if role is not None and role.fast else OTHER

    return jax.tree_util.tree_map_with_path(label, tree)


def optimizer(
    tx: optax.GradientTransformation,
    params: PyTree | None = None,
    *,
    lora_plus_ratio: float | None = None,
) -> Any:
    """An optimizer that updates only the adapter leaves.

    Labels are computed from each tree's paths, so the same optimizer works with the whole tree
    (``grad`` over all params; base leaves get zero updates and no state) or with the adapters
    alone (``grad`` over the first output of `split`, which allocates no base-sized gradient):
    call ``init`` and ``update`` on the same kind of tree.

    Args:
      tx: the optax transformation for the adapters (e.g. ``optax.adamw(1e-4)``).
      params: optional; if given, checked to hold at least one adapter leaf.
      lora_plus_ratio: LoRA+: B's learning rate over A's (``eta_B / eta_A``, e.g. 16). `tx`
        runs on all adapters together, then the B leaves' updates are multiplied by the ratio.
        That equals training B with ``ratio`` times the learning rate whenever `tx`'s update is
        the learning rate times a direction that does not depend on it: SGD (with momentum),
        Adam, AdamW (the decoupled weight decay is multiplied by the learning rate too, as in
        ``torch.optim.AdamW``), Lion, RMSProp. Global-norm clipping inside `tx` still sees all
        adapters at once, as with PyTorch parameter groups. Not exact for optimizers whose
        state depends on the learning rate (e.g. schedule-free or learning-rate-free methods).

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: if `params` is given and has no adapter leaves, or `lora_plus_ratio` is not
        a positive finite number.

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
      >>> plus = optimizer(optax.sgd(0.5), p, lora_plus_ratio=4.0)  # LoRA+: B learns 4x faster
      >>> upd, _ = plus.update(g, plus.init(p), p)
      >>> upd["d"]["lora_a"].tolist(), upd["d"]["lora_b"].tolist()
      ([[-0.5], [-0.5]], [[-2.0, -2.0]])
    """
    if params is not None:
        flat = jax.tree_util.tree_leaves_with_path(params)
        if not any(is_adapter_path(p) for p, _ in flat):
            raise ValueError(
                "optimizer(tx, params): params hold no adapter leaves (keys starting with "
                "'lora_'); call rslora_jax.init first"
            )
    frozen_base = optax.partition({ADAPTER: tx, FROZEN: optax.set_to_zero()}, labels)
    if lora_plus_ratio is None:
        return frozen_base
    ratio = lora_plus_ratio
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float))
        or not math.isfinite(ratio)
        or ratio <= 0
    ):
        raise ValueError(
            f"optimizer(lora_plus_ratio=...) must be a positive finite number, got {ratio!r}"
        )
    # Scaling the final update by `ratio` is scaling the learning rate (see the docstring).
    speed_up = optax.partition(
        {FAST: optax.scale(float(ratio)), OTHER: optax.identity()}, lora_plus_labels
    )
    return optax.chain(frozen_base, speed_up)


__all__ = ["labels", "lora_plus_labels", "optimizer"]
