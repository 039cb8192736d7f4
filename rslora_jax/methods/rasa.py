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
private and ``alpha/(2Lk)`` on shared entries; ``RaSA(init="rslora")`` uses
``alpha/(2 sqrt(r-k))`` and ``alpha/(2 sqrt(Lk))`` instead (our rank-stabilised extension, not
in the paper). In the protocol's terms the factor pair is ``([A_i | A_S], diag(d_i) [B_i ; B_S])``
with scale 1, so the factored and fused forward, merge and unmerge are LoRA's. PEFT has no RaSA
format (`RaSA.peft_fields` is None): export the merged model instead.

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

- unscanned: paths with a layer index (``RaSA.layer_pattern``, default ``layers/<int>/``);
  ``model/layers/3/self_attn/q_proj`` belongs to module type ``model/layers/self_attn/q_proj``,
  and L is the number of such layers;
- scanned: a kernel with one leading layer axis (kernel axes ``'l...'``, ``nn.scan`` stacks):
  its path is the module type, L is the stack size; per-layer entries are stacked on that axis,
  the pool is not.

Both give the same pool path, so a pool carries over when layers are stacked or unstacked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core.protocol import Leaf, Method, Site, check_leaf_names, register_method
from rslora_jax.core.sites import path_key
from rslora_jax.core.tree import set_in
from rslora_jax.methods.lora import A, B, LoRA

if TYPE_CHECKING:  # pragma: no cover
    from rslora_jax.core.config import LoraConfig

SHARED = "lora_shared"
DIAG = "lora_d"
INITS = ("paper", "rslora")
#: A path's layer index for grouping: ".../layers/<int>/..." (group 1 is the index).
DEFAULT_LAYER_PATTERN = r"(?:^|/)layers/(\d+)(?:/|$)"


