"""PEFT adapters of fused checkpoint modules (Phi-3's ``qkv_proj``, ``gate_up_proj``).

Our tree holds a fused module's members split (q/k/v, gate/up; see
:class:`~rslora_jax.models.families.FusedModule`); PEFT adapts the fused Linear: one
``lora_A`` (r, d_in) and one ``lora_B`` (sum of the members' d_out, r). Both directions are
exact:

- import: each member gets the shared A and its rows of B (and of DoRA's magnitude), with the
  fused module's rank and alpha;
- export: when every member is adapted with the same A, rank and scale (an imported adapter,
  or A frozen), the fused adapter is that A with the members' B stacked; otherwise it stacks
  the members' A (rank = the sum of their ranks) over a block-diagonal B whose blocks carry each
  member's scale relative to the fused module's (``lora_alpha`` is the first member's), so that
  ``scale * B @ A`` is, row block by row block, each member's ``scale_i * B_i @ A_i``. A member
  without an adapter gets a zero block (and, with DoRA, the norms of its base rows as magnitude,
  which leaves it unchanged).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rslora_jax._types import Params
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.tree import KERNEL, is_adapter_key
from rslora_jax.hf.peft._format import LeafSpec
from rslora_jax.models.families import FusedModule, ModelFamily
from rslora_jax.ops.quantize import dequantize, is_quantized

_LAYERS = ("model", "layers")


def _by_layout(specs: Sequence[LeafSpec]) -> tuple[str, str, list[str]]:
    a = next(s.ours for s in specs if s.layout == "a")
    b = next(s.ours for s in specs if s.layout == "b")
    return a, b, [s.ours for s in specs if s.layout == "out"]


def _host(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def fuse_adapters(
    fam: ModelFamily, params: Params, lora_config: LoraConfig, specs: Sequence[LeafSpec], where: str
) -> tuple[Params, LoraConfig]:
    """Our tree (members split) as the checkpoint's fused modules, for export.

    Returns:
        ``(params, lora_config)``: fused holders (kernel shapes as `jax.ShapeDtypeStruct`,
        adapters as host arrays) and a config whose patterns give each fused module its rank
        and alpha (first in the patterns; the other modules keep theirs).

    Raises:
        ValueError: a member's adapter rank differs from `lora_config`'s.
    """
    a_name, b_name, out_names = _by_layout(specs)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}

    def fuse(group: FusedModule, holders: list[Mapping[str, Any]], paths: list[str], fused: str):
        kernels = [h[KERNEL] for h in holders]
        sizes = [int(k.shape[-1]) for k in kernels]
        total = sum(sizes)
        lead = tuple(kernels[0].shape[:-1])
        dtype = np.float32 if is_quantized(kernels[0]) else kernels[0].dtype
        out: dict[str, Any] = {KERNEL: jax.ShapeDtypeStruct((*lead, total), dtype)}
        adapted = [i for i, h in enumerate(holders) if any(is_adapter_key(k) for k in h)]
        if not adapted:
            return out
        for i in adapted:
            r_i = int(holders[i][a_name].shape[-1])
            if r_i != lora_config.rank_for(paths[i]):
                raise ValueError(
                    f"{where}: the adapter at {paths[i]!r} has rank {r_i}, but lora_config gives "
                    f"rank {lora_config.rank_for(paths[i])} there: the scale would be wrong"
                )
        a = [_host(holders[i][a_name]) for i in adapted]
        b = [_host(holders[i][b_name]) for i in adapted]
        scales = [lora_config.scale_for(paths[i]) for i in adapted]
        alpha = lora_config.alpha_for(paths[adapted[0]])
        shared = (
            len(adapted) == len(holders)
            and len({x.shape for x in a}) == 1
            and len(set(scales)) == 1
            and all(np.array_equal(a[0], x) for x in a[1:])
        )
        if shared:
            r = a[0].shape[-1]
            out[a_name] = a[0]
            out[b_name] = np.concatenate(b, axis=-1)
        else:
            r = sum(x.shape[-1] for x in a)
            s = alpha / math.sqrt(r) if lora_config.scaling == "rslora" else alpha / r
            dtype = np.result_type(*b)
            block = np.zeros((*b[0].shape[:-2], r, total), dtype)
            row = 0
            for i, b_i, s_i in zip(adapted, b, scales):
                col = sum(sizes[:i])
                block[..., row : row + b_i.shape[-2], col : col + sizes[i]] = b_i * (s_i / s)
                row += b_i.shape[-2]
            out[a_name] = np.concatenate(a, axis=-1)
            out[b_name] = block
        for name in out_names:  # DoRA's magnitude: unadapted rows keep their base norms
            parts = []
            for i, h in enumerate(holders):
                if i in adapted:
                    parts.append(_host(h[name]))
                else:
                    k = _host(dequantize({KERNEL: h[KERNEL]})[KERNEL]).astype(np.float32)
                    norm = np.sqrt(np.sum(np.square(k), axis=-2))
                    parts.append(norm.astype(_host(holders[adapted[0]][name]).dtype))
            out[name] = np.concatenate(parts, axis=-1)
        ranks[fused] = int(r)
        alphas[fused] = float(alpha)
        return out

    new = _walk(fam.fused, params, fuse)
    rank_pattern = {re.escape(p): r for p, r in ranks.items()}
    rank_pattern.update(dict(lora_config.rank_pattern))
    alpha_pattern = {re.escape(p): a for p, a in alphas.items()}
    alpha_pattern.update(dict(lora_config.alpha_pattern))
    return new, lora_config.replace(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _walk(groups: Sequence[FusedModule], params: Params, fuse: Any) -> Params:
    """`params` with each group's member holders replaced by ``fuse(group, holders, paths,
    fused path)``."""

    def walk(node: Any, keys: tuple[str, ...]) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v, (*keys, str(k))) for k, v in node.items()}
        if tuple(keys[:2]) != _LAYERS or not keys:
            return out
        for g in groups:
            if keys[-1] != g.parent or not any(m in out for m in g.members):
                continue
            present = [m for m in g.members if m in out]
            if len(present) != len(g.members):
                raise ValueError(
                    f"{'/'.join(keys)}: {g.name} fuses {list(g.members)}, but only {present} exist"
                )
            holders = [out.pop(m) for m in g.members]
            paths = ["/".join((*keys, m)) for m in g.members]
            out[g.name] = fuse(g, holders, paths, "/".join((*keys, g.name)))
        return out

    return walk(params, ())


def split_adapters(
    fam: ModelFamily,
    adapters: dict[str, Any],
    path_rank: dict[str, int],
    path_alpha: dict[str, float],
    member_sizes: Mapping[str, int],
    specs: Sequence[LeafSpec],
) -> tuple[dict[str, Any], dict[str, int], dict[str, float]]:
    """Imported adapters of fused modules onto their members (shared A, B's and magnitudes'
    rows split), with the fused module's rank and alpha.

    Args:
        fam: the family (its ``fused`` modules).
        adapters: nested dict of adapter leaves by fused path.
        path_rank: rank per adapted (fused) path.
        path_alpha: alpha per adapted (fused) path.
        member_sizes: output features of each of our member module paths.
        specs: the method's PEFT leaves.

    Returns:
        ``(adapters, path_rank, path_alpha)`` over our (member) paths.
    """
    a_name, _, _ = _by_layout(specs)
    ranks, alphas = dict(path_rank), dict(path_alpha)
    for group in fam.fused:
        for fused in [p for p in path_rank if p.rsplit("/", 1)[-1] == group.name]:
            if group.fused_path(group.member_paths(fused)[0]) is None:
                continue
            *parent_keys, name = fused.split("/")
            node = adapters
            for k in parent_keys:
                node = node[k]
            leaves = node.pop(name)
            offset = 0
            for member in group.member_paths(fused):
                size = member_sizes[member]
                node[member.rsplit("/", 1)[-1]] = {
                    k: (v if k == a_name else v[..., offset : offset + size])
                    for k, v in leaves.items()
                }
                offset += size
                ranks[member], alphas[member] = ranks[fused], alphas[fused]
            del ranks[fused], alphas[fused]
    return adapters, ranks, alphas


def member_targets(fam: ModelFamily, meta: Mapping[str, Any]) -> dict[str, Any]:
    """`meta` with fused module names in a ``target_modules`` list replaced by their members'
    (so that our targets name the modules our tree has)."""
    target = meta.get("target_modules")
    if not isinstance(target, list):
        return dict(meta)
    names: list[str] = []
    for t in target:
        group = next((g for g in fam.fused if t == g.name or t.endswith("." + g.name)), None)
        if group is None:
            names.append(t)
        else:
            head = t[: -len(group.name)]
            names.extend(head + m for m in group.members)
    return {**meta, "target_modules": names}


__all__ = ["fuse_adapters", "member_targets", "split_adapters"]
