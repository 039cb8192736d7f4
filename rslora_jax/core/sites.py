"""Which kernels a config adapts: `target_sites` (with every check done before any work)."""

from __future__ import annotations

import difflib
import zlib
from collections.abc import Sequence

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


def check_listed_targets(config: LoraConfig, paths: Sequence[str], where: str = "") -> None:
    """Refuses a listed target name that matches none of `paths` (a typo such as ``v_projj``).

    Only a list of names (PEFT's ``target_modules`` list rule) is checked: each name must match
    the end of at least one kernel path. A regex or a callable may rightly match nothing in a
    given tree.

    Args:
      config: the config.
      paths: every kernel path of the tree (targeted or not).
      where: what is checked, for the message (e.g. ``" of the NNX model"``).

    Raises:
      ValueError: naming the unmatched names and the module names there are (closest first).

    Example:
      >>> check_listed_targets(LoraConfig(targets=["q_proj", "v_projj"]), ["l/q_proj", "l/v_proj"])
      Traceback (most recent call last):
      ...
      ValueError: LoraConfig(targets=('q_proj', 'v_projj')): 'v_projj' matches no kernel (did you mean 'v_proj'?). Module names: 'q_proj', 'v_proj'
    """
    targets = config.targets
    if isinstance(targets, str) or callable(targets):
        return
    unmatched = [
        name for name in targets if not any(p == name or p.endswith("/" + name) for p in paths)
    ]
    if not unmatched:
        return
    names = sorted({p.rsplit("/", 1)[-1] for p in paths})
    problems = []
    for name in unmatched:
        close = difflib.get_close_matches(name.rsplit("/", 1)[-1], names, n=1, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        problems.append(f"{name!r} matches no kernel{where}{hint}")
    shown = ", ".join(repr(n) for n in names[:40]) + (" ..." if len(names) > 40 else "")
    raise ValueError(
        f"LoraConfig(targets={targets!r}): {'; '.join(problems)}. Module names: "
        f"{shown or 'none: the tree holds no kernel'}"
    )


def target_sites(params: PyTree, config: LoraConfig) -> list[Site]:
    """The sites `config` adapts in `params`, in tree order.

    Raises:
      ValueError: if nothing matches (the message lists candidate paths), if a listed target
        name matches no kernel (`check_listed_targets`), if a target already has adapters,
        or if a target's kernel axes or rank do not fit its kernel.

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
    if not chosen:
        candidates = [join_path(k) for k, _ in holders]
        shown = ", ".join(repr(c) for c in candidates[:30])
        more = f" (and {len(candidates) - 30} more)" if len(candidates) > 30 else ""
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}, exclude={config.exclude!r}) matched no "
            f"kernel. Candidate paths: {shown or 'none: the tree holds no kernel'}{more}"
        )
    check_listed_targets(config, [join_path(k) for k, _ in holders])
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


__all__ = [
    "check_listed_targets",
    "layout_for",
    "path_key",
    "site_for",
    "target_paths",
    "target_sites",
]
