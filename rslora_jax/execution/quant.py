"""Quantized frozen kernels: `QuantizedArray`, its quantizers and the matmul that reads it.

A QLoRA-style base keeps each frozen kernel as small integer (or fp8) codes plus scales, and
dequantizes it inside the adapted matmul, one layer per call, never the whole model at once.
Three schemes:

- ``"int8"``: per-output-channel absmax, ``W ~ codes * s`` with ``codes`` int8 in [-127, 127]
  and one float32 ``s = absmax / 127`` per output feature (the kernel's input axes reduced).
- ``"nf4"``: the QLoRA paper's 4-bit NormalFloat (Dettmers et al., 2023, arXiv:2305.14314):
  blocks of `block` (64 by default) consecutive elements along the kernel's input axis (for a
  ``(d_in, d_out)`` kernel that is PyTorch's ``(out, in)`` row, the paper's blocks), each scaled
  by its absmax to [-1, 1] and rounded to the nearest of the 16 NF4 values (`nf4_codebook`);
  two codes per byte. Optional double quantisation of the float32 block scales: per output
  feature, the scales minus their mean as int8 with an absmax scale (the paper quantizes them
  to 8 bits in blocks of 256 of the flattened scales; per output feature keeps the scales
  sharded like the kernel, for the same 8 bits per block plus 64 bits per output feature).
- ``"fp8"``: float8 e4m3 codes with a per-output-channel scale ``absmax / 448``.

Why our own module and not qwix's ``QArray`` (the Google library the issue points at):
``QArray`` keeps ``qvalue`` in the logical shape with a sub-byte dtype (``int4``/``nf4``),
whose storage is backend-dependent (one byte per element on the host and in ``nbytes``, packed
only inside some XLA backends) and which safetensors cannot store; double quantisation of the
scales is absent; it brings its own interception providers (its LoRA is a factored provider on
top of them) where we already route every adapted layer through one dispatch with a fused
custom-VJP path; and it registers through flax (``flax.struct``, ``nnx.register_data_type``),
while the execution room imports nothing but JAX. The format here keeps qwix's good idea --
every child has the kernel's rank, so codes and scales shard like the kernel -- in ~300 lines:
a plain JAX pytree node (`jax.tree_util.register_pytree_node_class`) whose codes are packed
explicitly (``uint8`` for nf4: exactly 4 bits per parameter everywhere).

A `QuantizedArray` is a pytree node: `jax.jit`, `jax.device_put` with a matching tree of
shardings, ``nn.scan`` (which slices its children on a leading layer axis: the block axis is
kept as a negative index so slicing leading axes keeps it valid) and optax partitions see its
children (``codes``, ``scale`` and, with double quantisation, ``scale_scale`` and
``scale_offset``). It is frozen: `quantized_einsum` and the fused path return a zero cotangent
for it.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("int8", "nf4", "fp8")
_F32 = jnp.float32
_FP8 = jnp.float8_e4m3fn
_FP8_MAX = 448.0


@functools.cache
def nf4_codebook() -> np.ndarray:
    """The 16 NF4 values, computed as the QLoRA paper defines them (float32, ascending).

    Normal quantiles ``Phi^-1`` of 8 evenly spaced probabilities from ``offset = 0.9677083`` down
    to 0.5 (the positive half, 7 values plus 0) and of 7 for the negative half, joined with an
    exact zero and normalised to [-1, 1] (bitsandbytes' ``create_normal_map``).

    Example:
      >>> book = nf4_codebook()
      >>> book.shape, float(book[0]), float(book[7]), float(book[-1])
      ((16,), -1.0, 0.0, 1.0)
    """
    offset = 0.9677083
    ppf = statistics.NormalDist().inv_cdf

    def linspace(start: float, stop: float, n: int) -> list[float]:
        grid = np.linspace(start, stop, n, dtype=np.float32)  # as torch.linspace in float32
        return [float(v) for v in grid]

    pos = [ppf(p) for p in linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.asarray([*pos, 0.0, *neg], dtype=np.float32))
    return (values / values.max()).astype(np.float32)


def _nf4_midpoints() -> np.ndarray:
    book = nf4_codebook()
    return ((book[1:] + book[:-1]) / 2).astype(np.float32)


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """A frozen kernel stored quantized (see the module docstring).

    Attributes:
      codes: int8 (``"int8"``), uint8 with two 4-bit codes per byte along the block axis
        (``"nf4"``) or float8_e4m3fn (``"fp8"``); same rank as the kernel.
      scale: float32 scales, same rank as the kernel, each axis either the kernel's size, 1, or
        (nf4, on the block axis) the number of blocks. int8 codes of the scales with double
        quantisation.
      scale_scale: double quantisation only: float32, the scales' scale (block axis of size 1).
      scale_offset: double quantisation only: float32, the scales' mean (same shape).
      scheme: ``"int8"``, ``"nf4"`` or ``"fp8"``.
      axis: nf4: the block (and packing) axis, counted from the end (negative); else None.
      dtype: the logical dtype (what `dequantize` returns by default: the kernel's dtype).
      view: a shape the array is seen in (`reshape`), or None for its own.
    """

    def __init__(
        self,
        codes: Any,
        scale: Any,
        scale_scale: Any = None,
        scale_offset: Any = None,
        *,
        scheme: str,
        axis: int | None,
        dtype: Any,
        view: tuple[int, ...] | None = None,
    ):
        self.codes = codes
        self.scale = scale
        self.scale_scale = scale_scale
        self.scale_offset = scale_offset
        self.scheme = scheme
        self.axis = axis
        self.dtype = np.dtype(dtype)
        self.view = view

    # -- pytree
    def tree_flatten(self):
        children = (self.codes, self.scale, self.scale_scale, self.scale_offset)
        return children, (self.scheme, self.axis, self.dtype, self.view)

    @classmethod
    def tree_unflatten(cls, aux, children):
        scheme, axis, dtype, view = aux
        obj = object.__new__(cls)
        obj.codes, obj.scale, obj.scale_scale, obj.scale_offset = children
        obj.scheme, obj.axis, obj.dtype, obj.view = scheme, axis, dtype, view
        return obj

    # -- array-like
    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The kernel's own shape (before any `reshape` view)."""
        shape = list(self.codes.shape)
        if self.scheme == "nf4":
            shape[self.axis] *= 2
        return tuple(int(s) for s in shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.view if self.view is not None else self.stored_shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.scale_scale is not None

    @property
    def block(self) -> int | None:
        """nf4: elements per block; else None."""
        if self.scheme != "nf4":
            return None
        return self.stored_shape[self.axis] // int(self.scale.shape[self.axis])

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes, scales and the double quantisation's constants."""
        leaves = (self.codes, self.scale, self.scale_scale, self.scale_offset)
        return int(
            sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves if x is not None)
        )

    def __getitem__(self, index: Any) -> QuantizedArray:
        if index is Ellipsis or index == ():
            return self  # `nnx.Variable[...]` reads the value this way
        raise TypeError(
            f"a QuantizedArray ({self.scheme}, shape {self.shape}) cannot be indexed; "
            "dequantize it first (rslora_jax.dequantize)"
        )

    def reshape(self, *shape: Any) -> QuantizedArray:
        """The same codes seen in another shape of the same size (applied by `dequantize`)."""
        if len(shape) == 1 and isinstance(shape[0], Sequence):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != math.prod(self.stored_shape):
            raise ValueError(f"cannot reshape a QuantizedArray of shape {self.shape} to {shape}")
        children, aux = self.tree_flatten()
        return QuantizedArray.tree_unflatten(
            (*aux[:3], None if shape == self.stored_shape else shape), children
        )

    def astype(self, dtype: Any) -> jax.Array:
        """`dequantize` to `dtype` (float32 math, cast once)."""
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        blk = f", block={self.block}" if self.scheme == "nf4" else ""
        try:
            shape = self.shape
        except (AttributeError, TypeError):
            shape = "?"
        return f"QuantizedArray({self.scheme}, shape={shape}, dtype={self.dtype}{blk}{dq})"


def is_quantized(x: Any) -> bool:
    """Whether `x` is a `QuantizedArray`.

    Example:
      >>> is_quantized(jnp.ones(3))
      False
    """
    return isinstance(x, QuantizedArray)


# ---------------------------------------------------------------------------- quantizers
def _check_input(x: Any, scheme: str, where: str) -> None:
    if isinstance(x, QuantizedArray):
        raise ValueError(
            f"{where}: already quantized ({x.scheme}); quantizing twice would compound the "
            "rounding error. Dequantize first (rslora_jax.dequantize) to change the scheme"
        )
    if scheme not in SCHEMES:
        raise ValueError(f"{where}: unknown quantization scheme {scheme!r}; expected {SCHEMES}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{where}: can quantize only floating-point kernels, got {x.dtype}")


def _axes(ndim: int, in_axes: Sequence[int], where: str) -> tuple[int, ...]:
    axes = tuple(sorted({a % ndim for a in in_axes})) if ndim else ()
    if not axes or any(not -ndim <= a < ndim for a in in_axes):
        raise ValueError(f"{where}: in_axes={tuple(in_axes)} are not axes of a {ndim}-d kernel")
    return axes


def _block_axis(
    shape: Sequence[int], axes: tuple[int, ...], outs: tuple[int, ...], block: int
) -> int | None:
    """The nf4 block axis: the last input axis the block divides, else the last output axis."""
    for axis in (*reversed(axes), *reversed(outs)):
        if int(shape[axis]) % block == 0:
            return axis
    return None


def check_quantizable(
    shape: Sequence[int],
    scheme: str,
    in_axes: Sequence[int],
    block: int = 64,
    where: str = "quantize",
    out_axes: Sequence[int] = (),
) -> None:
    """Raises ValueError if a kernel of `shape` cannot be quantized with `scheme` (no work).

    Example:
      >>> check_quantizable((128, 8), "nf4", (0,))
      >>> try:
      ...     check_quantizable((96, 8), "nf4", (0,))
      ... except ValueError as err:
      ...     print(str(err)[:50])
      quantize: nf4 blocks of 64 divide no input axis (s
    """
    if scheme not in SCHEMES:
        raise ValueError(f"{where}: unknown quantization scheme {scheme!r}; expected {SCHEMES}")
    axes = _axes(len(shape), in_axes, where)
    outs = tuple(sorted({a % len(shape) for a in out_axes}))
    if scheme != "nf4":
        return
    if not isinstance(block, int) or isinstance(block, bool) or block < 2 or block % 2:
        raise ValueError(f"{where}: nf4 block={block!r} must be an even int >= 2")
    if _block_axis(shape, axes, outs, block) is None:
        sizes = [int(shape[a]) for a in (*axes, *outs)]
        hint = math.gcd(block, *sizes)
        suggestion = f" (e.g. {hint})" if hint >= 2 and hint % 2 == 0 else ""
        raise ValueError(
            f"{where}: nf4 blocks of {block} divide no input axis (sizes "
            f"{[int(shape[a]) for a in axes]}) nor output axis (sizes "
            f"{[int(shape[a]) for a in outs]}) of the kernel of shape {tuple(shape)}; pick a "
            f"block that divides one{suggestion} or exclude this kernel"
        )


def quantize_array(
    x: jax.Array,
    scheme: str,
    in_axes: Sequence[int] = (0,),
    *,
    block: int = 64,
    double_quant: bool = False,
    where: str = "quantize",
    out_axes: Sequence[int] = (),
) -> QuantizedArray:
    """Quantizes one kernel (jit-able; the checks read shapes only).

    Args:
      x: the kernel (floating point).
      scheme: ``"int8"``, ``"nf4"`` or ``"fp8"``.
      in_axes: the kernel's input (contracted) axes: int8 and fp8 keep one scale per index of
        the other axes (per output channel, per stacked layer); nf4 blocks run along the last
        of them (QLoRA's blocks), or along the last of `out_axes` where the block does not
        divide any input axis.
      block: nf4 block size (even; must divide the block axis).
      double_quant: nf4: quantize the block scales too (int8 per output feature).
      where: names the kernel in error messages.
      out_axes: the kernel's output axes (nf4: block axes to fall back on).

    Returns:
      The `QuantizedArray`.

    Raises:
      ValueError: unknown scheme, an already quantized input, a non-float kernel, or a block
        that does not divide the axis.

    Example:
      >>> w = jnp.linspace(-1.0, 1.0, 128 * 4).reshape(128, 4)
      >>> q = quantize_array(w, "nf4")
      >>> q.codes.shape, q.scale.shape, q.nbytes
      ((64, 4), (2, 4), 288)
      >>> bool(jnp.abs(dequantize(q) - w).max() < 0.15)  # half the widest NF4 gap
      True
    """
    _check_input(x, scheme, where)
    check_quantizable(x.shape, scheme, in_axes, block, where, out_axes)
    axes = _axes(x.ndim, in_axes, where)
    xf = jnp.asarray(x).astype(_F32)
    if scheme in ("int8", "fp8"):
        absmax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True)
        top = 127.0 if scheme == "int8" else _FP8_MAX
        scale = jnp.where(absmax > 0, absmax / top, 1.0).astype(_F32)
        y = xf / scale
        if scheme == "int8":
            codes = jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8)
        else:
            codes = jnp.clip(y, -_FP8_MAX, _FP8_MAX).astype(_FP8)
        return QuantizedArray(codes, scale, scheme=scheme, axis=None, dtype=x.dtype)
    outs = tuple(sorted({a % x.ndim for a in out_axes}))
    axis = _block_axis(x.shape, axes, outs, block)
    n = x.shape[axis]
    blocks = xf.reshape(*x.shape[:axis], n // block, block, *x.shape[axis + 1 :])
    absmax = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax, 1.0).astype(_F32)
    unit = blocks / scale
    idx = jnp.searchsorted(jnp.asarray(_nf4_midpoints()), unit.ravel(), method="scan_unrolled")
    idx = idx.astype(jnp.uint8).reshape(*x.shape[:axis], n // 2, 2, *x.shape[axis + 1 :])
    hi = jnp.take(idx, 0, axis=axis + 1)
    lo = jnp.take(idx, 1, axis=axis + 1)
    codes = (hi << 4) | lo
    scale = jnp.squeeze(scale, axis + 1)
    neg_axis = axis - x.ndim
    if not double_quant:
        return QuantizedArray(codes, scale, scheme="nf4", axis=neg_axis, dtype=x.dtype)
    offset = jnp.mean(scale, axis=axis, keepdims=True)
    centred = scale - offset
    top = jnp.max(jnp.abs(centred), axis=axis, keepdims=True)
    s2 = jnp.where(top > 0, top / 127.0, 1.0).astype(_F32)
    qs = jnp.clip(jnp.round(centred / s2), -127, 127).astype(jnp.int8)
    return QuantizedArray(codes, qs, s2, offset, scheme="nf4", axis=neg_axis, dtype=x.dtype)


def _scales(q: QuantizedArray) -> jax.Array:
    if q.scale_scale is None:
        return q.scale.astype(_F32)
    return q.scale.astype(_F32) * q.scale_scale + q.scale_offset


def dequantize(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """The kernel a `QuantizedArray` stands for: float32 math, cast once to `dtype` (default:
    the kernel's original dtype), in the array's shape (its `reshape` view, if any).

    Example:
      >>> q = quantize_array(jnp.array([[127.0, -254.0], [-63.0, 128.0]]), "int8")
      >>> dequantize(q).tolist()  # one scale per column: 1 and 2
      [[127.0, -254.0], [-63.0, 128.0]]
    """
    if not isinstance(q, QuantizedArray):
        raise ValueError(f"dequantize expects a QuantizedArray, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    scale = _scales(q)
    if q.scheme in ("int8", "fp8"):
        w = q.codes.astype(_F32) * scale
    else:
        codes = q.codes
        axis = codes.ndim + q.axis
        hi = (codes >> 4).astype(jnp.int32)
        lo = (codes & 15).astype(jnp.int32)
        idx = jnp.stack([hi, lo], axis=axis + 1)
        shape = q.stored_shape
        values = jnp.take(jnp.asarray(nf4_codebook()), idx)  # (..., n/2, 2, ...)
        nb = scale.shape[axis]
        values = values.reshape(*shape[:axis], nb, shape[axis] // nb, *shape[axis + 1 :])
        w = (values * jnp.expand_dims(scale, axis + 1)).reshape(shape)
    if q.view is not None:
        w = w.reshape(q.view)
    return w.astype(dtype)


def dense(kernel: Any, dtype: Any) -> jax.Array:
    """`kernel` as an array of `dtype`: dequantized when quantized, cast otherwise."""
    if isinstance(kernel, QuantizedArray):
        return dequantize(kernel, dtype)
    return kernel.astype(dtype)


def zero_cotangent(q: QuantizedArray) -> QuantizedArray:
    """A zero cotangent for `q` (float0 for integer codes): quantized kernels are frozen."""

    def zero(x: Any) -> Any:
        if jnp.issubdtype(x.dtype, jnp.integer):
            return np.zeros(x.shape, jax.dtypes.float0)
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree.map(zero, q)


# ---------------------------------------------------------------------------- the matmul
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _qeinsum(eq: str, x: jax.Array, q: QuantizedArray, dtype: Any, precision: Any) -> jax.Array:
    return jnp.einsum(eq, x.astype(dtype), dequantize(q, dtype), precision=precision)


def _qeinsum_fwd(eq, x, q, dtype, precision):
    # Residuals: the codes (already held) and x's type; never the dequantized kernel.
    return _qeinsum(eq, x, q, dtype, precision), (q, jax.ShapeDtypeStruct(x.shape, x.dtype))


def _qeinsum_bwd(eq, dtype, precision, res, dy):
    q, x_aval = res
    w = dequantize(q, dtype)  # recomputed: one layer's kernel, transiently
    (dx,) = jax.linear_transpose(
        lambda x_: jnp.einsum(eq, x_.astype(dtype), w, precision=precision), x_aval
    )(dy.astype(dtype))
    return dx, zero_cotangent(q)


_qeinsum.defvjp(_qeinsum_fwd, _qeinsum_bwd)


def quantized_einsum(
    eq: str, x: jax.Array, q: QuantizedArray, dtype: Any = None, precision: Any = None
) -> jax.Array:
    """``einsum(eq, x, dequantize(q))`` in `dtype`, whose backward pass recomputes the
    dequantized kernel instead of keeping it: reverse-mode autodiff of a plain einsum would
    keep every layer's full-precision kernel alive until the backward pass, a full copy of the
    model. The kernel gets a zero cotangent (it is frozen).

    Example:
      >>> q = quantize_array(jnp.eye(2), "int8")
      >>> quantized_einsum("bi,io->bo", jnp.ones((1, 2)), q).tolist()
      [[1.0, 1.0]]
    """
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    return _qeinsum(eq, x, q, dtype, precision)


__all__ = [
    "SCHEMES",
    "QuantizedArray",
    "check_quantizable",
    "dense",
    "dequantize",
    "is_quantized",
    "nf4_codebook",
    "quantize_array",
    "quantized_einsum",
    "zero_cotangent",
]
