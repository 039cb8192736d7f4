"""The one place that decides how an adapted layer is computed, and computes it.

Every frontend (the linen interceptor, the NNX layers, the built-in models' grouped projections)
describes an adapted layer as a `Contraction` (``y = einsum(eq, x, W) + bias``), gets the factor
pair ``(A, B, scale)`` and an optional column rescale from the adapter method, and calls
`adapted` (one layer) or `adapted_group` (layers that read the same input). Here it is decided,
per layer and per call:

- **fused** (`rslora_jax.execution.fused.merged_matmul`): one matmul with
  ``W + scale * A @ B`` formed per call, adapter gradients in low-rank form. Possible when the
  contraction is a plain matmul after reshapes (the input's trailing axes contracted with the
  kernel's leading ones, no layer axes), the layer computes exactly that product (no custom
  ``dot_general``), and adapter dropout is inactive;
- **factored**: ``y + scale * (x @ A) @ B`` with the layer's own ``y``, never forming the
  ``d_in x d_out`` update; always possible.

``mode="fused"`` fuses wherever possible, ``"factored"`` never fuses, ``"auto"`` fuses when the
call holds enough tokens (`prefers_fused`). With a per-row adapter index (``rows``: several
adapters in one batch, the factors stacked on a leading adapter axis) the call is factored, each
row of the input with its own factors (`per_row_outputs`). Layers no frontend can describe are
merged by the linen frontend (``rslora_jax.lora``'s merged fallback). A column rescale ``c`` (DoRA's
``m / ||W + scale*A@B||``) multiplies the output columns of ``x @ (W + scale*A@B)`` (fused) or
is applied as PEFT does it, ``y + (c - 1) * (x_d @ W) + c * scale * (x_d @ A) @ B`` with ``x_d``
the dropped-out input (factored).

A kernel may be quantized (`rslora_jax.execution.quant.QuantizedArray`, a QLoRA-style frozen
base): the same `Contraction` carries it and the same rule picks the path. Fused forms
``dequant(Wq) + scale * A @ B`` per layer and call; factored computes
``x @ dequant(Wq) + scale * (x @ A) @ B``, the first product by
`rslora_jax.execution.quant.quantized_einsum` (its backward pass recomputes the dequantized
kernel rather than keeping it). A layer's own call cannot read a quantized kernel, so its base
output is always ``lin.plain`` (the layer's einsum).

Pure math on arrays: no imports of ours outside `rslora_jax.execution`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax.execution.fused import merged_matmul, prefers_fused
from rslora_jax.execution.lowrank import (
    column_scaled,
    einsum_lowrank,
    einsum_roles,
    grouped_lowrank,
    lowrank,
)
from rslora_jax.execution.quant import dense, is_quantized, quantized_einsum

MODES = ("auto", "factored", "fused")


def choose(mode: str, tokens: int, d_in: int, d_out: int, fusable: bool) -> str:
    """``"fused"`` or ``"factored"`` for one call (see the module docstring).

    Example:
      >>> choose("auto", 8192, 2048, 2048, True), choose("auto", 4, 2048, 2048, True)
      ('fused', 'factored')
      >>> choose("fused", 4, 2048, 2048, False)
      'factored'
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not fusable or mode == "factored":
        return "factored"
    if mode == "fused" or prefers_fused(tokens, d_in, d_out):
        return "fused"
    return "factored"


@dataclasses.dataclass(frozen=True)
class View:
    """A contraction seen as ``x (*lead, d_in) @ W (d_in, d_out)`` -> ``(*lead, *out_shape)``."""

    lead: tuple[int, ...]
    d_in: int
    d_out: int
    out_shape: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return math.prod(self.lead)


