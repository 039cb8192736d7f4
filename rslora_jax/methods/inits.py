"""Initialisers: how the first factors are drawn (`LoraConfig(init=...)`).

- `Kaiming` (default, ``"kaiming_uniform"``): ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`` (PEFT's
  ``kaiming_uniform(a=sqrt(5))``), ``B = 0``.
- `Gaussian` (``"gaussian"``): ``A ~ N(0, 1/d_in)``. Unlike PEFT's ``gaussian``, whose std is
  ``1/r``, the variance does not depend on the rank, as the rsLoRA theorem assumes.
- `PiSSA` (``"pissa"``, ``"pissa_niter_<n>"``) and `OLoRA` (``"olora"``) compute both factors from
  the kernel, as PEFT does (``peft/tuners/lora/layer.py``), and the base becomes
  ``W - gamma * A @ B`` so the model's output is unchanged.

PiSSA: with the SVD ``W = U S V^T`` (Flax orientation, ``W`` is (d_in, d_out); PEFT's torch
weight is ``W.T``) and its top r triplets, ``A = U_r sqrt(S_r / gamma)``,
``B = sqrt(S_r / gamma) V_r^T``, so that ``gamma * A @ B`` is the principal part of ``W``.
``niter`` uses a randomized SVD with ``niter`` subspace iterations (Halko et al.'s algorithm, as
``torch.svd_lowrank`` with ``q = r``: approximate, and not bit-identical to torch's, whose random
draws differ). OLoRA: with the QR decomposition ``W.T = Q R``, ``A = R_r^T`` (first r rows of R)
and ``B = Q_r^T`` (first r columns of Q), not divided by gamma (as in PEFT).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from rslora_jax._types import PRNGKey
from rslora_jax.core.protocol import Initialiser, register_init

_HIGHEST = jax.lax.Precision.HIGHEST


@register_init
@dataclasses.dataclass(frozen=True)
class Kaiming(Initialiser):
    """``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``, PEFT's default.

    Example:
      >>> import jax
      >>> a = Kaiming().draw_a(jax.random.key(0), (4, 2), 4, "float32")
      >>> bool((abs(a) <= 0.5).all())
      True
    """

    name: ClassVar[str] = "kaiming_uniform"
    default: ClassVar[bool] = True

    def to_peft(self) -> bool | str:
        return True

    def draw_a(self, key: PRNGKey, shape: tuple[int, ...], d_in: int, dtype: Any) -> jax.Array:
        bound = 1.0 / math.sqrt(d_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


@register_init
@dataclasses.dataclass(frozen=True)
class Gaussian(Initialiser):
    """``A ~ N(0, 1/d_in)`` (rank-independent variance; PEFT's ``gaussian`` uses std ``1/r``).

    Example:
      >>> import jax
      >>> Gaussian().draw_a(jax.random.key(0), (4, 2), 4, "float32").shape
      (4, 2)
    """

    name: ClassVar[str] = "gaussian"

    def draw_a(self, key: PRNGKey, shape: tuple[int, ...], d_in: int, dtype: Any) -> jax.Array:
        bound = 1.0 / math.sqrt(d_in)
        return (jax.random.normal(key, shape, jnp.float32) * bound).astype(dtype)


_NITER = re.compile(r"pissa_niter_(\d+)")


@register_init
@dataclasses.dataclass(frozen=True)
class PiSSA(Initialiser):
    """Principal singular values and vectors (exact SVD, or randomized with ``niter``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a, b = PiSSA().factors(jnp.diag(jnp.array([4.0, 1.0])), 1, 2.0, jax.random.key(0))
      >>> (2.0 * a @ b).round(5).tolist()  # the top singular triplet
      [[4.0, 0.0], [0.0, 0.0]]
      >>> PiSSA(niter=4).spec
      'pissa_niter_4'
    """

    name: ClassVar[str] = "pissa"
    aliases: ClassVar[tuple[str, ...]] = ("pissa_niter_<n>",)
    modifies_base: ClassVar[bool] = True
    niter: int | None = None

    def __post_init__(self) -> None:
        n = self.niter
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"PiSSA(niter=...) must be a non-negative int or None, got {n!r}")

    @property
    def spec(self) -> str:
        return "pissa" if self.niter is None else f"pissa_niter_{self.niter}"

    @classmethod
    def parse(cls, text: str) -> PiSSA | None:
        if text == "pissa":
            return cls()
        m = _NITER.fullmatch(text)
        return cls(niter=int(m.group(1))) if m else None

    def factors(
        self, w: jax.Array, r: int, scale: float, key: PRNGKey
    ) -> tuple[jax.Array, jax.Array]:
        w_t = jnp.swapaxes(w.astype(jnp.float32), -1, -2)  # PEFT's (out, in) weight
        if self.niter is None:
            v, s, uh = jnp.linalg.svd(w_t, full_matrices=False)
            vr, sr, uhr = v[..., :, :r], s[..., :r], uh[..., :r, :]
        else:
            vr, sr, ur = _svd_lowrank(w_t, r, self.niter, key)
            uhr = jnp.swapaxes(ur, -1, -2)
        sr = sr / jnp.float32(scale)
        a_t = jnp.sqrt(sr)[..., :, None] * uhr  # (r, in)
        b_t = vr * jnp.sqrt(sr)[..., None, :]  # (out, r)
        return jnp.swapaxes(a_t, -1, -2), jnp.swapaxes(b_t, -1, -2)


@register_init
@dataclasses.dataclass(frozen=True)
class OLoRA(Initialiser):
    """Orthonormal factors from the QR decomposition of the kernel (PEFT's ``"olora"``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
      >>> a, b = OLoRA().factors(w, 2, 1.0, jax.random.key(0))
      >>> bool(jnp.allclose(a @ b, w, atol=1e-6))
      True
    """

    name: ClassVar[str] = "olora"
    modifies_base: ClassVar[bool] = True

    def factors(
        self, w: jax.Array, r: int, scale: float, key: PRNGKey
    ) -> tuple[jax.Array, jax.Array]:
        del scale, key  # OLoRA's factors are not divided by the scale (as in PEFT)
        w_t = jnp.swapaxes(w.astype(jnp.float32), -1, -2)
        q, rr = jnp.linalg.qr(w_t)
        a_t, b_t = rr[..., :r, :], q[..., :, :r]
        return jnp.swapaxes(a_t, -1, -2), jnp.swapaxes(b_t, -1, -2)


def _svd_lowrank(w_t: jax.Array, q: int, niter: int, key: PRNGKey):
    """torch.svd_lowrank(w_t, q, niter)'s algorithm (Halko et al. 2009, alg. 4.4 + 5.1)."""
    m, n = w_t.shape[-2:]
    a = jnp.swapaxes(w_t, -1, -2) if m < n else w_t  # make it tall
    mh = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    r = jax.random.normal(key, (*a.shape[:-2], a.shape[-1], q), jnp.float32)
    qm = jnp.linalg.qr(jnp.matmul(a, r, precision=_HIGHEST))[0]
    for _ in range(niter):
        qm = jnp.linalg.qr(jnp.matmul(mh(a), qm, precision=_HIGHEST))[0]
        qm = jnp.linalg.qr(jnp.matmul(a, qm, precision=_HIGHEST))[0]
    bm = jnp.matmul(mh(qm), a, precision=_HIGHEST)
    u, s, vh = jnp.linalg.svd(bm, full_matrices=False)
    v = mh(vh)
    u = jnp.matmul(qm, u, precision=_HIGHEST)
    if m < n:
        u, v = v, u
    return u, s, v


__all__ = ["Gaussian", "Kaiming", "OLoRA", "PiSSA"]
