"""The low-rank products of the factored forward: ``scale * (x @ A) @ B`` for matmuls and einsums.

Pure math on arrays (no imports of ours): the frontends (linen, NNX, the built-in models) reach
it through `rslora_jax.execution.dispatch`.
"""

from __future__ import annotations

import string
from typing import Any

import jax
import jax.numpy as jnp


def lowrank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype: Any) -> jax.Array:
    """``scale * (x @ A) @ B`` for x ``(..., d_in)``, computed in `dtype`.

    The scale multiplies the rank-sized intermediate, the cheapest place for it.

    Example:
      >>> import jax.numpy as jnp
      >>> lowrank(jnp.ones((1, 2)), jnp.ones((2, 1)), jnp.ones((1, 3)), 0.5, jnp.float32).tolist()
      [[1.0, 1.0, 1.0]]
    """
    xa = jnp.matmul(x.astype(dtype), a.astype(dtype))
    return jnp.matmul(xa * jnp.asarray(scale, dtype), b.astype(dtype))


def einsum_roles(xs: str, ks: str, rs: str) -> str | None:
    """Axis roles of the kernel operand `ks` of the einsum ``xs,ks->rs``.

    ``l`` for axes kept in the output and shared with the input (one adapter per index),
    ``i`` for contracted axes, ``o`` for output axes; None if a kernel axis is summed away.

    Example:
      >>> einsum_roles("btd", "ndh", "btnh")
      'oio'
    """
    out = []
    for c in ks:
        if c in xs and c in rs:
            out.append("l")
        elif c in xs:
            out.append("i")
        elif c in rs:
            out.append("o")
        else:
            return None
    return "".join(out)


def einsum_lowrank(
    eq: tuple[str, str, str],
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    dtype: Any,
    kernel_shape: tuple[int, ...],
    roles: str | None = None,
) -> jax.Array:
    """``scale *`` the einsum ``xs,ks->rs`` with its kernel replaced by the factors A, B.

    `a` is ``(*l, prod(i), r)`` and `b` ``(*l, r, prod(o))`` with the kernel's layer, input and
    output axes (`einsum_roles`, or `roles` where given) flattened in kernel order. `roles` may
    call an output axis a layer axis (``l``, one adapter per index): a stacked projection's
    member axis (gemma's ``kv_einsum``: ``"BSD,CKDH->CBSKH"`` with ``roles="loio"``, one
    adapter for k and one for v).

    Example:
      >>> import jax.numpy as jnp
      >>> x, a, b = jnp.ones((1, 3)), jnp.ones((2, 3, 1)), jnp.ones((2, 1, 4))
      >>> einsum_lowrank(("bd", "cdh", "cbh"), x, a, b, 1.0, jnp.float32, (2, 3, 4),
      ...                roles="lio").shape
      (2, 1, 4)
    """
    xs, ks, rs = eq
    roles = einsum_roles(xs, ks, rs) if roles is None else roles
    if roles is None:
        raise ValueError(f"einsum {xs},{ks}->{rs}: a kernel axis is summed away; cannot factor it")
    sizes = dict(zip(ks, kernel_shape))
    l_ = "".join(c for c, r in zip(ks, roles) if r == "l")
    i_ = "".join(c for c, r in zip(ks, roles) if r == "i")
    o_ = "".join(c for c, r in zip(ks, roles) if r == "o")
    z = next(c for c in string.ascii_letters if c not in xs + ks + rs)
    inter = "".join(c for c in rs if c not in o_) + z
    a_full = a.reshape(*(sizes[c] for c in l_), *(sizes[c] for c in i_), a.shape[-1])
    b_full = b.reshape(*(sizes[c] for c in l_), b.shape[-2], *(sizes[c] for c in o_))
    xa = jnp.einsum(f"{xs},{l_}{i_}{z}->{inter}", x.astype(dtype), a_full.astype(dtype))
    xa = xa * jnp.asarray(scale, dtype)
    return jnp.einsum(f"{inter},{l_}{z}{o_}->{rs}", xa, b_full.astype(dtype))


def grouped_lowrank(
    x: jax.Array, pairs: list[tuple[jax.Array, jax.Array]], scales: list[float], dtype: Any
) -> list[jax.Array]:
    """``scale_j * (x @ A_j) @ B_j`` for projections that share the input `x`.

    One matmul ``x @ [A_1 | A_2 | ...]`` reads `x` once for all A factors (the products with
    the B factors stay separate). Factors are cast to the compute dtype `dtype`.

    Example:
      >>> import jax.numpy as jnp
      >>> x, one = jnp.ones((1, 2)), jnp.ones((2, 1))
      >>> [y.tolist() for y in grouped_lowrank(x, [(one, jnp.ones((1, 1)))] * 2, [1.0, 0.5],
      ...                                       jnp.float32)]
      [[[2.0]], [[1.0]]]
    """
    a = jnp.concatenate([a.astype(dtype) for a, _ in pairs], axis=-1)
    xa = jnp.matmul(x.astype(dtype), a)
    out, offset = [], 0
    for (a_j, b_j), scale in zip(pairs, scales):
        r = a_j.shape[-1]
        part = xa[..., offset : offset + r] * jnp.asarray(scale, dtype)
        out.append(jnp.matmul(part, b_j.astype(dtype)))
        offset += r
    return out


def parse_einsum(eq: str) -> tuple[str, str, str]:
    """``"xs,ks->rs"`` (explicit output, no ellipsis) as its three operand strings.

    Example:
      >>> parse_einsum("btd, dnh -> btnh")
      ('btd', 'dnh', 'btnh')
    """
    eq = eq.replace(" ", "")
    lhs, rs = eq.split("->")
    xs, ks = lhs.split(",")
    return xs, ks, rs


def column_scaled(
    y: jax.Array,
    c: jax.Array,
    eq: tuple[str, str, str],
    kernel_shape: tuple[int, ...],
    roles: str | None = None,
) -> jax.Array:
    """`y` (the einsum's output) with each output column multiplied by `c` ``(*l, d_out)``.

    ``d_out`` is the kernel's output axes flattened in kernel order, ``l`` its layer axes (as
    seen by this call, or as `roles` says, see `einsum_lowrank`), so `c` is reshaped to those axes and broadcast into the output.

    Example:
      >>> import jax.numpy as jnp
      >>> column_scaled(jnp.ones((2, 3)), jnp.array([1.0, 2.0, 3.0]), ("bi", "io", "bo"),
      ...               (4, 3)).tolist()
      [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    """
    xs, ks, rs = eq
    roles = einsum_roles(xs, ks, rs) if roles is None else roles
    sizes = dict(zip(ks, kernel_shape))
    l_ = "".join(ch for ch, r in zip(ks, roles) if r == "l")
    o_ = "".join(ch for ch, r in zip(ks, roles) if r == "o")
    full = c.astype(y.dtype).reshape(*(sizes[ch] for ch in l_), *(sizes[ch] for ch in o_))
    return jnp.einsum(f"{rs},{l_}{o_}->{rs}", y, full)


__all__ = [
    "column_scaled",
    "einsum_lowrank",
    "einsum_roles",
    "grouped_lowrank",
    "lowrank",
    "parse_einsum",
]