@dataclasses.dataclass(frozen=True)
class Contraction:
    """One linear layer as the execution sees it: ``y = einsum(eq, x, kernel) (+ bias)``.

    Attributes:
      eq: ``(xs, ks, rs)``: the einsum's input, kernel and output axes (explicit, no '...').
      kernel: the kernel, as the layer stores it (an array or a `QuantizedArray`).
      bias: added to the output, broadcastable against it (already reshaped), or None.
      dtype: the compute dtype (None: the result type of the input, kernel and bias).
      precision: the matmul precision.
      exact: whether the layer computes exactly this (so a merged kernel may replace ``W``);
        False for layers with a custom ``dot_general``: they are never fused.
      members: kernel axis letters of a stacked projection's members (output axes that are not
        in the input, e.g. the ``C`` of gemma's ``kv_einsum`` ``"BSD,CKDH->CBSKH"`` holding k
        and v): each member has its own adapter (the axis is a layer axis ``l`` of the
        factors), and the fused path computes the members as projections sharing the input.
    """

    eq: tuple[str, str, str]
    kernel: Any
    bias: Any = None
    dtype: Any = None
    precision: Any = None
    exact: bool = True
    members: str = ""

    @property
    def roles(self) -> str:
        roles = einsum_roles(*self.eq)
        if roles is None:
            raise ValueError(f"einsum {self.eq}: a kernel axis is summed away; cannot factor it")
        if self.members:
            xs, ks, _ = self.eq
            for c in self.members:
                if c not in ks or c in xs or roles[ks.index(c)] != "o":
                    raise ValueError(
                        f"einsum {self.eq}: member axis {c!r} must be an output axis of the "
                        "kernel that is not in the input"
                    )
            roles = "".join("l" if c in self.members else r for c, r in zip(ks, roles))
        return roles

    def split_members(self) -> tuple[list[Contraction], int] | None:
        """The members of a stacked projection with one member axis as contractions of their
        own, and the output axis they stack on; None without members (or with a bias that
        does not spell out the member axis, or other layer axes)."""
        if len(self.members) != 1 or self.roles.count("l") != 1:
            return None
        (c,) = self.members
        xs, ks, rs = self.eq
        k_ax, r_ax = ks.index(c), rs.index(c)
        if self.bias is not None and self.bias.ndim != len(rs):
            return None
        lins = []
        for i in range(self.kernel.shape[k_ax]):
            lins.append(
                dataclasses.replace(
                    self,
                    eq=(xs, ks.replace(c, ""), rs.replace(c, "")),
                    kernel=jnp.take(self.kernel, i, axis=k_ax),
                    bias=None
                    if self.bias is None
                    else jnp.take(self.bias, 0, axis=r_ax)
                    if self.bias.shape[r_ax] == 1
                    else jnp.take(self.bias, i, axis=r_ax),
                    members="",
                )
            )
        return lins, r_ax

    def compute_dtype(self, x: jax.Array) -> Any:
        if self.dtype is not None:
            return jnp.dtype(self.dtype)
        kernel = self.kernel.dtype if is_quantized(self.kernel) else self.kernel
        return jnp.result_type(x, kernel, *(() if self.bias is None else (self.bias,)))

    def view(self, x: jax.Array) -> View | None:
        """The matmul view of this call, or None where it needs a transpose or has layer axes."""
        xs, ks, rs = self.eq
        roles = einsum_roles(xs, ks, rs)
        if roles is None or "l" in roles or self.members:
            return None
        n_in = roles.count("i")
        i_, o_ = ks[:n_in], ks[n_in:]
        if roles != "i" * n_in + "o" * len(o_) or not xs.endswith(i_):
            return None
        prefix = xs[: len(xs) - n_in]
        if rs != prefix + o_:
            return None
        sizes = dict(zip(ks, self.kernel.shape))
        d_out = math.prod(sizes[c] for c in o_)
        if self.bias is not None and math.prod(self.bias.shape) != d_out:
            return None
        return View(
            lead=tuple(x.shape[: len(prefix)]),
            d_in=math.prod(sizes[c] for c in i_),
            d_out=d_out,
            out_shape=tuple(sizes[c] for c in o_),
        )

    def plain(self, x: jax.Array, with_bias: bool = True) -> jax.Array:
        """``einsum(eq, x, W) (+ bias)`` in the compute dtype (a quantized ``W`` dequantized
        inside `quantized_einsum`)."""
        dtype = self.compute_dtype(x)
        xs, ks, rs = self.eq
        eq = f"{xs},{ks}->{rs}"
        if is_quantized(self.kernel):
            y = quantized_einsum(eq, x, self.kernel, dtype, self.precision)
        else:
            y = jnp.einsum(eq, x.astype(dtype), dense(self.kernel, dtype), precision=self.precision)
        if with_bias and self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y


Pair = tuple[Any, Any, float]


