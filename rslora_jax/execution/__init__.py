"""Execution: the math of an adapted layer, with no imports of ours outside this package.

- `rslora_jax.execution.lowrank`: the factored products ``scale * (x @ A) @ B`` (matmul, einsum,
  grouped over projections sharing an input).
- `rslora_jax.execution.fused`: ``x @ (W + scale * A @ B)`` with a low-rank custom VJP.
- `rslora_jax.execution.dispatch`: decides fused or factored per layer and call, and computes.
- `rslora_jax.execution.quant`: quantized frozen kernels (`QuantizedArray`: int8, nf4, fp8) and
  the matmul that dequantizes them per call.
"""

from rslora_jax.execution.dispatch import Contraction, adapted, adapted_group, choose
from rslora_jax.execution.fused import merged_matmul, prefers_fused
from rslora_jax.execution.quant import QuantizedArray, dequantize, quantize_array

__all__ = [
    "Contraction",
    "QuantizedArray",
    "adapted",
    "adapted_group",
    "choose",
    "dequantize",
    "merged_matmul",
    "prefers_fused",
    "quantize_array",
]
