"""The merged forward with low-rank gradients: one matmul per adapted projection.

The factored forward ``y = x @ W + gamma * (x @ A) @ B`` reads and writes activation-sized
arrays several times per projection (the ``(x @ A) @ B`` product, its add to ``x @ W``, and in
the backward pass the ``dy @ B^T @ A^T`` product and its add to ``dy @ W^T``). When a call holds
more tokens than the layer has features, forming ``W + gamma * A @ B`` on the fly is cheaper:

- forward: ``W' = cast(W + gamma * A @ B)`` (``A @ B`` from the factors in the compute dtype,
  accumulated, scaled and added in float32, cast once), ``y = x @ W'``, plus the rank-sized
  ``x @ A`` kept for the backward pass;
- backward (`jax.custom_vjp`): ``dx = dy @ W'^T`` (W' recomputed, so no kernel-sized residual),
  ``g = gamma * dy @ B^T``, ``dA = x^T @ g`` and ``dB = gamma * (x @ A)^T @ dy``. The kernel
  gradient ``x^T @ dy`` is returned too, so differentiating w.r.t. the base is correct, and XLA
  drops it when only the adapters are differentiated (the usual case). Being a custom VJP, it
  supports reverse mode only (``jax.jvp`` raises; use the factored forward for forward mode). A
  custom JVP rule in factored form would allow both, but measured slower here (XLA's byte estimate
  of the tiny CPU step at 4x512: 2.42 GB against 2.31 GB; factored 2.53 GB).

A kernel may be a quantized frozen base (`rslora_jax.execution.quant.QuantizedArray`): ``W``
is then ``dequant(Wq)``, formed in float32 with the update, in the forward pass and again in the
backward pass (still no kernel-sized residual), and its cotangent is zero (it is frozen).

The result equals the factored forward up to rounding in the compute dtype (tested). Several
projections that read the same input (q/k/v, gate/up) are one call: ``x @ [A_1 | A_2 | ...]``
and ``x^T @ [g_1 | g_2 | ...]`` are single matmuls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax.execution.quant import dense, is_quantized, zero_cotangent

_F32 = jnp.float32


def _merged(w, a, b, scale: float, dtype: Any, precision: Any) -> jax.Array:
    """``cast(W + scale * A @ B)``: the factors in the compute dtype, as the factored path
    multiplies them (bf16 tensor-core matmul at bf16 compute, not a float32 one, which at rank
    256 would cost more than the adapters' other matmuls together), accumulated and added to
    ``W`` in float32, cast once."""
    ab = _mm(a.astype(dtype), b.astype(dtype), precision, out=_F32)
    return (dense(w, _F32) + ab * _F32(scale)).astype(dtype)


def _mm(x: jax.Array, y: jax.Array, precision: Any, out: Any = None) -> jax.Array:
    return jnp.matmul(x, y, precision=precision, preferred_element_type=out)


def _tmm(x: jax.Array, y: jax.Array, precision: Any) -> jax.Array:
    """``x^T @ y`` over all leading axes, accumulated and returned in float32."""
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.reshape(-1, y.shape[-1])
    return jax.lax.dot_general(
        x2, y2, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=_F32
    )


def prefers_fused(tokens: int, d_in: int, d_out: int) -> bool:
    """The cost rule of ``lora(mode="auto")``: fuse when ``tokens * (d_in + d_out) >= d_in * d_out``.

    The factored path moves about ``tokens * (d_in + d_out)`` more activation elements than the
    fused one (the ``(x @ A) @ B`` output and its add; ``dy @ B^T @ A^T`` and its add); the fused
    one moves about ``d_in * d_out`` more weight elements (forming ``W + gamma * A @ B`` in the
    forward and again in the backward pass). `benchmarks/bench_fused.py` measures the crossover.

    Example:
      >>> prefers_fused(8192, 2048, 2048), prefers_fused(8, 2048, 2048)
      (True, False)
    """
    return tokens * (d_in + d_out) >= d_in * d_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _group(x, kernels, a_s, b_s, scales, dtype, precision):
    ys, _ = _group_fwd(x, kernels, a_s, b_s, scales, dtype, precision)
    return ys


def _group_fwd(x, kernels, a_s, b_s, scales, dtype, precision):
    xc = x.astype(dtype)
    ys = tuple(
        _mm(xc, _merged(w, a, b, s, dtype, precision), precision)
        for w, a, b, s in zip(kernels, a_s, b_s, scales)
    )
    a_cat = jnp.concatenate([a.astype(dtype) for a in a_s], axis=-1)
    xa = _mm(xc, a_cat, precision)
    return ys, (x, kernels, a_s, b_s, xa)


def _group_bwd(scales, dtype, precision, res, dys):
    x, kernels, a_s, b_s, xa = res
    xc = x.astype(dtype)
    dys = tuple(dy.astype(dtype) for dy in dys)
    dx = None
    for w, a, b, s, dy in zip(kernels, a_s, b_s, scales, dys):
        part = _mm(dy, _merged(w, a, b, s, dtype, precision).T, precision)
        dx = part if dx is None else dx + part
    g = jnp.concatenate(
        [
            _mm(dy, b.astype(dtype).T, precision) * jnp.asarray(s, dtype)
            for b, s, dy in zip(b_s, scales, dys)
        ],
        axis=-1,
    )
    da_cat = _tmm(xc, g, precision)
    da_s, db_s, dw_s, offset = [], [], [], 0
    for w, a, b, s, dy in zip(kernels, a_s, b_s, scales, dys):
        r = a.shape[-1]
        da_s.append(da_cat[:, offset : offset + r].astype(a.dtype))
        xa_j = xa[..., offset : offset + r]
        db_s.append((_tmm(xa_j, dy, precision) * _F32(s)).astype(b.dtype))
        if is_quantized(w):
            dw_s.append(zero_cotangent(w))  # a quantized base is frozen
        else:
            dw_s.append(_tmm(xc, dy, precision).astype(w.dtype))
        offset += r
    return dx.astype(x.dtype), tuple(dw_s), tuple(da_s), tuple(db_s)


_group.defvjp(_group_fwd, _group_bwd)


def merged_matmul(
    x: jax.Array,
    kernels: Sequence[jax.Array],
    factors: Sequence[tuple[jax.Array, jax.Array]],
    scales: Sequence[float],
    dtype: Any,
    precision: Any = None,
) -> tuple[jax.Array, ...]:
    """``x @ (W_j + scale_j * A_j @ B_j)`` for projections that share the input `x`.

    Gradients flow to `x`, the kernels and the factors; the adapter gradients are computed in
    low-rank form (see the module docstring), never through a ``(d_in, d_out)`` matrix.

    Args:
      x: the input, ``(..., d_in)``.
      kernels: one ``(d_in, d_out_j)`` kernel per projection: an array, or a quantized base
        (`rslora_jax.execution.quant.QuantizedArray`, dequantized per call).
      factors: one ``(A_j, B_j)`` pair per projection, ``(d_in, r_j)`` and ``(r_j, d_out_j)``.
      scales: the adapter scale ``gamma_j`` of each projection (static floats).
      dtype: the compute dtype (the layer's ``dtype``); the merged kernel is formed in float32
        and cast to it once.
      precision: the matmul precision (as for ``jnp.matmul``).

    Returns:
      One output ``(..., d_out_j)`` per projection, in `dtype`.

    Raises:
      ValueError: if the shapes do not fit together.

    Example:
      >>> import jax.numpy as jnp
      >>> x, w = jnp.ones((2, 3)), jnp.zeros((3, 4))
      >>> a, b = jnp.ones((3, 1)), jnp.ones((1, 4))
      >>> (y,) = merged_matmul(x, [w], [(a, b)], [0.5], jnp.float32)
      >>> y.tolist()
      [[1.5, 1.5, 1.5, 1.5], [1.5, 1.5, 1.5, 1.5]]
    """
    kernels, factors, scales = tuple(kernels), tuple(factors), tuple(float(s) for s in scales)
    if not (len(kernels) == len(factors) == len(scales)) or not kernels:
        raise ValueError(
            f"merged_matmul needs one kernel, factor pair and scale per projection; got "
            f"{len(kernels)} kernels, {len(factors)} factor pairs, {len(scales)} scales"
        )
    d_in = x.shape[-1]
    for j, (w, (a, b)) in enumerate(zip(kernels, factors)):
        if (
            w.ndim != 2
            or w.shape[0] != d_in
            or a.shape != (d_in, a.shape[-1])
            or b.shape != (a.shape[-1], w.shape[1])
        ):
            raise ValueError(
                f"merged_matmul projection {j}: input (..., {d_in}) needs kernel ({d_in}, d_out), "
                f"lora_a ({d_in}, r), lora_b (r, d_out); got kernel {tuple(w.shape)}, lora_a "
                f"{tuple(a.shape)}, lora_b {tuple(b.shape)}"
            )
    a_s = tuple(a for a, _ in factors)
    b_s = tuple(b for _, b in factors)
    return _group(x, kernels, a_s, b_s, scales, jnp.dtype(dtype), precision)


__all__ = ["merged_matmul", "prefers_fused"]