def _fused_outputs(
    x: jax.Array,
    lins: Sequence[Contraction],
    views: Sequence[View],
    pairs: Sequence[Pair],
    cols: Sequence[Any],
) -> list[jax.Array]:
    dtype = lins[0].compute_dtype(x)
    v0 = views[0]
    x2 = x.reshape(*v0.lead, v0.d_in)
    ys = merged_matmul(
        x2,
        [lin.kernel.reshape(v.d_in, v.d_out) for lin, v in zip(lins, views)],
        [(a, b) for a, b, _ in pairs],
        [s for _, _, s in pairs],
        dtype,
        lins[0].precision,
    )
    out = []
    for y, lin, v, col in zip(ys, lins, views, cols):
        if col is not None:
            y = y * col.reshape(-1).astype(dtype)
        if lin.bias is not None:
            y = y + lin.bias.reshape(-1).astype(dtype)
        out.append(y.reshape(*v.lead, *v.out_shape))
    return out


def _factored_delta(x: jax.Array, lin: Contraction, pair: Pair, dtype: Any) -> jax.Array:
    a, b, s = pair
    if lin.view(x) is not None and lin.kernel.ndim == 2 and x.ndim >= 1:
        return lowrank(x, a, b, s, dtype)
    return einsum_lowrank(lin.eq, x, a, b, s, dtype, tuple(lin.kernel.shape), lin.roles)


def _combine(
    x: jax.Array,
    xd: jax.Array,
    y: jax.Array,
    out: jax.Array,
    lin: Contraction,
    col: Any,
) -> jax.Array:
    """The factored result: ``y + out``, or PEFT's DoRA form with the column scale `col`."""
    if col is None:
        return y + out.astype(y.dtype)
    if xd is x:
        base = y if lin.bias is None else y - lin.bias.astype(y.dtype)
    else:  # dropout is active: PEFT recomputes the base output on the dropped-out input
        base = lin.plain(xd, with_bias=False).astype(y.dtype)
    shape = tuple(lin.kernel.shape)
    c = col.astype(jnp.float32)
    return (
        y
        + column_scaled(base, c - 1.0, lin.eq, shape, lin.roles)
        + column_scaled(out.astype(y.dtype), c, lin.eq, shape, lin.roles)
    )


def fuses(
    x: jax.Array,
    lins: Sequence[Contraction],
    mode: str = "auto",
    dropouts: Sequence[Callable[[jax.Array], jax.Array] | None] | None = None,
) -> bool:
    """Whether `adapted_group` (and `adapted`) computes this call fused (see the module
    docstring): every layer an exact matmul view of `x`, no active dropout, and `mode` (with
    ``"auto"``: the token count) asking for it.

    Example:
      >>> import jax.numpy as jnp
      >>> lin = Contraction(("bi", "io", "bo"), jnp.zeros((2, 3)))
      >>> fuses(jnp.ones((4, 2)), [lin], "fused"), fuses(jnp.ones((4, 2)), [lin], "factored")
      (True, False)
    """
    views = [lin.view(x) if lin.exact else None for lin in lins]
    if any(v is None for v in views) or any(d is not None for d in dropouts or ()):
        return False
    d_out = sum(v.d_out for v in views)
    return choose(mode, views[0].tokens, views[0].d_in, d_out, True) == "fused"


def adapted(
    x: jax.Array,
    lin: Contraction,
    pair: Pair,
    *,
    base: Callable[[jax.Array], jax.Array] | None = None,
    col: Any = None,
    mode: str = "auto",
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    rows: jax.Array | None = None,
) -> jax.Array:
    """One adapted layer's output (see the module docstring).

    Args:
      x: the layer's input.
      lin: the layer as a `Contraction`.
      pair: ``(A, B, scale)``: the update is ``scale * A @ B`` (``A`` ``(*l, d_in, r)``).
      base: the layer's own call on an input (with bias); default ``lin.plain`` (always, for
        a quantized kernel).
      col: the column rescale ``(*l, d_out)`` or None.
      mode: ``"auto"``, ``"fused"`` or ``"factored"``.
      dropout: the adapter input's dropout, when active (forces the factored path).
      rows: one adapter index per row of `x` (its leading axis), or None; with it, `pair` and
        `col` have a leading adapter axis (see `per_row_outputs`).

    Returns:
      The layer's output with the adapter.

    Example:
      >>> import jax.numpy as jnp
      >>> lin = Contraction(("bi", "io", "bo"), jnp.zeros((2, 3)))
      >>> pair = (jnp.ones((2, 1)), jnp.ones((1, 3)), 0.5)
      >>> adapted(jnp.ones((4, 2)), lin, pair, mode="fused")[0].tolist()
      [1.0, 1.0, 1.0]
    """
    split = lin.split_members() if dropout is None and rows is None else None
    if split is not None:
        lins, axis = split
        if fuses(x, lins, mode):
            a, b, s = pair
            pairs = [(a[i], b[i], s) for i in range(len(lins))]
            cols = [None if col is None else col[i] for i in range(len(lins))]
            ys = adapted_group(x, lins, pairs, cols=cols, mode=mode)
            return jnp.stack(ys, axis=axis)
    (y,) = adapted_group(
        x, [lin], [pair], bases=[base], cols=[col], mode=mode, dropouts=[dropout], rows=rows
    )
    return y


