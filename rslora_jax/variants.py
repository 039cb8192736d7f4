"""Adapter variants on top of LoRA/rsLoRA: PiSSA and OLoRA initialisation, DoRA.

All of them follow Hugging Face PEFT's math (``peft/tuners/lora/layer.py`` and ``dora.py``),
written here in Flax orientation: a kernel is viewed as the matrix ``W`` of shape
(d_in, d_out) (``y = x @ W``), PEFT's torch weight is ``W.T`` (out, in), our ``lora_a`` is
PEFT's ``lora_A.weight.T`` and ``lora_b`` is ``lora_B.weight.T``. ``gamma`` is the adapter's
scale, ``LoraConfig.scale_for(path)`` (``alpha/sqrt(r)`` with rsLoRA, PEFT's ``use_rslora``).

PiSSA (``LoraConfig(init="pissa")``, PEFT ``init_lora_weights="pissa"``): with the SVD
``W = U S V^T`` and its top r triplets, ``A = U_r sqrt(S_r / gamma)``,
``B = sqrt(S_r / gamma) V_r^T``, so that ``gamma * A @ B`` is the principal part of ``W``; the
base kernel becomes the residual ``W - gamma * A @ B``. ``"pissa_niter_<n>"`` uses a
randomized SVD with ``n`` subspace iterations (Halko et al.'s algorithm, as
``torch.svd_lowrank`` with ``q = r``: approximate, and not bit-identical to torch's, whose random
draws differ).

OLoRA (``init="olora"``): with the QR decomposition ``W.T = Q R``, ``A = R_r^T`` (first r rows
of R) and ``B = Q_r^T`` (first r columns of Q), not divided by gamma (as in PEFT); the base
becomes ``W - gamma * A @ B``.

In both cases the model's output is unchanged at initialisation; the factors and the residual are
computed in float32 and the residual is cast to the kernel's dtype once.

DoRA (``LoraConfig(use_dora=True)``, PEFT ``use_dora=True``): each adapted kernel gets a
magnitude vector ``lora_magnitude`` with one entry per output feature (PEFT's
``lora_magnitude_vector``), initialised to the column norms ``||W + gamma*A@B||`` (the norm over
the input axes for each output feature), and the layer computes::

    y = x @ W' + bias,   W' = m * (W + gamma*A@B) / ||W + gamma*A@B||

where the norm is treated as a constant in the backward pass (PEFT detaches it, as the DoRA
paper's section 4.3 suggests). The factored forward adds
``(m/n - 1) * (x @ W) + (m/n) * gamma * (x @ A) @ B`` to the layer's output, as PEFT does
(with adapter dropout, ``x @ W`` is recomputed on the dropped-out input, also as PEFT does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.adapters import (
    KERNEL,
    iter_holders,
    join_path,
    layout_for,
    path_key,
    target_paths,
)
from rslora_jax.config import LoraConfig

MAGNITUDE = "lora_magnitude"
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------- DoRA
def column_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``||W + scale * A @ B||`` over the input axis, without forming ``A @ B``.

    Uses ``||w_j + s A b_j||^2 = ||w_j||^2 + 2 s (A^T w_j) . b_j + s^2 b_j^T (A^T A) b_j``, which
    needs (r, d_out) and (r, r) temporaries instead of a (d_in, d_out) one. float32 throughout.

    Args:
      w: (..., d_in, d_out).
      a: (..., d_in, r).
      b: (..., r, d_out).
      scale: gamma.

    Returns:
      (..., d_out) float32 norms.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[3.0, 0.0], [0.0, 1.0]])
      >>> column_norm(w, jnp.array([[0.0], [1.0]]), jnp.array([[4.0, 0.0]]), 1.0).tolist()
      [5.0, 1.0]
    """
    f32 = jnp.float32
    w, a, b = w.astype(f32), a.astype(f32), b.astype(f32)
    s = jnp.float32(scale)
    aw = jnp.matmul(jnp.swapaxes(a, -1, -2), w, precision=_HIGHEST)  # (..., r, d_out)
    gram = jnp.matmul(jnp.swapaxes(a, -1, -2), a, precision=_HIGHEST)  # (..., r, r)
    gb = jnp.matmul(gram, b, precision=_HIGHEST)
    sq = jnp.sum(w * w, axis=-2) + 2 * s * jnp.sum(aw * b, axis=-2) + s * s * jnp.sum(b * gb, -2)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def dora_matrix(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, m: jax.Array):
    """``m * (W + s A@B) / ||W + s A@B||`` (norm over axis -2, detached), float32.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[3.0, 0.0], [4.0, 2.0]])
      >>> a, b = jnp.zeros((2, 1)), jnp.zeros((1, 2))
      >>> dora_matrix(w, a, b, 1.0, jnp.array([10.0, 1.0])).tolist()
      [[6.0, 0.0], [8.0, 1.0]]
    """
    f32 = jnp.float32
    v = w.astype(f32) + jnp.float32(scale) * jnp.matmul(
        a.astype(f32), b.astype(f32), precision=_HIGHEST
    )
    n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=-2)))
    return v * (m.astype(f32) / n)[..., None, :]


