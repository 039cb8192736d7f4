"""`init` and `init_adapters`: add adapters to a parameter tree (any method, any initialiser).

The targets are found once (`rslora_jax.core.target_sites`, with every check); the config's
method draws its leaves (`Method.init_adapters`). A base-modifying initialiser (PiSSA, OLoRA)
computes both factors from each kernel and changes the kernel to ``W - gamma * A @ B``
(float32, cast once), so the model's output is unchanged; the method then adopts those factors
(`Method.adopt`: DoRA adds its magnitudes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.sites import path_key, target_sites
from rslora_jax.core.tree import KERNEL, combine, iter_weights, replace_weights, set_in
from rslora_jax.execution.quant import is_quantized
from rslora_jax.ops.quantize import dequantize

_HIGHEST = jax.lax.Precision.HIGHEST


def init_adapters(params: PyTree, config: LoraConfig, key: PRNGKey) -> PyTree:
    """Creates the adapter tree alone (the first output of `split` of `init`'s result).

    Only the kernels' shapes are read, so `params` may be abstract (`jax.ShapeDtypeStruct`
    leaves, e.g. from `jax.eval_shape`): build adapters for a model that is not materialised yet,
    or under `jax.jit` with ``out_shardings`` from `partition_specs`. Exceptions: DoRA reads the
    kernels' values for its magnitudes, and PiSSA/OLoRA change the base, so they need `init`.

    Args:
      params: the parameter tree (nested dicts).
      config: the adapter configuration.
      key: a PRNG key.

    Returns:
      Nested dicts holding the method's leaves for each target path (``lora_a`` / ``lora_b``;
      ``lora_magnitude`` with DoRA; ``lora_d`` and the top-level ``lora_shared`` pools with RaSA).

    Raises:
      ValueError: as `init`, and for a base-modifying ``config.init`` (PiSSA, OLoRA).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}
      >>> ad = init_adapters(params, LoraConfig(rank=2), jax.random.key(0))
      >>> jax.tree.map(lambda x: x.shape, ad)
      {'dense': {'lora_a': (6, 2), 'lora_b': (2, 4)}}
    """
    if config.init.modifies_base:
        raise ValueError(
            f"LoraConfig.init={config.init.spec!r} changes the base kernels (W - gamma*A@B), so "
            "init_adapters cannot return the adapters alone; use rslora_jax.init, or "
            "rslora_jax.principal_init for the pair (adapters, base)"
        )
    sites = target_sites(params, config)
    if not _has_quantized(params):
        return config.method.init_adapters(params, sites, config, key)
    # A quantized base: the method sees each kernel dequantized, inside one compiled program,
    # so a method that reads only shapes (LoRA, RaSA) costs nothing and DoRA's magnitudes
    # never need the whole dequantized base at once outside it.
    concrete = all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    if not concrete:
        return config.method.init_adapters(_abstract_kernels(params), sites, config, key)
    return jax.jit(lambda p, k: config.method.init_adapters(dequantize(p), sites, config, k))(
        params, key
    )


def _has_quantized(params: PyTree) -> bool:
    return any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))


def _abstract_kernels(params: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )


def init(params: PyTree, config: LoraConfig, key: PRNGKey) -> PyTree:
    """Adds adapters to every kernel `config` targets.

    The returned tree is `params` with the method's leaves added to each targeted kernel's dict
    (LoRA: ``lora_a`` of shape ``(*l, d_in, r)`` and ``lora_b`` ``(*l, r, d_out)``, zeros), so the
    model's output is unchanged. Keys are derived per path, so the result does not depend on dict
    order. With a base-modifying initialiser (``init="pissa"``, ``"pissa_niter_<n>"``,
    ``"olora"``) the targeted kernels become ``W - gamma * A @ B``, so the output is still
    unchanged (see `principal_init`).

    Args:
      params: a Flax parameter tree (nested dicts; the ``params`` collection, not the whole
        variables dict).
      config: what to adapt and how.
      key: a PRNG key.

    Returns:
      The same tree with adapters added (leaves of `params` are shared, not copied, except the
      kernels that PiSSA/OLoRA change).

    Raises:
      ValueError: if nothing is targeted (listing candidate paths), if a target already has
        adapters, if the rank exceeds a kernel's dimensions, or if a kernel's axes are unknown.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"q_proj": {"kernel": jnp.ones((8, 8))}, "lm_head": {"kernel": jnp.ones((8, 3))}}
      >>> out = init(params, LoraConfig(rank=4), jax.random.key(0))
      >>> sorted(out["q_proj"]), sorted(out["lm_head"])
      (['kernel', 'lora_a', 'lora_b'], ['kernel'])
    """
    if config.init.modifies_base:
        adapters, base = principal_init(params, config, key)
        return combine(adapters, base)
    return combine(init_adapters(params, config, key), params)


def principal_init(params: PyTree, config: LoraConfig, key: PRNGKey) -> tuple[PyTree, PyTree]:
    """PiSSA / OLoRA initialisation (``config.init``): ``(adapters, base with residual kernels)``.

    Per target: factors from the initialiser (per layer for stacked kernels), kernel
    ``W - gamma * A @ B`` (float32, cast once), then the method's leaves for those factors (DoRA
    adds magnitudes of the residual).

    Args:
      params: the parameter tree (kernel values are read).
      config: the config (``init`` a base-modifying initialiser).
      key: PRNG key (used by the randomized SVD only).

    Returns:
      ``(adapters, base)``; `base` has the structure of `params` with the targeted kernels
      replaced.

    Raises:
      ValueError: if ``config.init`` does not change the base, or a kernel is abstract.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"d": {"kernel": jnp.diag(jnp.array([4.0, 1.0, 0.5]))}}
      >>> ad, base = principal_init(p, LoraConfig(rank=1, alpha=1.0, init="pissa"),
      ...                           jax.random.key(0))
      >>> base["d"]["kernel"].round(5).tolist()
      [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]
    """
    if not config.init.modifies_base:
        raise ValueError(f"principal_init needs init='pissa'/'olora', got {config.init.spec!r}")
    sites = target_sites(params, config)
    kernels = {}
    weights = {ref.path: holder[KERNEL] for ref, holder in iter_weights(params)}
    for site in sites:
        kernel = weights[site.path]
        if is_quantized(kernel):
            raise ValueError(
                f"LoraConfig.init={config.init.spec!r} changes the base kernels to "
                f"W - gamma*A@B, but the kernel at {site.path!r} is quantized "
                f"({kernel.scheme}): initialise on the plain base, then rslora_jax.quantize "
                "the result (the residual is quantized, as QPiSSA does)"
            )
        if isinstance(kernel, jax.ShapeDtypeStruct):
            raise ValueError(
                f"LoraConfig.init={config.init.spec!r} reads the kernel at {site.path!r}, which "
                "is abstract (jax.ShapeDtypeStruct); pass arrays"
            )
        kernels[site.path] = kernel

    def run(kernels: dict[str, jax.Array], key: PRNGKey):
        adapters: dict[str, Any] = {}
        new_kernels = {}
        for site in sites:
            kernel = kernels[site.path]
            w = site.layout.from_kernel(kernel).astype(jnp.float32)
            a, b = config.init.factors(w, site.rank, site.scale, path_key(key, site.path))
            residual = w - jnp.float32(site.scale) * jnp.matmul(a, b, precision=_HIGHEST)
            new_kernels[site.path] = site.layout.to_kernel(residual).astype(kernel.dtype)
            leaves = config.method.adopt(site, a, b, residual, config)
            for name, leaf in leaves.items():
                set_in(adapters, (*site.keys, name), leaf)
        return adapters, new_kernels

    adapters, new_kernels = jax.jit(run)(kernels, key)
    return adapters, replace_weights(params, new_kernels)


__all__ = ["init", "init_adapters", "principal_init"]