def adapted_group(
    x: jax.Array,
    lins: Sequence[Contraction],
    pairs: Sequence[Pair],
    *,
    bases: Sequence[Callable[[jax.Array], jax.Array] | None] | None = None,
    cols: Sequence[Any] | None = None,
    mode: str = "auto",
    dropouts: Sequence[Callable[[jax.Array], jax.Array] | None] | None = None,
    rows: jax.Array | None = None,
) -> list[jax.Array]:
    """Outputs of adapted layers that read the same input `x` (q/k/v, gate/up).

    Fused: one merged matmul per layer, ``x @ [A_1 | A_2 | ...]`` and its gradient read `x` once.
    Factored without dropout: one ``x @ [A_1 | A_2 | ...]`` for all layers. With active dropout
    each layer draws its own mask (as PEFT's per-module dropout) and is computed alone.

    Args:
      x: the shared input.
      lins: the layers.
      pairs: one ``(A, B, scale)`` per layer.
      bases: each layer's own call (default ``lin.plain``).
      cols: each layer's column rescale or None.
      mode: ``"auto"``, ``"fused"`` or ``"factored"``.
      dropouts: each layer's active dropout or None.
      rows: one adapter index per row of `x`, or None (see `per_row_outputs`).

    Returns:
      One output per layer.
    """
    n = len(lins)
    bases = list(bases or [None] * n)
    cols = list(cols or [None] * n)
    dropouts = list(dropouts or [None] * n)
    if rows is not None:
        return per_row_outputs(x, lins, pairs, rows, bases=bases, cols=cols, dropouts=dropouts)
    views = [lin.view(x) if lin.exact else None for lin in lins]
    if fuses(x, lins, mode, dropouts):
        return _fused_outputs(x, lins, views, pairs, cols)
    dtype = lins[0].compute_dtype(x)
    outs: list[Any]
    plain_2d = all(v is not None for v in views) and all(lin.kernel.ndim == 2 for lin in lins)
    if n > 1 and plain_2d and all(d is None for d in dropouts):
        outs = grouped_lowrank(x, [(a, b) for a, b, _ in pairs], [s for *_, s in pairs], dtype)
        xds = [x] * n
    else:
        xds = [x if d is None else d(x) for d in dropouts]
        outs = [_factored_delta(xd, lin, p, dtype) for xd, lin, p in zip(xds, lins, pairs)]
    result = []
    for lin, base, col, xd, out in zip(lins, bases, cols, xds, outs):
        own = base is not None and not is_quantized(lin.kernel)
        y = base(x) if own else lin.plain(x)
        result.append(_combine(x, xd, y, out, lin, col))
    return result


