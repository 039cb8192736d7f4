"""Execution: the math of an adapted layer, with no imports of ours outside this package.

- `rslora_jax.execution.lowrank`: the factored products ``scale * (x @ A) @ B`` (matmul, einsum,
  grouped over projections sharing an input).
- `rslora_jax.execution.fused`: ``x @ (W + scale * A @ B)`` with a low-rank custom VJP.
- `rslora_jax.execution.dispatch`: decides fused or factored per layer and call, and computes.
"""

from rslora_jax.execution.dispatch import Contraction, adapted, adapted_group, choose
from rslora_jax.execution.fused import merged_matmul, prefers_fused

__all__ = ["Contraction", "adapted", "adapted_group", "choose", "merged_matmul", "prefers_fused"]
