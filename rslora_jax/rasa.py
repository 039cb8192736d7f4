"""RaSA: rank-sharing LoRA across layers (He et al., ICLR 2025, arXiv 2503.12576).

For the L layers of one module type (all ``q_proj``, all ``down_proj``, ...), layer i's update is
(Flax layout, ``y = x @ W``)::

    DeltaW_i = [A_i | A_S] @ diag(d_i) @ [B_i ; B_S]
             = A_i diag(d_i[:r-k]) B_i + A_S diag(d_i[r-k:]) B_S

    A_i: (d_in, r-k)   B_i: (r-k, d_out)     private to layer i
    A_S: (d_in, L*k)   B_S: (L*k, d_out)     shared by the L layers of that module type
    d_i: (r-k + L*k,)                        trainable, per layer

Each layer's update has rank up to ``r - k + L*k`` (LoRA's: r) for ``L*r*(d_in + d_out) +
L*(r - k + L*k)`` parameters per module type (LoRA's: ``L*r*(d_in + d_out)``). The diagonal
carries the scale: there is no other factor (``LoraConfig.scaling`` is not used). Initialisation
(paper): A_i, A_S as LoRA's A (``LoraConfig.init``), B_i, B_S zero, d_i = ``alpha/(2(r-k))`` on
private and ``alpha/(2Lk)`` on shared entries; ``LoraConfig(rasa_init="rslora")`` uses
``alpha/(2 sqrt(r-k))`` and ``alpha/(2 sqrt(Lk))`` instead (our rank-stabilised extension, not
in the paper).

Tree format. The per-layer entries sit next to the kernel, like LoRA's::

    {"kernel": W, "lora_a": A_i, "lora_b": B_i, "lora_d": d_i}
    # (*l, d_in, r-k), (*l, r-k, d_out), (*l, r-k+L*k)

and each module type's pool lives in one top-level subtree, nested along the module type's path
(the layer path with its layer index removed)::

    params["lora_shared"]["model"]["layers"]["self_attn"]["q_proj"] = {
        "lora_a": A_S,   # (d_in, L*k)
        "lora_b": B_S,   # (L*k, d_out)
    }

Every key starts with ``lora_``, so `split`, `combine`, `optimizer`, `partition_specs` and the
checkpoints treat all of it as adapters. Layers are grouped in two ways:

- unscanned: paths with a layer index (``LoraConfig.rasa_layer_pattern``, default
  ``layers/<int>/``); ``model/layers/3/self_attn/q_proj`` belongs to module type
  ``model/layers/self_attn/q_proj``, and L is the number of such layers;
- scanned: a kernel with one leading layer axis (kernel axes ``'l...'``, ``nn.scan`` stacks):
  its path is the module type, L is the stack size; per-layer entries are stacked on that axis,
  the pool is not.

Both give the same pool path, so a pool carries over when layers are stacked or unstacked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.adapters import (
    KERNEL,
    init_factor_a,
    iter_holders,
    join_path,
    layout_for,
    path_key,
    target_paths,
)
from rslora_jax.config import LoraConfig

SHARED = "lora_shared"
DIAG = "lora_d"
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RasaGroup:
    """The layers of one module type that share a pool.

    Attributes:
      module: the module type: the pool's path under ``params["lora_shared"]``.
      paths: the member kernels' paths (one path for a scanned stack), in layer order.
      num_layers: L.
      rank: r (the same for all members).
      k: shared ranks per layer.
      d_in: flattened input size of the kernels.
      d_out: flattened output size.
      scanned: whether the layers are stacked on a kernel's leading axis.
    """

    module: str
    paths: tuple[str, ...]
    num_layers: int
    rank: int
    k: int
    d_in: int
    d_out: int
    scanned: bool

    @property
    def private(self) -> int:
        """r - k."""
        return self.rank - self.k

    @property
    def pool(self) -> int:
        """L * k, the width of the shared pool."""
        return self.num_layers * self.k


def groups(params: PyTree, config: LoraConfig, paths: list[str] | None = None) -> list[RasaGroup]:
    """Groups the targeted kernels of `params` by module type.

    Args:
      params: the parameter tree.
      config: a config with ``rasa=True``.
      paths: the paths to group (default: the config's targets in `params`).

    Returns:
      One `RasaGroup` per module type, in the order of first appearance.

    Raises:
      ValueError: if a path has neither a layer index nor a leading layer axis, if members of a
        group differ in shape or rank, or if ``rasa_k`` is not below a group's rank.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"layers": {str(i): {"q": {"kernel": jnp.ones((8, 6))}} for i in range(3)}}
      >>> g, = groups(p, LoraConfig(rank=4, rasa=True))
      >>> g.module, g.paths, g.num_layers, g.k
      ('layers/q', ('layers/0/q', 'layers/1/q', 'layers/2/q'), 3, 1)
    """
    holders = {join_path(k): h for k, h in iter_holders(params)}
    if paths is None:
        paths = target_paths(params, config)
    members: dict[str, list[tuple[int, str]]] = {}
    stacked: dict[str, int] = {}
    orphans = []
    for path in paths:
        layout = layout_for(config, path, holders[path][KERNEL])
        module, index = config.rasa_module(path)
        if index is None:
            if not layout.layer_idx:
                orphans.append(path)
                continue
            if layout.layer_idx != (0,):
                raise ValueError(
                    f"RaSA at {path!r}: kernel axes {layout.axes!r} must have exactly one layer "
                    "axis, the leading one (scanned layers, 'l...')"
                )
            stacked[module] = layout.layer_shape[0]
            members.setdefault(module, []).append((0, path))
        else:
            if layout.layer_idx:
                raise ValueError(
                    f"RaSA at {path!r}: the path has a layer index ({index}) and its kernel has "
                    f"layer axes ({layout.axes!r}); only one of the two can define the layers"
                )
            members.setdefault(module, []).append((index, path))
    if orphans:
        shown = ", ".join(repr(p) for p in orphans[:10])
        raise ValueError(
            f"RaSA: {len(orphans)} target path(s) have no layer index matching "
            f"LoraConfig.rasa_layer_pattern={config.rasa_layer_pattern!r} and no leading layer "
            f"axis, so they belong to no group of layers: {shown}. Set rasa_layer_pattern, or "
            "exclude them (LoraConfig.exclude)"
        )
    out = []
    for module, entries in members.items():
        if module in stacked and len(entries) > 1:
            raise ValueError(
                f"RaSA module type {module!r} is both a scanned stack and a set of unscanned "
                f"layers: {sorted(p for _, p in entries)}"
            )
        entries.sort()
        indices = [i for i, _ in entries]
        if len(set(indices)) != len(indices):
            raise ValueError(
                f"RaSA module type {module!r}: layer indices repeat in {[p for _, p in entries]}"
            )
        first = entries[0][1]
        layout = layout_for(config, first, holders[first][KERNEL])
        rank = config.rank_for(first)
        k = config.rasa_k_for(first)
        for _, path in entries[1:]:
            other = layout_for(config, path, holders[path][KERNEL])
            if (other.d_in, other.d_out, config.rank_for(path), config.rasa_k_for(path)) != (
                layout.d_in,
                layout.d_out,
                rank,
                k,
            ):
                raise ValueError(
                    f"RaSA module type {module!r}: {path!r} (d_in={other.d_in}, "
                    f"d_out={other.d_out}, rank={config.rank_for(path)}) differs from {first!r} "
                    f"(d_in={layout.d_in}, d_out={layout.d_out}, rank={rank}); the layers of one "
                    "module type must have the same shapes and rank"
                )
        if k >= rank:
            raise ValueError(
                f"RaSA at {first!r}: rasa_k={k} must be smaller than the rank there ({rank})"
            )
        num_layers = stacked.get(module, len(entries))
        out.append(
            RasaGroup(
                module=module,
                paths=tuple(p for _, p in entries),
                num_layers=num_layers,
                rank=rank,
                k=k,
                d_in=layout.d_in,
                d_out=layout.d_out,
                scanned=module in stacked,
            )
        )
    return out


def diagonal_init(config: LoraConfig, path: str, group: RasaGroup) -> tuple[float, float]:
    """Initial (private, shared) entries of ``lora_d`` at `path` (see the module docstring).

    Example:
      >>> g = RasaGroup("q", ("0/q",), num_layers=4, rank=8, k=1, d_in=8, d_out=8, scanned=False)
      >>> diagonal_init(LoraConfig(rank=8, alpha=14.0, rasa=True), "0/q", g)
      (1.0, 1.75)
    """
    alpha = config.alpha_for(path)
    if config.rasa_init == "rslora":
        return alpha / (2 * math.sqrt(group.private)), alpha / (2 * math.sqrt(group.pool))
    return alpha / (2 * group.private), alpha / (2 * group.pool)


def init_adapters(params: PyTree, config: LoraConfig, key: PRNGKey) -> PyTree:
    """RaSA adapters for `params` (called by `rslora_jax.init_adapters` when ``config.rasa``).

    Only kernel shapes are read (abstract params work). Keys derive from paths: A_i from the
    layer's path, A_S from ``"lora_shared/<module type>"``.

    Args:
      params: the parameter tree.
      config: a config with ``rasa=True``.
      key: a PRNG key.

    Returns:
      The adapter tree: per-layer ``lora_a``/``lora_b``/``lora_d`` and the top-level
      ``lora_shared`` pools.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"layers": {str(i): {"q": {"kernel": jnp.ones((8, 6))}} for i in range(3)}}
      >>> ad = init_adapters(p, LoraConfig(rank=4, rasa=True), jax.random.key(0))
      >>> jax.tree.map(lambda x: x.shape, ad["layers"]["0"])
      {'q': {'lora_a': (8, 3), 'lora_b': (3, 6), 'lora_d': (6,)}}
      >>> jax.tree.map(lambda x: x.shape, ad["lora_shared"])
      {'layers': {'q': {'lora_a': (8, 3), 'lora_b': (3, 6)}}}
    """
    holders = {join_path(k): (k, h) for k, h in iter_holders(params)}
    plan = []
    pools = []
    for group in groups(params, config):
        for path in group.paths:
            keys, holder = holders[path]
            layout = layout_for(config, path, holder[KERNEL])
            priv, shared = diagonal_init(config, path, group)
            plan.append((path, keys, layout, group, priv, shared))
        pools.append(group)

    def make(key: PRNGKey) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path, keys, layout, group, priv, shared in plan:
            node = out
            for k in keys:
                node = node.setdefault(k, {})
            lead = layout.layer_shape
            node["lora_a"] = init_factor_a(
                path_key(key, path), (*lead, group.d_in, group.private), group.d_in, config
            )
            node["lora_b"] = jnp.zeros((*lead, group.private, group.d_out), config.dtype)
            d = jnp.concatenate(
                [
                    jnp.full((*lead, group.private), priv, jnp.float32),
                    jnp.full((*lead, group.pool), shared, jnp.float32),
                ],
                axis=-1,
            )
            node[DIAG] = d.astype(config.dtype)
        for group in pools:
            node = out.setdefault(SHARED, {})
            for k in group.module.split("/"):
                node = node.setdefault(k, {})
            pool_key = path_key(key, f"{SHARED}/{group.module}")
            node["lora_a"] = init_factor_a(pool_key, (group.d_in, group.pool), group.d_in, config)
            node["lora_b"] = jnp.zeros((group.pool, group.d_out), config.dtype)
        return out

    return jax.jit(make)(key)


# ---------------------------------------------------------------------------- pools
def pool(shared: Any, module: str, path: str) -> tuple[Any, Any]:
    """(A_S, B_S) of `module` from the ``lora_shared`` subtree.

    Raises:
      ValueError: if the pool is missing.
    """
    node = shared
    for k in module.split("/"):
        if not isinstance(node, Mapping) or k not in node:
            raise ValueError(
                f"RaSA adapters at {path!r} need their shared pool at "
                f"params[{SHARED!r}] / {module!r}, which is missing; keep the "
                f"{SHARED!r} entry of the tree (it is part of the adapters)"
            )
        node = node[k]
    if not isinstance(node, Mapping) or "lora_a" not in node or "lora_b" not in node:
        raise ValueError(f"RaSA pool {SHARED}/{module} must hold 'lora_a' and 'lora_b'")
    return node["lora_a"], node["lora_b"]


def factors(
    holder: Mapping[str, Any], path: str, config: LoraConfig, shared: Any
) -> tuple[jax.Array, jax.Array]:
    """``([A_i | A_S], diag(d_i) @ [B_i ; B_S])``: the layer's update as one LoRA pair.

    Works on whole stacks and on the per-layer slices that ``nn.scan`` hands a module; the pool
    is broadcast over the layer axes. The forward pass uses this with scale 1, so the update is
    computed in factored form, never as a (d_in, d_out) matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> h = {"lora_a": jnp.ones((4, 1)), "lora_b": jnp.ones((1, 3)),
      ...      "lora_d": jnp.array([1.0, 2.0, 3.0])}
      >>> shared = {"layers": {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}}
      >>> a, b = factors(h, "layers/0/q", LoraConfig(rank=2, rasa=True), shared)
      >>> a.shape, b[:, 0].tolist()
      ((4, 3), [1.0, 2.0, 3.0])
    """
    module, _ = config.rasa_module(path)
    a_s, b_s = pool(shared, module, path)
    a, b, d = holder["lora_a"], holder["lora_b"], holder[DIAG]
    lead = a.shape[:-2]
    a_s = jnp.broadcast_to(a_s.astype(a.dtype), (*lead, *a_s.shape))
    b_s = jnp.broadcast_to(b_s.astype(b.dtype), (*lead, *b_s.shape))
    a_cat = jnp.concatenate([a, a_s], axis=-1)
    b_cat = jnp.concatenate([b, b_s], axis=-2) * d.astype(b.dtype)[..., :, None]
    return a_cat, b_cat


def check(holder: Mapping[str, Any], path: str, config: LoraConfig, shared: Any) -> None:
    """Checks the shapes of a RaSA layer's entries and pool against its kernel and config.

    Raises:
      ValueError: naming the path, the shapes found and the shapes expected.
    """
    module, _ = config.rasa_module(path)
    a_s, b_s = pool(shared, module, path)
    layout = layout_for(config, path, holder[KERNEL])
    r, k = config.rank_for(path), config.rasa_k_for(path)
    a, b, d = holder["lora_a"], holder["lora_b"], holder[DIAG]
    width = a_s.shape[-1] if a_s.ndim == 2 else -1
    lead = layout.layer_shape
    expected = {
        "lora_a": (*lead, layout.d_in, r - k),
        "lora_b": (*lead, r - k, layout.d_out),
        DIAG: (*lead, r - k + width),
        f"{SHARED}/{module}/lora_a": (layout.d_in, width),
        f"{SHARED}/{module}/lora_b": (width, layout.d_out),
    }
    found = {
        "lora_a": tuple(a.shape),
        "lora_b": tuple(b.shape),
        DIAG: tuple(d.shape),
        f"{SHARED}/{module}/lora_a": tuple(a_s.shape),
        f"{SHARED}/{module}/lora_b": tuple(b_s.shape),
    }
    bad = [n for n in expected if expected[n] != found[n]]
    if bad or width < k or width % k:
        raise ValueError(
            f"RaSA adapters at {path!r} (kernel {layout.shape}, axes {layout.axes!r}, rank {r}, "
            f"k {k}) do not fit: found {found}, expected {expected} with a pool width that is a "
            f"multiple of k"
        )
    if lead and width != lead[0] * k:
        raise ValueError(
            f"RaSA adapters at {path!r}: a stack of {lead[0]} layers needs a pool of "
            f"{lead[0]} * {k} = {lead[0] * k} ranks, found {width}"
        )


def delta(holder: Mapping[str, Any], path: str, config: LoraConfig, shared: Any) -> jax.Array:
    """``A_i diag(d_priv) B_i + A_S diag(d_sh) B_S`` in float32, in the kernel's layout.

    Example:
      >>> import jax.numpy as jnp
      >>> h = {"kernel": jnp.zeros((4, 3)), "lora_a": jnp.ones((4, 1)),
      ...      "lora_b": jnp.ones((1, 3)), "lora_d": jnp.array([1.0, 2.0, 3.0])}
      >>> shared = {"layers": {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}}
      >>> delta(h, "layers/0/q", LoraConfig(rank=2, rasa=True), shared)[0].tolist()
      [6.0, 6.0, 6.0]
    """
    check(holder, path, config, shared)
    module, _ = config.rasa_module(path)
    a_s, b_s = pool(shared, module, path)
    f32 = jnp.float32
    a, b, d = (holder[n].astype(f32) for n in ("lora_a", "lora_b", DIAG))
    r_p = a.shape[-1]
    priv = jnp.matmul(a * d[..., None, :r_p], b, precision=_HIGHEST)
    shared_part = jnp.matmul(
        a_s.astype(f32) * d[..., None, r_p:], b_s.astype(f32), precision=_HIGHEST
    )
    layout = layout_for(config, path, holder[KERNEL])
    return layout.to_kernel(priv + shared_part)


__all__ = [
    "DIAG",
    "SHARED",
    "RasaGroup",
    "delta",
    "diagonal_init",
    "factors",
    "groups",
    "init_adapters",
]
