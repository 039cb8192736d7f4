"""Training what LoRA alone cannot (PEFT's semantics): modules trained in full, token rows,
biases, a bias on B, and LoRA on embedding tables.

The adapter *methods* (`rslora_jax.core.protocol`) are per adapted kernel; these extras are not
methods of a kernel, so they are not in the method protocol. They live in the same parameter
tree as the adapters, as entries whose keys start with ``lora_``, next to what they change, so
`split` / `combine`, the optimizer, checkpoints and shardings treat them as adapter state with no
special case in the tree operations:

==================  ==================================  =====================================
entry               where, shape                        what it does (forward and merge)
==================  ==================================  =====================================
``lora_full``       in a module's dict: a copy of that  ``modules_to_save`` and ``bias``: the
                    module's leaves (or of its bias)    trained copy replaces the base's leaf
``lora_tokens``     in an ``embedding`` (or 2-D         ``trainable_token_indices``: the rows
                    ``kernel``) dict: ``{leaf: rows}``  (kernel: output columns) are written
                    ``(n, D)`` / ``(D, n)``              over the base's at those ids
``lora_embedding_a`` next to ``embedding`` ``(V, r)``   LoRA on the lookup: ``embed(ids) +
``lora_embedding_b`` next to ``embedding`` ``(r, D)``   gamma * A[ids] @ B``; merge ``E +
                                                        gamma * A @ B``
``lora_bias``       next to an adapted kernel           PEFT's ``lora_bias``: ``y + gamma * b``;
                    ``(*l, d_out)``                      merge ``bias + gamma * b``
==================  ==================================  =====================================

``lora_full`` and ``lora_tokens`` are dicts (sub-trees) rather than leaves: a dict under a
``lora_`` key is adapter state to `split`, but does not make its holder an *adapted kernel*
(`rslora_jax.core.tree.is_adapted` counts adapter leaves only), so the method machinery never
mistakes an ``lm_head`` with a trained copy for a LoRA site. The three leaves declare their
roles with `Leaf` (`ROLES`): the embedding factors lie against the table as ``"a"`` / ``"b"``
lie against an ``(in, out)`` kernel (the table is a ``V -> D`` map), the bias on B as an
``"out"`` leaf. Copies and rows take the sharding of the leaves they replace.

Where they are computed: the copies and rows are written over the base leaves before the model
runs (`rslora_jax.ops.extras.substitute`: differentiable, so the gradient reaches exactly the
trained copies and rows, as PEFT's ``index_copy``); the embedding lookup is intercepted in
`rslora_jax.frontends.linen` (any linen ``nn.Embed``, the built-in models' included), and the
bias on B is added where the adapted layer is computed (`rslora_jax.frontends.site`). Merging
folds everything in (`rslora_jax.ops.extras.fold`). The optimizer gives every extra state (and
only them) its moments.

This module holds the names, the roles and `plan`: which parts of a params tree a config
selects, by PEFT's rules, with every check done before any array is read (shapes only, so
abstract trees work).

Example:
  >>> import jax.numpy as jnp
  >>> from rslora_jax.core.config import LoraConfig
  >>> p = {"embed": {"embedding": jnp.ones((10, 4))}, "q": {"kernel": jnp.ones((4, 4))},
  ...      "lm_head": {"kernel": jnp.ones((4, 10))}}
  >>> cfg = LoraConfig(rank=2, targets=["q"], modules_to_save=["lm_head"],
  ...                  trainable_token_indices=[3, 7])
  >>> pl = plan(p, cfg)
  >>> [s.path for s in pl.saved], [(t.path, t.leaf, t.ids) for t in pl.tokens]
  (['lm_head'], [('embed', 'embedding', (3, 7))])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from rslora_jax._types import PyTree
from rslora_jax.core.config import ALL_LINEAR, LoraConfig, matches
from rslora_jax.core.protocol import Leaf, Site
from rslora_jax.core.sites import target_sites
from rslora_jax.core.tree import KERNEL, has_shape, is_adapter_key, join_path

FULL = "lora_full"
TOKENS = "lora_tokens"
EMBEDDING_A = "lora_embedding_a"  # both in rslora_jax.core.tree.LOOKUP_LEAVES: they do not
EMBEDDING_B = "lora_embedding_b"  # make the table an adapted weight of the method machinery
BIAS = "lora_bias"
EMBEDDING = "embedding"
BIAS_LEAF = "bias"

#: The extras' leaves (not the sub-trees) with their roles; the embedding factors as A / B of
#: the table seen as a ``V -> D`` map, the bias on B one entry per output feature.
ROLES: Mapping[str, Leaf] = {
    EMBEDDING_A: Leaf("a", peft="lora_embedding_A"),
    EMBEDDING_B: Leaf("b", peft="lora_embedding_B"),
    BIAS: Leaf("out", fast=True, peft="lora_B.bias"),
}
#: Every key the extras use in a params tree.
KEYS = frozenset({FULL, TOKENS, *ROLES})


def role(name: Any) -> Leaf | None:
    """The `Leaf` role of an extra leaf, or None for other names.

    Example:
      >>> role("lora_bias").fast, role("kernel")
      (True, None)
    """
    return ROLES.get(name) if isinstance(name, str) else None


def is_fast_copy(keys: tuple[Any, ...], leaf: Any) -> bool:
    """Whether LoRA+ speeds up a trained copy at `keys` (PEFT's rule: 1-D parameters, i.e.
    biases and norm scales, also when stacked over layers).

    Example:
      >>> import jax.numpy as jnp
      >>> is_fast_copy(("norm", "lora_full", "scale"), jnp.ones((2, 4)))
      True
    """
    if FULL not in keys:
        return False
    return keys[-1] in (BIAS_LEAF, "scale") or getattr(leaf, "ndim", 2) == 1


def strip(holder: Mapping[str, Any]) -> dict[str, Any]:
    """`holder` without the extras' entries."""
    return {k: v for k, v in holder.items() if k not in KEYS}


