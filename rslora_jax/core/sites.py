"""Which kernels a config adapts: `target_sites` (with every check done before any work)."""

from __future__ import annotations

import zlib

import jax

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.layout import KernelLayout
from rslora_jax.core.protocol import Site
from rslora_jax.core.tree import KERNEL, is_adapter_key, iter_holders, join_path


def layout_for(config: LoraConfig, path: str, kernel: object) -> KernelLayout:
    """The `KernelLayout` of the kernel at `path` under `config` (its ``kernel_axes``)."""
    return KernelLayout(config.axes_for(path, kernel.shape), kernel.shape)


def site_for(config: LoraConfig, path: str, keys: tuple, kernel: object) -> Site:
    """The `Site` of the kernel at `path`."""
    return Site(
        path=path,
        keys=tuple(keys),
        layout=layout_for(config, path, kernel),
        rank=config.rank_for(path),
        alpha=config.alpha_for(path),
        scale=config.scale_for(path),
    )


def target_sites(params: PyTree, config: LoraConfig, *, allow_empty: bool = False) -> list[Site]:
    """The sites `config` adapts in `params`, in tree order.

    `allow_empty`: return ``[]`` instead of raising when no kernel matches (the targets name
    only embedding tables, `rslora_jax.core.extras`).

    Raises:
      ValueError: if nothing matches (the message lists candidate paths), if a target already
        has adapters, or if a target's kernel axes or rank do not fit its kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"q": {"kernel": jnp.ones((8, 4))}, "lm_head": {"kernel": jnp.ones((4, 9))}}
      >>> [(s.path, s.layout.d_in, s.rank) for s in target_sites(p, LoraConfig(rank=2))]
      [('q', 8, 2)]
    """
    holders = list(iter_holders(params))
    chosen = []
    for keys, holder in holders:
        path = join_path(keys)
        if config.is_target(path, holder[KERNEL]):
            chosen.append((path, keys, holder))
    if not chosen and not allow_empty:
        candidates = [join_path(k) for k, _ in holders]
        shown = ", ".join(repr(c) for c in candidates[:30])
        more = f" (and {len(candidates) - 30} more)" if len(candidates) > 30 else ""
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}, exclude={config.exclude!r}) matched no "
            f"kernel. Candidate paths: {shown or 'none: the tree holds no kernel'}{more}"
        )
    sites = []
    for path, keys, holder in chosen:
        if any(is_adapter_key(k) for k in holder):
            raise ValueError(f"{path!r} already has adapter leaves: {sorted(holder)}")
        site = site_for(config, path, keys, holder[KERNEL])
        lay = site.layout
        if site.rank > min(lay.d_in, lay.d_out):
            raise ValueError(
                f"rank {site.rank} at {path!r} exceeds min(d_in, d_out) = "
                f"min({lay.d_in}, {lay.d_out}) of its kernel {lay.shape}: the update "
                "W + A@B cannot have rank above that; lower LoraConfig.rank or set a "
                "rank_pattern for this path"
            )
        sites.append(site)
    return sites


def target_paths(params: PyTree, config: LoraConfig) -> list[str]:
    """The paths `config` adapts in `params` (see `target_sites`)."""
    return [s.path for s in target_sites(params, config)]


def path_key(key: PRNGKey, path: str) -> PRNGKey:
    """A key for `path` that does not depend on the order of the tree's dicts."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


__all__ = ["layout_for", "path_key", "site_for", "target_paths", "target_sites"]