def magnitudes(params: PyTree, adapters: PyTree, config: LoraConfig) -> PyTree:
    """DoRA's initial magnitudes ``||W + gamma*A@B||`` for every adapter in `adapters`.

    Args:
      params: the base tree (kernel values are read: not abstract).
      adapters: the adapter tree (``lora_a``/``lora_b`` per path).
      config: the config.

    Returns:
      ``{...path...: {"lora_magnitude": (*l, d_out)}}`` in ``config.dtype``.

    Raises:
      ValueError: if a kernel is abstract (a `jax.ShapeDtypeStruct`).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"d": {"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]])}}
      >>> ad = {"d": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.zeros((1, 2))}}
      >>> magnitudes(p, ad, LoraConfig(rank=1, use_dora=True))["d"]["lora_magnitude"].tolist()
      [5.0, 2.0]
    """
    plan = []
    for keys, holder in iter_holders(params):
        node = adapters
        for k in keys:
            node = node.get(k, {}) if isinstance(node, Mapping) else {}
        if "lora_a" not in node:
            continue
        path = join_path(keys)
        kernel = holder[KERNEL]
        if isinstance(kernel, jax.ShapeDtypeStruct):
            raise ValueError(
                f"DoRA (LoraConfig.use_dora=True) reads the kernel at {path!r} to initialise "
                "its magnitude, but the kernel is abstract (jax.ShapeDtypeStruct); pass arrays"
            )
        plan.append((path, keys, layout_for(config, path, kernel), config.scale_for(path)))

    def run(kernels, factors):
        out: dict[str, Any] = {}
        for path, keys, layout, scale in plan:
            a, b = factors[path]
            m = column_norm(layout.from_kernel(kernels[path]), a, b, scale)
            dst = out
            for k in keys:
                dst = dst.setdefault(k, {})
            dst[MAGNITUDE] = m.astype(config.dtype)
        return out

    kernels = {path: _get(params, keys)[KERNEL] for path, keys, _, _ in plan}
    factors = {}
    for path, keys, _, _ in plan:
        node = _get(adapters, keys)
        factors[path] = (node["lora_a"], node["lora_b"])
    return jax.jit(run)(kernels, factors)


# ---------------------------------------------------------------------------- PiSSA / OLoRA
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


def principal_factors(
    w: jax.Array, r: int, scale: float, init: str, key: PRNGKey | None = None
) -> tuple[jax.Array, jax.Array]:
    """PiSSA / OLoRA factors (A, B) of a (..., d_in, d_out) matrix, as PEFT computes them.

    Args:
      w: the kernel as a (..., d_in, d_out) matrix (stacks allowed).
      r: the rank.
      scale: gamma.
      init: ``"pissa"``, ``"pissa_niter_<n>"`` or ``"olora"``.
      key: PRNG key for the randomized SVD.

    Returns:
      ``(A, B)`` float32, (..., d_in, r) and (..., r, d_out). The residual base is
      ``w - scale * A @ B``.

    Raises:
      ValueError: for an unknown `init`.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.diag(jnp.array([4.0, 1.0]))
      >>> a, b = principal_factors(w, 1, 2.0, "pissa")
      >>> (2.0 * a @ b).round(5).tolist()  # the top singular triplet of w
      [[4.0, 0.0], [0.0, 0.0]]
    """
    w_t = jnp.swapaxes(w.astype(jnp.float32), -1, -2)  # PEFT's (out, in) weight
    cfg = LoraConfig(init=init)  # validates the name
    if init == "olora":
        q, rr = jnp.linalg.qr(w_t)
        a_t, b_t = rr[..., :r, :], q[..., :, :r]
    else:
        niter = cfg.pissa_niter()
        if init == "pissa":
            v, s, uh = jnp.linalg.svd(w_t, full_matrices=False)
            vr, sr, uhr = v[..., :, :r], s[..., :r], uh[..., :r, :]
        elif niter is not None:
            if key is None:
                raise ValueError(f"init={init!r} (randomized SVD) needs a PRNG key")
            vr, sr, ur = _svd_lowrank(w_t, r, niter, key)
            uhr = jnp.swapaxes(ur, -1, -2)
        else:
            raise ValueError(f"principal_factors: unknown init {init!r}")
        sr = sr / jnp.float32(scale)
        a_t = jnp.sqrt(sr)[..., :, None] * uhr  # (r, in)
        b_t = vr * jnp.sqrt(sr)[..., None, :]  # (out, r)
    return jnp.swapaxes(a_t, -1, -2), jnp.swapaxes(b_t, -1, -2)