# ---------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Module:
    """A dict of the params tree: its path, keys and the leaves below it (``(keys, leaf)``)."""

    path: str
    keys: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """Trainable rows of one table.

    Attributes:
      path: the path of the dict holding the table.
      keys: its keys.
      leaf: ``"embedding"`` (rows on axis 0) or ``"kernel"`` (an output layer: columns).
      axis: the token axis of the leaf.
      ids: the token ids, in the order the stored rows follow.
    """

    path: str
    keys: tuple[Any, ...]
    leaf: str
    axis: int
    ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class EmbeddingSite:
    """An embedding table with LoRA: ``(V, D)``, rank, scale."""

    path: str
    keys: tuple[Any, ...]
    vocab: int
    dim: int
    rank: int
    scale: float


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a config selects in a params tree (see `plan`).

    Attributes:
      sites: the LoRA sites (`rslora_jax.core.sites.target_sites`), possibly empty when only
        embedding tables are targeted.
      saved: modules trained in full (``modules_to_save``).
      biases: dicts whose ``bias`` leaf is trained (``bias="all" | "lora_only"``), outside the
        saved modules.
      tokens: trainable token rows.
      embeddings: embedding tables with LoRA.
      lora_bias: whether every site gets a bias on B.
    """

    sites: tuple[Site, ...]
    saved: tuple[Module, ...]
    biases: tuple[Module, ...]
    tokens: tuple[TokenRows, ...]
    embeddings: tuple[EmbeddingSite, ...]
    lora_bias: bool

    @property
    def any(self) -> bool:
        """Whether there is anything beyond the sites' method leaves."""
        return bool(self.saved or self.biases or self.tokens or self.embeddings or self.lora_bias)


def has_extras(config: LoraConfig) -> bool:
    """Whether `config` asks for anything the extras implement, embedding targets aside.

    Example:
      >>> has_extras(LoraConfig()), has_extras(LoraConfig(bias="all"))
      (False, True)
    """
    return bool(
        config.modules_to_save
        or config.trainable_token_indices
        or config.bias != "none"
        or config.lora_bias
    )


def modules(tree: PyTree, prefix: tuple = ()) -> Iterator[tuple[tuple, Mapping]]:
    """``(keys, dict)`` for every dict of `tree` (the root too), not entering adapter entries."""
    if not isinstance(tree, Mapping):
        return
    yield prefix, tree
    for key, val in tree.items():
        if isinstance(val, Mapping) and not is_adapter_key(key):
            yield from modules(val, (*prefix, key))