def _validate(k: Any, pattern: Any, init: Any, names: Mapping[str, str]) -> None:
    """Checks RaSA's fields; `names` says how to call them in messages."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{names['k']} must be a positive int or None, got {k!r}")
    if not isinstance(pattern, str):
        raise ValueError(f"{names['layer_pattern']} must be a regex string, got {pattern!r}")
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{names['layer_pattern']}: invalid regex {pattern!r}: {err}") from None
    if compiled.groups != 1:
        raise ValueError(
            f"{names['layer_pattern']} must have exactly one group (the layer index), "
            f"got {pattern!r} with {compiled.groups} groups"
        )
    if init not in INITS:
        raise ValueError(f"{names['init']} must be one of {INITS}, got {init!r}")


_OBJECT_NAMES = {"k": "RaSA(k=...)", "layer_pattern": "RaSA.layer_pattern", "init": "RaSA.init"}
_LEGACY_NAMES = {
    "k": "LoraConfig.rasa_k",
    "layer_pattern": "LoraConfig.rasa_layer_pattern",
    "init": "LoraConfig.rasa_init",
}


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


@register_method
@dataclasses.dataclass(frozen=True)
class RaSA(LoRA):
    """RaSA rank sharing (see the module docstring).

    Args:
      k: ranks each layer contributes to its module type's pool (each layer keeps ``r - k``
        private ranks); default ``max(r // 8, 1)`` (the paper's). Must be < r.
      layer_pattern: regex (searched in the path) with one group capturing a layer index;
        layers are grouped by module type, the path with that group removed. A kernel with a
        leading layer axis (``'l...'``) is a group on its own, of the stack's size.
      init: initial diagonal: ``"paper"`` or ``"rslora"`` (ours, not the paper's).

    Example:
      >>> RaSA(k=2).module_of("model/layers/3/self_attn/q_proj")
      ('model/layers/self_attn/q_proj', 3)
    """

    name: ClassVar[str] = "rasa"
    title: ClassVar[str] = "RaSA"
    default: ClassVar[bool] = False
    leaves: ClassVar[Mapping[str, Leaf]] = {
        A: Leaf("a"),
        B: Leaf("b", fast=True),
        DIAG: Leaf("rank", fast=True),
    }
    shared_leaves: ClassVar[Mapping[str, Leaf]] = {A: Leaf("a"), B: Leaf("b", fast=True)}
    shared_key: ClassVar[str | None] = SHARED
    peft_fields: ClassVar[Mapping[str, Any] | None] = None
    legacy_fields: ClassVar[tuple[str, ...]] = (
        "rasa",
        "rasa_k",
        "rasa_layer_pattern",
        "rasa_init",
    )
    legacy_reads: ClassVar[tuple[str, ...]] = ("rasa_module", "rasa_k_for")

    k: int | None = None
    layer_pattern: str = DEFAULT_LAYER_PATTERN
    init: str = "paper"

    def __post_init__(self) -> None:
        _validate(self.k, self.layer_pattern, self.init, _OBJECT_NAMES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "k": self.k,
            "layer_pattern": self.layer_pattern,
            "init": self.init,
        }

    # ------------------------------------------------------------------ old flat fields
    @classmethod
    def from_legacy(cls, values: Mapping[str, Any]) -> tuple[Method, str] | None:
        flag = values.get("rasa", False)
        if not isinstance(flag, bool):
            raise ValueError(f"LoraConfig.rasa must be a bool, got {flag!r}")
        k = values.get("rasa_k")
        pattern = values.get("rasa_layer_pattern", DEFAULT_LAYER_PATTERN)
        init = values.get("rasa_init", "paper")
        if isinstance(k, int) and not isinstance(k, bool) and k >= 1 and not flag:
            raise ValueError(
                f"LoraConfig.rasa_k={k!r} is set but rasa=False; set rasa=True or drop rasa_k"
            )
        _validate(k, pattern, init, _LEGACY_NAMES)
        return (cls(k=k, layer_pattern=pattern, init=init), "rasa") if flag else None

    @classmethod
    def legacy_value(cls, method: Method, field: str) -> Any:
        own = method if isinstance(method, RaSA) else cls()
        values = {
            "rasa": isinstance(method, RaSA),
            "rasa_k": own.k if isinstance(method, RaSA) else None,
            "rasa_layer_pattern": own.layer_pattern,
            "rasa_init": own.init,
            "rasa_module": own.module_of,
        }
        if field == "rasa_k_for":
            return lambda path, config=None: own.k_for(path, config)
        return values[field]

    # ------------------------------------------------------------------ configuration
    def check(self, config: LoraConfig) -> None:
        if config.rank < 2:
            raise ValueError(
                f"LoraConfig.rank must be >= 2 with rasa=True (k >= 1 shared and >= 1 private "
                f"rank per layer), got {config.rank!r}"
            )
        if self.k is not None and self.k >= config.rank:
            raise ValueError(
                f"LoraConfig.rasa_k must be smaller than rank ({config.rank}): each layer keeps "
                f"rank - rasa_k private ranks; got rasa_k={self.k!r}"
            )
        if config.init.modifies_base:
            raise ValueError(
                f"LoraConfig.init={config.init.spec!r} cannot be combined with rasa=True (RaSA "
                "draws its factors at random)"
            )

    def k_for(self, path: str, config: LoraConfig) -> int:
        """Shared ranks per layer at `path`: ``k``, or ``max(r // 8, 1)``."""
        return self.k if self.k is not None else max(config.rank_for(path) // 8, 1)

    def module_of(self, path: str) -> tuple[str, int | None]:
        """The module type of `path` and its layer index (None if the path has none).

        Example:
          >>> RaSA().module_of("model/layers/self_attn/q_proj")
          ('model/layers/self_attn/q_proj', None)
        """
        m = re.search(self.layer_pattern, path)
        if m is None or m.group(1) is None:
            return path, None
        try:
            index = int(m.group(1))
        except ValueError:
            raise ValueError(
                f"RaSA.layer_pattern {self.layer_pattern!r} captured {m.group(1)!r} in {path!r}, "
                "which is not a layer index (an int)"
            ) from None
        module = path[: m.start(1)] + path[m.end(1) :]
        return re.sub("/+", "/", module).strip("/"), index

    # ------------------------------------------------------------------ groups
    def groups(self, sites: list[Site], config: LoraConfig) -> list[RasaGroup]:
        """Groups the sites by module type (see the module docstring).

        Raises:
          ValueError: if a path has neither a layer index nor a leading layer axis, if members
            of a group differ in shape or rank, or if ``k`` is not below a group's rank.
        """
        members: dict[str, list[tuple[int, Site]]] = {}
        stacked: dict[str, int] = {}
        orphans = []
        for site in sites:
            lay = site.layout
            module, index = self.module_of(site.path)
            if index is None:
                if not lay.layer_idx:
                    orphans.append(site.path)
                    continue
                if lay.layer_idx != (0,):
                    raise ValueError(
                        f"RaSA at {site.path!r}: kernel axes {lay.axes!r} must have exactly one "
                        "layer axis, the leading one (scanned layers, 'l...')"
                    )
                stacked[module] = lay.layer_shape[0]
                members.setdefault(module, []).append((0, site))
            else:
                if lay.layer_idx:
                    raise ValueError(
                        f"RaSA at {site.path!r}: the path has a layer index ({index}) and its "
                        f"kernel has layer axes ({lay.axes!r}); only one of the two can define "
                        "the layers"
                    )
                members.setdefault(module, []).append((index, site))
        if orphans:
            shown = ", ".join(repr(p) for p in orphans[:10])
            raise ValueError(
                f"RaSA: {len(orphans)} target path(s) have no layer index matching "
                f"LoraConfig.rasa_layer_pattern={self.layer_pattern!r} and no leading layer "
                f"axis, so they belong to no group of layers: {shown}. Set rasa_layer_pattern, or "
                "exclude them (LoraConfig.exclude)"
            )
        out = []
        for module, entries in members.items():
            if module in stacked and len(entries) > 1:
                raise ValueError(
                    f"RaSA module type {module!r} is both a scanned stack and a set of unscanned "
                    f"layers: {sorted(s.path for _, s in entries)}"
                )
            entries.sort(key=lambda e: e[0])
            indices = [i for i, _ in entries]
            if len(set(indices)) != len(indices):
                raise ValueError(
                    f"RaSA module type {module!r}: layer indices repeat in "
                    f"{[s.path for _, s in entries]}"
                )
            first = entries[0][1]
            k = self.k_for(first.path, config)
            for _, s in entries[1:]:
                if (s.layout.d_in, s.layout.d_out, s.rank, self.k_for(s.path, config)) != (
                    first.layout.d_in,
                    first.layout.d_out,
                    first.rank,
                    k,
                ):
                    raise ValueError(
                        f"RaSA module type {module!r}: {s.path!r} (d_in={s.layout.d_in}, "
                        f"d_out={s.layout.d_out}, rank={s.rank}) differs from {first.path!r} "
                        f"(d_in={first.layout.d_in}, d_out={first.layout.d_out}, "
                        f"rank={first.rank}); the layers of one module type must have the same "
                        "shapes and rank"
                    )
            if k >= first.rank:
                raise ValueError(
                    f"RaSA at {first.path!r}: rasa_k={k} must be smaller than the rank there "
                    f"({first.rank})"
                )
            out.append(
                RasaGroup(
                    module=module,
                    paths=tuple(s.path for _, s in entries),
                    num_layers=stacked.get(module, len(entries)),
                    rank=first.rank,
                    k=k,
                    d_in=first.layout.d_in,
                    d_out=first.layout.d_out,
                    scanned=module in stacked,
                )
            )
        return out

    def diagonal_init(self, alpha: float, group: RasaGroup) -> tuple[float, float]:
        """Initial (private, shared) entries of ``lora_d`` (see the module docstring).

        Example:
          >>> g = RasaGroup("q", ("0/q",), num_layers=4, rank=8, k=1, d_in=8, d_out=8,
          ...               scanned=False)
          >>> RaSA().diagonal_init(14.0, g)
          (1.0, 1.75)
        """
        if self.init == "rslora":
            return alpha / (2 * math.sqrt(group.private)), alpha / (2 * math.sqrt(group.pool))
        return alpha / (2 * group.private), alpha / (2 * group.pool)

    # ------------------------------------------------------------------ adapters
    def init_adapters(
        self, params: PyTree, sites: list[Site], config: LoraConfig, key: PRNGKey
    ) -> PyTree:
        by_path = {s.path: s for s in sites}
        plan = []
        for group in self.groups(sites, config):
            members = []
            for path in group.paths:
                s = by_path[path]
                members.append(
                    (path, s.keys, s.layout.layer_shape, *self.diagonal_init(s.alpha, group))
                )
            plan.append((group, tuple(members)))
        return _draw(tuple(plan), config.init, config.dtype, key)

    def check_leaves(
        self, leaves: Mapping[str, Any], site: Site, config: LoraConfig, shared: Any
    ) -> None:
        check_leaf_names(self, leaves, site.path)
        module, _ = self.module_of(site.path)
        a_s, b_s = self.pool(shared, module, site.path)
        lay = site.layout
        r, k = site.rank, self.k_for(site.path, config)
        a, b, d = leaves[A], leaves[B], leaves[DIAG]
        width = a_s.shape[-1] if a_s.ndim == 2 else -1
        lead = lay.layer_shape
        expected = {
            A: (*lead, lay.d_in, r - k),
            B: (*lead, r - k, lay.d_out),
            DIAG: (*lead, r - k + width),
            f"{SHARED}/{module}/{A}": (lay.d_in, width),
            f"{SHARED}/{module}/{B}": (width, lay.d_out),
        }
        found = {
            A: tuple(a.shape),
            B: tuple(b.shape),
            DIAG: tuple(d.shape),
            f"{SHARED}/{module}/{A}": tuple(a_s.shape),
            f"{SHARED}/{module}/{B}": tuple(b_s.shape),
        }
        bad = [n for n in expected if expected[n] != found[n]]
        if bad or width < k or width % k:
            raise ValueError(
                f"RaSA adapters at {site.path!r} (kernel {lay.shape}, axes {lay.axes!r}, rank "
                f"{r}, k {k}) do not fit: found {found}, expected {expected} with a pool width "
                "that is a multiple of k"
            )
        if lead and width != lead[0] * k:
            raise ValueError(
                f"RaSA adapters at {site.path!r}: a stack of {lead[0]} layers needs a pool of "
                f"{lead[0]} * {k} = {lead[0] * k} ranks, found {width}"
            )

    @staticmethod
    def pool(shared: Any, module: str, path: str) -> tuple[Any, Any]:
        """(A_S, B_S) of `module` from the params' top-level entries.

        Raises:
          ValueError: if the pool is missing.
        """
        node = (shared or {}).get(SHARED) if isinstance(shared, Mapping) else None
        for k in module.split("/"):
            if not isinstance(node, Mapping) or k not in node:
                raise ValueError(
                    f"RaSA adapters at {path!r} need their shared pool at "
                    f"params[{SHARED!r}] / {module!r}, which is missing; keep the "
                    f"{SHARED!r} entry of the tree (it is part of the adapters)"
                )
            node = node[k]
        if not isinstance(node, Mapping) or A not in node or B not in node:
            raise ValueError(f"RaSA pool {SHARED}/{module} must hold {A!r} and {B!r}")
        return node[A], node[B]

    # ------------------------------------------------------------------ forward and merge
    def pair(
        self, leaves: Mapping[str, Any], path: str, config: LoraConfig, shared: Any
    ) -> tuple[jax.Array, jax.Array, float]:
        """``([A_i | A_S], diag(d_i) @ [B_i ; B_S])`` with scale 1; works on whole stacks and on
        the per-layer slices ``nn.scan`` hands a module (the pool is broadcast)."""
        module, _ = self.module_of(path)
        a_s, b_s = self.pool(shared, module, path)
        a, b, d = leaves[A], leaves[B], leaves[DIAG]
        lead = a.shape[:-2]
        a_s = jnp.broadcast_to(a_s.astype(a.dtype), (*lead, *a_s.shape))
        b_s = jnp.broadcast_to(b_s.astype(b.dtype), (*lead, *b_s.shape))
        a_cat = jnp.concatenate([a, a_s], axis=-1)
        b_cat = jnp.concatenate([b, b_s], axis=-2) * d.astype(b.dtype)[..., :, None]
        return a_cat, b_cat, 1.0

    # ------------------------------------------------------------------ sharding
    def shared_specs(
        self, shared: PyTree, members: Mapping[str, tuple[Any, Any]], config: LoraConfig
    ) -> PyTree:
        pools: dict[str, tuple[Any, Any]] = {}
        for path, specs in members.items():
            pools.setdefault(self.module_of(path)[0], specs)

        def walk(tree: Any, prefix: tuple) -> Any:
            out: dict[Any, Any] = {}
            module = "/".join(str(k) for k in prefix)
            for key, val in tree.items():
                if key in (A, B) and not isinstance(val, Mapping):
                    if module not in pools:
                        raise ValueError(
                            f"no RaSA layer uses the pool {SHARED}/{module}: cannot derive its "
                            "sharding"
                        )
                    in_spec, out_spec = pools[module]
                    out[key] = (
                        PartitionSpec(in_spec, None) if key == A else PartitionSpec(None, out_spec)
                    )
                elif isinstance(val, Mapping):
                    out[key] = walk(val, (*prefix, key))
                else:
                    raise ValueError(f"no sharding rule for {SHARED}/{module}/{key}")
            return out

        return walk(shared, ())


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _draw(plan: tuple, init: Any, dtype: Any, key: PRNGKey) -> dict[str, Any]:
    """All RaSA entries in one compiled program: A_i from the layer's path, A_S from
    ``"lora_shared/<module type>"``; B_i, B_S zero; the diagonal from `RaSA.diagonal_init`."""
    out: dict[str, Any] = {}
    for group, members in plan:
        for path, keys, lead, priv, shared in members:
            a_shape = (*lead, group.d_in, group.private)
            set_in(out, (*keys, A), init.draw_a(path_key(key, path), a_shape, group.d_in, dtype))
            set_in(out, (*keys, B), jnp.zeros((*lead, group.private, group.d_out), dtype))
            d = jnp.concatenate(
                [
                    jnp.full((*lead, group.private), priv, jnp.float32),
                    jnp.full((*lead, group.pool), shared, jnp.float32),
                ],
                axis=-1,
            )
            set_in(out, (*keys, DIAG), d.astype(dtype))
        pool_keys = (SHARED, *group.module.split("/"))
        pool_key = path_key(key, f"{SHARED}/{group.module}")
        set_in(
            out, (*pool_keys, A), init.draw_a(pool_key, (group.d_in, group.pool), group.d_in, dtype)
        )
        set_in(out, (*pool_keys, B), jnp.zeros((group.pool, group.d_out), dtype))
    return out


__all__ = ["DEFAULT_LAYER_PATTERN", "DIAG", "SHARED", "RaSA", "RasaGroup"]