def principal_init(params: PyTree, config: LoraConfig, key: PRNGKey) -> tuple[PyTree, PyTree]:
    """PiSSA / OLoRA initialisation (``config.init``): ``(adapters, base with residual kernels)``.

    `rslora_jax.init` calls this for ``init="pissa"``, ``"pissa_niter_<n>"`` and ``"olora"``
    and returns ``combine(adapters, base)``. Per target: factors from `principal_factors` (per
    layer for stacked kernels), kernel ``W - gamma * A @ B`` (float32, cast once), DoRA
    magnitudes if ``config.use_dora``.

    Args:
      params: the parameter tree (kernel values are read).
      config: the config (``init`` one of the base-modifying inits).
      key: PRNG key (used by the randomized SVD only).

    Returns:
      ``(adapters, base)``; `base` has the structure of `params` with the targeted kernels
      replaced.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"d": {"kernel": jnp.diag(jnp.array([4.0, 1.0, 0.5]))}}
      >>> ad, base = principal_init(p, LoraConfig(rank=1, alpha=1.0, init="pissa"),
      ...                           jax.random.key(0))
      >>> base["d"]["kernel"].round(5).tolist()
      [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]
    """
    if not config.base_modifying_init:
        raise ValueError(f"principal_init needs init='pissa'/'olora', got {config.init!r}")
    paths = set(target_paths(params, config))
    plan = {}
    for keys, holder in iter_holders(params):
        path = join_path(keys)
        if path not in paths:
            continue
        kernel = holder[KERNEL]
        if isinstance(kernel, jax.ShapeDtypeStruct):
            raise ValueError(
                f"LoraConfig.init={config.init!r} reads the kernel at {path!r}, which is "
                "abstract (jax.ShapeDtypeStruct); pass arrays"
            )
        plan[path] = (keys, layout_for(config, path, kernel))

    def run(kernels: dict[str, jax.Array], key: PRNGKey):
        adapters: dict[str, Any] = {}
        new_kernels = {}
        for path, (keys, layout) in plan.items():
            kernel = kernels[path]
            scale = config.scale_for(path)
            w = layout.from_kernel(kernel).astype(jnp.float32)
            a, b = principal_factors(
                w, config.rank_for(path), scale, config.init, path_key(key, path)
            )
            residual = w - jnp.float32(scale) * jnp.matmul(a, b, precision=_HIGHEST)
            new_kernels[path] = layout.to_kernel(residual).astype(kernel.dtype)
            node = adapters
            for k in keys:
                node = node.setdefault(k, {})
            node["lora_a"] = a.astype(config.dtype)
            node["lora_b"] = b.astype(config.dtype)
            if config.use_dora:
                node[MAGNITUDE] = column_norm(
                    residual, node["lora_a"], node["lora_b"], scale
                ).astype(config.dtype)
        return adapters, new_kernels

    kernels = {path: _get(params, keys)[KERNEL] for path, (keys, _) in plan.items()}
    adapters, new_kernels = jax.jit(run)(kernels, key)
    base = _replace_kernels(params, new_kernels, ())
    return adapters, base


def _get(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _replace_kernels(tree: Any, kernels: dict[str, jax.Array], prefix: tuple) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, val in tree.items():
        out[key] = _replace_kernels(val, kernels, (*prefix, key))
    path = join_path(prefix)
    if KERNEL in tree and path in kernels:
        out[KERNEL] = kernels[path]
    return out


__all__ = [
    "MAGNITUDE",
    "column_norm",
    "dora_matrix",
    "magnitudes",
    "principal_factors",
    "principal_init",
]