def _leaves(tree: Mapping, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for key, val in tree.items():
        if is_adapter_key(key):
            continue
        if isinstance(val, Mapping):
            yield from _leaves(val, (*prefix, key))
        elif has_shape(val):
            yield (*prefix, key), val


def tables(params: PyTree) -> list[tuple[str, tuple, Mapping]]:
    """``(path, keys, dict)`` of every dict holding a 2-D ``embedding`` leaf."""
    return [
        (join_path(k), k, d)
        for k, d in modules(params)
        if has_shape(d.get(EMBEDDING)) and len(d[EMBEDDING].shape) == 2
    ]


def _embedding_selected(config: LoraConfig, path: str, table: Any) -> bool:
    # Tables are adapted when `targets` names them (a list of names, PEFT's rule, or a regex);
    # "all-linear" never selects them (as PEFT), and callables select kernels only.
    spec = config.targets
    if callable(spec) or spec == ALL_LINEAR:
        return False
    if not matches(spec, path, table):
        return False
    return (
        config.exclude is None
        or callable(config.exclude)
        or not matches(config.exclude, path, table)
    )


def _inside(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + "/")


def plan(params: PyTree, config: LoraConfig) -> Plan:
    """What `config` selects in `params`: LoRA sites and every extra, by PEFT's rules.

    Only shapes are read (abstract trees work). ``modules_to_save`` names select the dicts
    whose path ends with them (PEFT: ``key.endswith(name)`` over module names);
    ``trainable_token_indices`` as a list applies to the only embedding table (a tied output
    layer reads the same table), as a dict to the tables each name selects (an ``embedding``
    leaf, or the 2-D ``kernel`` of an output layer, whose output axis holds the tokens);
    ``bias="all"`` selects every ``bias`` leaf, ``"lora_only"`` those of the adapted kernels.
    Embedding tables get LoRA when `targets` names them (a list of names or a regex, not
    ``"all-linear"``).

    Args:
      params: the parameter tree (no adapters yet, or with them: adapter entries are skipped).
      config: the config.

    Returns:
      The `Plan`.

    Raises:
      ValueError: a name that selects nothing (listing candidates), token ids out of range,
        a list of token ids with no or several embedding tables, a selected module inside
        another or holding a LoRA target, trainable tokens and LoRA (or a full copy) on the
        same table, or a rank above a table's dimensions.
    """
    embeddings = []
    for path, keys, holder in tables(params):
        if _embedding_selected(config, path, holder[EMBEDDING]):
            vocab, dim = (int(n) for n in holder[EMBEDDING].shape)
            rank = config.rank_for(path)
            if rank > min(vocab, dim):
                raise ValueError(
                    f"rank {rank} at the embedding table {path!r} ({vocab}, {dim}) exceeds "
                    f"min(vocab, dim) = {min(vocab, dim)}; lower LoraConfig.rank or set a "
                    "rank_pattern for this path"
                )
            if config.init.modifies_base:
                raise ValueError(
                    f"LoraConfig.init={config.init.spec!r} cannot initialise LoRA on the "
                    f"embedding table {path!r} (PEFT neither): target linear layers only"
                )
            if config.method.rescales_columns or config.method.shared_key is not None:
                raise ValueError(
                    f"LoRA on the embedding table {path!r} works with the LoRA method only, not "
                    f"{config.method.title}: remove it from LoraConfig.targets"
                )
            embeddings.append(EmbeddingSite(path, keys, vocab, dim, rank, config.scale_for(path)))
    skip = frozenset(e.path for e in embeddings)
    sites = tuple(target_sites(params, config, allow_empty=bool(embeddings), skip=skip))
    all_modules = [(join_path(k), k, d) for k, d in modules(params)]

    saved: list[Module] = []
    for name in config.modules_to_save:
        found = [
            Module(p, k)
            for p, k, d in all_modules
            if p and p.endswith(name) and any(True for _ in _leaves(d))
        ]
        if not found:
            shown = ", ".join(repr(p) for p, _, _ in all_modules[1:31])
            raise ValueError(
                f"LoraConfig.modules_to_save: {name!r} selects no module (PEFT's rule: a module "
                f"whose path ends with it). Modules: {shown}"
            )
        saved.extend(m for m in found if m not in saved)
    for m in saved:
        outer = next((o for o in saved if o is not m and _inside(m.path, o.path)), None)
        if outer is not None:
            raise ValueError(
                f"LoraConfig.modules_to_save selects {m.path!r} inside {outer.path!r}: name the "
                "outer module or the inner one, not both"
            )
    for m in saved:
        site = next((s for s in sites if _inside(s.path, m.path)), None)
        if site is not None:
            raise ValueError(
                f"{site.path!r} is both a LoRA target and inside the module {m.path!r} of "
                "LoraConfig.modules_to_save: exclude it from the targets (LoraConfig.exclude) "
                "or do not save the module"
            )

    tokens = _token_rows(params, config, all_modules)
    for t in tokens:
        for m in saved:
            if _inside(t.path, m.path):
                raise ValueError(
                    f"{t.path!r} is in LoraConfig.modules_to_save ({m.path!r}) and has trainable "
                    "tokens: train the table in full or some of its rows, not both (as PEFT)"
                )
        for e in embeddings:
            if e.path == t.path:
                raise ValueError(
                    f"the embedding table {t.path!r} has both LoRA (LoraConfig.targets) and "
                    "trainable tokens: choose one"
                )
    for e in embeddings:
        for m in saved:
            if _inside(e.path, m.path):
                raise ValueError(
                    f"the embedding table {e.path!r} is both a LoRA target and in "
                    f"LoraConfig.modules_to_save ({m.path!r}): choose one"
                )

    biases: list[Module] = []
    if config.bias != "none":
        if config.bias == "all":
            candidates = [(p, k) for p, k, d in all_modules if has_shape(d.get(BIAS_LEAF))]
        else:
            candidates = [  # a weight that shares its dict with others has no bias of its own
                (s.path, s.keys)
                for s in sites
                if join_path(s.keys) == s.path and has_shape(_get(params, s.keys).get(BIAS_LEAF))
            ]
        for p, k in candidates:
            if not any(_inside(p, m.path) for m in saved):
                biases.append(Module(p, tuple(k)))
    if config.lora_bias:
        for s in sites:
            if join_path(s.keys) != s.path:
                raise ValueError(
                    f"LoraConfig.lora_bias=True: the weight {s.path!r} shares its dict with other "
                    "weights, so it has no bias of its own to add a bias on B to"
                )
    return Plan(
        sites, tuple(saved), tuple(biases), tuple(tokens), tuple(embeddings), config.lora_bias
    )


def _get(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _token_rows(params: PyTree, config: LoraConfig, all_modules: list) -> list[TokenRows]:
    spec = config.trainable_token_indices
    if not spec:
        return []
    if isinstance(spec[0], int):
        found = tables(params)
        if len(found) != 1:
            names = [p for p, _, _ in found]
            raise ValueError(
                "LoraConfig.trainable_token_indices as a list applies to the model's only "
                f"embedding table, but the params hold {len(found)} ({names}); give "
                "{table name: ids} instead"
            )
        path, keys, holder = found[0]
        return [_rows(path, keys, holder, EMBEDDING, 0, tuple(spec))]
    out = []
    for name, ids in spec:
        hits = []
        for path, keys, holder in all_modules:
            if not path or not path.endswith(name):
                continue
            if has_shape(holder.get(EMBEDDING)) and len(holder[EMBEDDING].shape) == 2:
                hits.append(_rows(path, keys, holder, EMBEDDING, 0, ids))
            elif has_shape(holder.get(KERNEL)) and len(holder[KERNEL].shape) == 2:
                axes = config.axes_for(path, holder[KERNEL].shape)
                hits.append(_rows(path, keys, holder, KERNEL, axes.index("o"), ids))
        if not hits:
            candidates = [p for p, _, d in all_modules if EMBEDDING in d or KERNEL in d]
            raise ValueError(
                f"LoraConfig.trainable_token_indices: {name!r} selects no embedding table or 2-D "
                f"output kernel (PEFT's rule: a module whose path ends with it; a tied output "
                f"layer has no kernel of its own: its rows are the embedding's). Candidates: "
                f"{candidates[:30]}"
            )
        out.extend(hits)
    paths = [t.path for t in out]
    dup = sorted({p for p in paths if paths.count(p) > 1})
    if dup:
        raise ValueError(f"LoraConfig.trainable_token_indices selects {dup} more than once")
    return out


def _rows(path: str, keys: tuple, holder: Mapping, leaf: str, axis: int, ids: tuple) -> TokenRows:
    size = int(holder[leaf].shape[axis])
    bad = [i for i in ids if i >= size]
    if bad:
        raise ValueError(
            f"LoraConfig.trainable_token_indices: token ids {bad} are out of range for "
            f"{path}/{leaf} {tuple(holder[leaf].shape)} ({size} tokens); resize the vocabulary "
            "first (rslora_jax.hf.add_tokens)"
        )
    return TokenRows(path, tuple(keys), leaf, axis, tuple(ids))


__all__ = [
    "BIAS",
    "EMBEDDING_A",
    "EMBEDDING_B",
    "FULL",
    "KEYS",
    "ROLES",
    "TOKENS",
    "EmbeddingSite",
    "Module",
    "Plan",
    "TokenRows",
    "has_extras",
    "is_fast_copy",
    "modules",
    "plan",
    "role",
    "strip",
    "tables",
]
