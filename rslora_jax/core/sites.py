"""Which kernels a config adapts: `target_sites` (with every check done before any work).

Weights are found in the tree (`rslora_jax.core.tree.iter_weights`); which of them enter a linear
contraction with an activation is known for ``kernel`` (Flax's Dense-like layers) and, for any
other name (gemma's ``w``, ``gating_einsum``, ``linear``; tunix's ``w``), from the config's kernel
axes: `rslora_jax.infer_kernel_axes` (linen) and `rslora_jax.nnx.kernel_axes` read them off the
model by how it uses each weight, so a weight not named ``kernel`` is a candidate exactly when
``LoraConfig.kernel_axes`` names its path. A target that matches only weights whose use is
unknown is an error that lists them; ``"all-linear"`` that leaves such a weight (two or more
axes, not an embedding) unadapted warns with the list.
"""

from __future__ import annotations

import difflib
import re
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import jax

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core.config import ALL_LINEAR, OUTPUT_LAYER_NAMES, LoraConfig
from rslora_jax.core.layout import KernelLayout
from rslora_jax.core.protocol import Site
from rslora_jax.core.tree import KERNEL, WeightRef, is_adapted, iter_weights


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


def declared(config: LoraConfig, path: str) -> bool:
    """Whether ``config.kernel_axes`` names `path` (a mapping entry that fullmatches it)."""
    axes = config.kernel_axes
    return isinstance(axes, tuple) and any(re.fullmatch(k, path) for k, _ in axes)


def declared_axes(config: LoraConfig, path: str) -> str | None:
    """The kernel axes ``config.kernel_axes`` gives `path` (the first fullmatching entry, or the
    string for all kernels), or None."""
    axes = config.kernel_axes
    if isinstance(axes, str):
        return axes
    for key, val in axes or ():
        if re.fullmatch(key, path):
            return val
    return None


def _is_embedding(ref: WeightRef) -> bool:
    names = [str(ref.name), *map(str, ref.keys[-1:])]
    return any("embed" in n.lower() for n in names) or (
        ref.path.rsplit("/", 1)[-1] in OUTPUT_LAYER_NAMES
    )


def _describe(refs: list[tuple[WeightRef, Any]]) -> str:
    shown = ", ".join(f"{r.path!r} ({r.name} {tuple(w.shape)})" for r, w in refs[:20])
    return shown + (f" (and {len(refs) - 20} more)" if len(refs) > 20 else "")


def _unknown_use_message(config: LoraConfig, refs: list[tuple[WeightRef, Any]]) -> str:
    return (
        f"LoraConfig(targets={config.targets!r}) matches weights not named 'kernel' whose use "
        f"the config does not know: {_describe(refs)}. Say which enter a linear contraction "
        "(and which of their axes are layer 'l', input 'i' and output 'o' axes) with "
        "LoraConfig(kernel_axes={path: roles}); rslora_jax.infer_kernel_axes (linen) or "
        "rslora_jax.nnx.kernel_axes reads them off the model"
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

    Candidates are the ``kernel`` weights and the weights of other names that
    ``config.kernel_axes`` names (see the module docstring).

    Raises:
      ValueError: if nothing matches (the message lists candidate paths, and weights of other
        names whose use is unknown), if a listed target name matches no kernel
        (`check_listed_targets`), if a target names a weight whose use is unknown, if a target
        already has adapters, or if a target's kernel axes or rank do not fit its kernel.

    Warns:
      UserWarning: ``targets="all-linear"`` leaves weights of two or more axes that are not
        embeddings unadapted because their use is unknown (the message lists them).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"q": {"kernel": jnp.ones((8, 4))}, "lm_head": {"kernel": jnp.ones((4, 9))}}
      >>> [(s.path, s.layout.d_in, s.rank) for s in target_sites(p, LoraConfig(rank=2))]
      [('q', 8, 2)]
      >>> g = {"attn": {"q_einsum": {"w": jnp.ones((2, 8, 4))}}}
      >>> cfg = LoraConfig(rank=2, kernel_axes={"attn/q_einsum": "oio"})
      >>> [(s.path, s.layout.d_in, s.layout.d_out) for s in target_sites(g, cfg)]
      [('attn/q_einsum', 8, 8)]
    """
    candidates: list[tuple[WeightRef, dict]] = []
    unknown: list[tuple[WeightRef, Any]] = []
    for ref, holder in iter_weights(params):
        if ref.name == KERNEL or declared(config, ref.path):
            candidates.append((ref, holder))
        else:
            unknown.append((ref, holder[KERNEL]))
    chosen = [(r, h) for r, h in candidates if config.is_target(r.path, h[KERNEL])]
    matched_unknown = [(r, w) for r, w in unknown if config.is_target(r.path, w)]
    if config.targets != ALL_LINEAR and matched_unknown:
        raise ValueError(_unknown_use_message(config, matched_unknown))
    # "all-linear" leaves embeddings and output layers out quietly, as PEFT does.
    unknown = [(r, w) for r, w in unknown if not _is_embedding(r)]
    matched_unknown = [(r, w) for r, w in matched_unknown if not _is_embedding(r)]
    if not chosen:
        paths = [r.path for r, _ in candidates]
        shown = ", ".join(repr(c) for c in paths[:30])
        more = f" (and {len(paths) - 30} more)" if len(paths) > 30 else ""
        others = ""
        if unknown:
            others = (
                f". Weights not named 'kernel' whose use is unknown: {_describe(unknown)}; "
                "give their kernel axes (LoraConfig(kernel_axes=...), read off the model with "
                "rslora_jax.infer_kernel_axes or rslora_jax.nnx.kernel_axes) to adapt them"
            )
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}, exclude={config.exclude!r}) matched no "
            f"kernel. Candidate paths: {shown or 'none: the tree holds no kernel'}{more}{others}"
        )
    if config.targets == ALL_LINEAR and matched_unknown:
        warnings.warn(
            "LoraConfig(targets='all-linear') leaves weights unadapted whose use it does not "
            f"know: {_describe(matched_unknown)}. Give their kernel axes "
            "(rslora_jax.infer_kernel_axes / rslora_jax.nnx.kernel_axes) to adapt them, or "
            "exclude them (LoraConfig(exclude=...)) to silence this",
            UserWarning,
            stacklevel=3,
        )
    check_listed_targets(config, [r.path for r, _ in candidates] + [r.path for r, _ in unknown])
    sites = []
    for ref, holder in chosen:
        path = ref.path
        if is_adapted(holder):
            raise ValueError(f"{path!r} already has adapter leaves: {sorted(holder)}")
        site = site_for(config, path, ref.leaf_keys, holder[KERNEL])
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
    "declared",
    "declared_axes",
    "layout_for",
    "path_key",
    "site_for",
    "target_paths",
    "target_sites",
]