def per_row_outputs(
    x: jax.Array,
    lins: Sequence[Contraction],
    pairs: Sequence[Pair],
    rows: jax.Array,
    *,
    bases: Sequence[Callable[[jax.Array], jax.Array] | None] | None = None,
    cols: Sequence[Any] | None = None,
    dropouts: Sequence[Callable[[jax.Array], jax.Array] | None] | None = None,
) -> list[jax.Array]:
    """Outputs of adapted layers reading `x`, row ``b`` of `x` with adapter ``rows[b]``.

    Several adapters serve one batch (PEFT's ``adapter_names``): each pair holds the factors of
    ``N`` adapters stacked on a leading axis, ``A (N, d_in, r)`` and ``B (N, r, d_out)`` (a column
    rescale ``(N, d_out)``), and row ``b`` computes ``y_b + scale * (x_b @ A[rows[b]]) @
    B[rows[b]]``: the factors are gathered per row, never merged, so the result of row ``b``
    equals the single-adapter factored forward with adapter ``rows[b]`` (up to rounding).
    Projections without dropout share one ``x @ [A_1 | A_2 | ...]`` product, as in
    `adapted_group`. Differentiable (e.g. to train several adapters in one batch).

    Args:
      x: the shared input ``(B, ..., d_in...)``: its leading axis is the batch.
      lins: the layers; each must be a plain matmul view of `x` (`Contraction.view`).
      pairs: one ``(A, B, scale)`` per layer, with the leading adapter axis.
      rows: ``(B,)`` integer adapter indices in ``[0, N)``.
      bases: each layer's own call (default ``lin.plain``).
      cols: each layer's column rescale ``(N, d_out)`` or None.
      dropouts: each layer's active dropout or None.

    Returns:
      One output per layer.

    Raises:
      ValueError: if a layer is not a plain matmul of `x` or `rows` does not fit `x`.

    Example:
      >>> import jax.numpy as jnp
      >>> lin = Contraction(("bi", "io", "bo"), jnp.zeros((2, 3)))
      >>> a = jnp.ones((2, 2, 1))  # two adapters
      >>> b = jnp.stack([jnp.ones((1, 3)), 2 * jnp.ones((1, 3))])
      >>> (y,) = per_row_outputs(jnp.ones((2, 2)), [lin], [(a, b, 0.5)], jnp.array([1, 0]))
      >>> y.tolist()
      [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]
    """
    n = len(lins)
    bases = list(bases or [None] * n)
    cols = list(cols or [None] * n)
    dropouts = list(dropouts or [None] * n)
    views = [lin.view(x) for lin in lins]
    if rows.ndim != 1 or x.ndim < 2 or rows.shape[0] != x.shape[0]:
        raise ValueError(
            f"per-row adapters: the adapter index must have one entry per row of the input "
            f"(its leading axis); got index shape {tuple(rows.shape)} for input {tuple(x.shape)}"
        )
    for lin, v in zip(lins, views):
        if v is None or not v.lead:
            raise ValueError(
                f"per-row adapters need layers that are plain matmuls of their input; einsum "
                f"{lin.eq} with kernel {tuple(lin.kernel.shape)} is not"
            )
    dtype = lins[0].compute_dtype(x)
    d_in = views[0].d_in
    rows = rows.astype(jnp.int32)
    xs = [x if d is None else d(x) for d in dropouts]

    def flat(t: jax.Array) -> jax.Array:  # (B, tokens per row, d_in)
        return t.astype(dtype).reshape(t.shape[0], -1, d_in)

    def gathered(t: jax.Array) -> jax.Array:
        return jnp.take(t, rows, axis=0).astype(dtype)

    if n > 1 and all(d is None for d in dropouts):
        a_cat = jnp.concatenate([gathered(a) for a, _, _ in pairs], axis=-1)
        xa_all = jnp.einsum("bti,bir->btr", flat(x), a_cat)
        xas, offset = [], 0
        for a, _, _ in pairs:
            xas.append(xa_all[..., offset : offset + a.shape[-1]])
            offset += a.shape[-1]
    else:
        xas = [
            jnp.einsum("bti,bir->btr", flat(xd), gathered(a)) for xd, (a, _, _) in zip(xs, pairs)
        ]
    result = []
    for lin, v, (_, b, s), xa, base, col, xd in zip(lins, views, pairs, xas, bases, cols, xs):
        out = jnp.einsum("btr,bro->bto", xa * jnp.asarray(s, dtype), gathered(b))
        own = base is not None and not is_quantized(lin.kernel)
        y = base(x) if own else lin.plain(x)
        y3 = y.reshape(y.shape[0], -1, v.d_out)
        if col is None:
            y3 = y3 + out.astype(y.dtype)
        else:  # PEFT's DoRA form, as `_combine`, with each row's column scale
            if xd is x:
                plain = y3 if lin.bias is None else y3 - lin.bias.reshape(-1).astype(y.dtype)
            else:
                plain = lin.plain(xd, with_bias=False).astype(y.dtype).reshape(y3.shape)
            c = jnp.take(col, rows, axis=0).astype(jnp.float32)[:, None, :]
            y3 = y3 + plain * (c - 1.0).astype(y.dtype) + out.astype(y.dtype) * c.astype(y.dtype)
        result.append(y3.reshape(y.shape))
    return result


__all__ = [
    "MODES",
    "Contraction",
    "View",
    "adapted",
    "adapted_group",
    "choose",
    "fuses",
    "per_row_outputs",
]
