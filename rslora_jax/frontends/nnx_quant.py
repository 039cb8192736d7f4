"""A quantized frozen base for NNX models: `quantize_model`.

The kernels of the targeted ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` layers become
`rslora_jax.execution.quant.QuantizedArray` values of their `nnx.Param`. Layers with adapters
(`rslora_jax.frontends.nnx.add_adapters`, before or after quantizing) read them through the
dispatch, which dequantizes inside the adapted matmul (fused or factored). A targeted
``Linear`` / ``LinearGeneral`` without an adapter becomes `QuantLinear` / `QuantLinearGeneral`,
whose call is its einsum with the kernel dequantized per call (`QuantizedArray`s cannot enter
flax's own ``dot_general``); `add_adapters` adapts those as their plain classes, and
`rslora_jax.nnx.merge` leaves them quantized. A plain ``Einsum`` cannot be quantized without an
adapter (its call re-parses the equation at call time): quantize it after `add_adapters`.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from rslora_jax.core.config import ALL_LINEAR, LoraConfig, TargetSpec
from rslora_jax.execution.dispatch import Contraction
from rslora_jax.execution.quant import is_quantized
from rslora_jax.frontends import nnx as nnx_frontend
from rslora_jax.frontends.nnx import (
    QUANT_CLASSES,
    LoraLinear,
    LoraLinearGeneral,
    _full_roles,
    _join,
    _kernel_modules,
    _LoraLayer,
    _set_class,
)
from rslora_jax.ops.quantize import loader_transform


class QuantLinear(nnx.Linear):
    """`nnx.Linear` whose kernel is quantized (made by `quantize_model`)."""

    _exact = _LoraLayer._exact

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        lin: Contraction = LoraLinear._contraction(self, inputs, out_sharding)
        return lin.plain(inputs)


class QuantLinearGeneral(nnx.LinearGeneral):
    """`nnx.LinearGeneral` whose kernel is quantized (made by `quantize_model`)."""

    _exact = _LoraLayer._exact

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        lin: Contraction = LoraLinearGeneral._contraction(self, inputs, out_sharding)
        return lin.plain(inputs)


QUANT_CLASSES.update({nnx.Linear: QuantLinear, nnx.LinearGeneral: QuantLinearGeneral})


def quantize_model(
    model: Any,
    scheme: str = "nf4",
    *,
    targets: TargetSpec = ALL_LINEAR,
    exclude: TargetSpec | None = None,
    block: int = 64,
    double_quant: bool = False,
) -> Any:
    """Quantizes the targeted layers' kernels of an NNX model, in place.

    Args:
      model: an NNX module, with or without adapters.
      scheme: ``"int8"``, ``"nf4"`` or ``"fp8"`` (`rslora_jax.quantize`).
      targets: which layers (forms of ``LoraConfig.targets``, on '/'-joined NNX paths); by
        default every layer with a kernel except ``lm_head``.
      exclude: layers to leave alone.
      block: nf4 block size.
      double_quant: nf4: quantize the block scales too.

    Returns:
      `model`.

    Raises:
      ValueError: unknown scheme, no layer matched, an already quantized kernel, a block that
        divides no axis, or a targeted layer that cannot hold a quantized kernel (naming it).

    Example:
      >>> import jax.numpy as jnp
      >>> layer = quantize_model(nnx.Linear(64, 4, rngs=nnx.Rngs(0)), "nf4")
      >>> type(layer).__name__, layer(jnp.ones((2, 64))).shape
      ('QuantLinear', (2, 4))
    """
    plan = []
    for path, module in _kernel_modules(model):
        p = _join(path)
        config = LoraConfig(targets=targets, exclude=exclude)
        if not config.is_target(p, module.kernel.get_raw_value()):
            continue
        adapted = isinstance(module, nnx_frontend._LoraLayer)
        if not adapted and type(module) not in QUANT_CLASSES:
            raise ValueError(
                f"quantize_model: {type(module).__name__} at {p!r} holds no adapter and cannot "
                "compute with a quantized kernel (Linear and LinearGeneral can; quantize an "
                "Einsum after add_adapters): exclude it"
            )
        roles = _full_roles(module, p)
        axes_config = LoraConfig(kernel_axes={".*": roles} if len(roles) != 2 else None)
        plan.append((p, module, adapted, axes_config))
    if not plan:
        raise ValueError(f"quantize_model: targets={targets!r} matched no layer with a kernel")
    for p, module, adapted, axes_config in plan:
        kernel = module.kernel.get_raw_value()
        if is_quantized(kernel):
            raise ValueError(f"quantize_model: the kernel at {p!r} is already quantized")
        transform = loader_transform(
            scheme, config=axes_config, targets=".*", block=block, double_quant=double_quant
        )
        module.kernel.set_value(transform(f"{p}/kernel" if p else "kernel", kernel))
        if not adapted:
            _set_class(module, QUANT_CLASSES[type(module)])
    return model


__all__ = ["QuantLinear", "QuantLinearGeneral", "quantize_model"]
