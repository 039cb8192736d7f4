"""PEFT's format for what LoRA alone cannot train (`rslora_jax.core.extras`), both ways.

Keys of ``adapter_model.safetensors`` (PEFT 0.21, adapter name stripped, after the
``base_model.model.`` prefix), and ``adapter_config.json`` fields:

==========================  =================================================  ========================
ours                        PEFT key                                           config field
==========================  =================================================  ========================
``lora_full`` (a module)    ``{module}.{param}``: ``lm_head.weight``,          ``modules_to_save``
                            ``model.norm.weight`` (PyTorch layouts)            (``ensure_weight_tying``
                                                                               for a tied embedding)
``lora_full`` (a bias)      ``{module}.base_layer.bias`` (a LoRA layer),       ``bias``
                            ``{module}.bias`` (another)
``lora_bias``               ``{module}.lora_B.bias``                           ``lora_bias``
``lora_tokens``             ``{table}.token_adapter.trainable_tokens_delta``   ``trainable_token_
                            ``(n, D)``: the rows' values (PEFT's "delta")      indices``
``lora_embedding_a`` / _b   ``{table}.lora_embedding_A`` ``(r, V)`` = A.T,     ``target_modules``
                            ``{table}.lora_embedding_B`` ``(D, r)`` = B.T
==========================  =================================================  ========================

PEFT also writes whole embedding tables when an embedding is targeted or the vocabulary was
resized (``save_embedding_layers``: ``{table}.base_layer.weight``, ``{table}.weight``,
``lm_head.weight``) and loads them into the base model; `import_extras` ignores them when they
equal the base's and otherwise puts them into the returned base, as PEFT does (with a
`PeftFormatWarning`).

Tied embeddings: a trained copy of the embedding (``modules_to_save``) is used by the tied output
layer too (our tied models read one table), which is PEFT's ``ensure_weight_tying=True``: it is
written so, and an adapter without it (PEFT then trains the embedding's copy apart from the
output layer, which a tied model cannot compute) is refused. Token rows of a tied table are
those of the output layer too, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rslora_jax._types import Params
from rslora_jax.core import extras as ex
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.tree import has_shape, is_adapter_key, join_path, set_in, split
from rslora_jax.hf._peft_rules import PeftFormatWarning, last, pattern_value, peft_selects
from rslora_jax.hf.checkpoint import _hf_tensor_name
from rslora_jax.hf.peft._format import PEFT_PREFIX
from rslora_jax.models.families import ModelFamily

DELTA = "token_adapter.trainable_tokens_delta"
EMB_A = "lora_embedding_A"
EMB_B = "lora_embedding_B"
LORA_B_BIAS = "lora_B.bias"


def _get(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _leaves(tree: Mapping, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    out = []
    for key, val in tree.items():
        if is_adapter_key(key):
            continue
        if isinstance(val, Mapping):
            out.extend(_leaves(val, (*prefix, key)))
        elif has_shape(val):
            out.append(((*prefix, key), val))
    return out


def hf_modules(fam: ModelFamily, params: Params, scanned: bool) -> dict[str, tuple[tuple, Any]]:
    """Every module (dict) of `params` holding parameters, by HF name: ``(our keys, layer)``."""
    out: dict[str, tuple[tuple, Any]] = {}
    for keys, holder in ex.modules(params):
        if not keys or tuple(map(str, keys)) == fam.layers_path or not _leaves(holder):
            continue
        path = join_path(keys)
        if fam.is_stacked(tuple(map(str, keys)), scanned):
            n = int(_leaves(holder)[0][1].shape[0])
            for i in range(n):
                out[fam.hf_module_name(path, i)] = (tuple(keys), i)
        else:
            out[fam.hf_module_name(path, None)] = (tuple(keys), None)
    return out


def _names(fam: ModelFamily, keys: tuple, scanned: bool, leaf: Any) -> list[tuple[str, Any]]:
    path = join_path(keys)
    if fam.is_stacked(tuple(map(str, keys)), scanned):
        return [(fam.hf_module_name(path, i), i) for i in range(int(leaf.shape[0]))]
    return [(fam.hf_module_name(path, None), None)]


def _layer(x: np.ndarray, i: Any) -> np.ndarray:
    return x if i is None else x[i]


def _np(x: Any, dtype: Any) -> np.ndarray:
    arr = np.asarray(jax.device_get(x))
    return arr if dtype is None else arr.astype(dtype)


def _selector(names: set[str], universe: Sequence[str]) -> list[str]:
    """PEFT names (``key.endswith(name)``) that select exactly `names` among `universe`: the
    last components where that is exact, else the full names."""
    components = sorted({last(n, ".") for n in names})
    if {u for u in universe if any(u.endswith(c) for c in components)} == names:
        return components
    return sorted(names)


@dataclasses.dataclass
class Exported:
    """What `export_extras` adds to a PEFT adapter."""

    tensors: dict[str, np.ndarray]
    fields: dict[str, Any]
    embeddings: dict[str, tuple[int, float]]  # HF name -> (rank, alpha) of adapted tables


def _present(params: Params) -> set[tuple[str, str]]:
    return {
        (join_path(keys), key)
        for keys, holder in ex.modules(params)
        for key in holder
        if key in ex.KEYS
    }


def export_extras(
    params: Params,
    lora_config: LoraConfig,
    fam: ModelFamily,
    model_cfg: Any,
    scanned: bool,
    out_dtype: Any,
    where: str,
) -> Exported:
    """The extras of `params` as PEFT tensors and adapter_config.json fields.

    Raises:
      ValueError: extras in `params` that the config does not ask for, or the reverse; a
        trained copy that lacks some of its module's parameters; token rows of a stacked table.
    """
    _, base = split(params)
    pl = ex.plan(base, lora_config)
    want: set[tuple[str, str]] = set()
    want |= {(m.path, ex.FULL) for m in (*pl.saved, *pl.biases)}
    want |= {(t.path, ex.TOKENS) for t in pl.tokens}
    want |= {(e.path, k) for e in pl.embeddings for k in (ex.EMBEDDING_A, ex.EMBEDDING_B)}
    want |= {(s.path, ex.BIAS) for s in pl.sites} if pl.lora_bias else set()
    have = _present(params)
    if have != want:
        raise ValueError(
            f"{where}: the params' extras do not match the config (modules_to_save="
            f"{list(lora_config.modules_to_save)}, trainable_token_indices="
            f"{lora_config.trainable_token_indices}, bias={lora_config.bias!r}, lora_bias="
            f"{lora_config.lora_bias}, embedding targets): missing {sorted(want - have)[:6]}, "
            f"unexpected {sorted(have - want)[:6]}"
        )
    tensors: dict[str, np.ndarray] = {}
    fields: dict[str, Any] = {
        "modules_to_save": None,
        "bias": lora_config.bias,
        "lora_bias": lora_config.lora_bias,
        "trainable_token_indices": None,
        "ensure_weight_tying": False,
    }
    universe = list(hf_modules(fam, base, scanned))

    saved_names: set[str] = set()
    for m in pl.saved:
        holder = _get(params, m.keys)
        copy = holder[ex.FULL]
        module_leaves = {rel for rel, _ in _leaves(_get(base, m.keys))}
        copied = {rel for rel, _ in _leaves(copy)}
        if copied != module_leaves:
            raise ValueError(
                f"{where}: the trained copy of {m.path!r} holds {sorted(copied)}, the module "
                f"{sorted(module_leaves)}; PEFT saves whole modules"
            )
        for rel, leaf in _leaves(copy):
            keys = tuple(map(str, (*m.keys, *rel)))
            arr = _np(leaf, out_dtype)
            for hf_name, i in _names(fam, keys[:-1], scanned, leaf):
                name, transposed = _hf_tensor_name(fam, keys, i)
                x = _layer(arr, i)
                tensors[PEFT_PREFIX + name] = np.ascontiguousarray(x.T if transposed else x)
                saved_names.add(hf_name)
    if saved_names:
        emb = fam.embedding_name
        if model_cfg.tie_word_embeddings and emb in saved_names:
            # Our tied model reads the trained table in its output layer too: PEFT's
            # ensure_weight_tying, which also loads the output layer's copy from the file.
            fields["ensure_weight_tying"] = True
            tensors[f"{PEFT_PREFIX}{fam.output_name}.weight"] = tensors[
                f"{PEFT_PREFIX}{emb}.weight"
            ]
        fields["modules_to_save"] = _selector(saved_names, universe)

    site_paths = {s.path for s in pl.sites}
    for m in pl.biases:
        leaf = _get(params, m.keys)[ex.FULL][ex.BIAS_LEAF]
        arr = _np(leaf, out_dtype)
        suffix = "base_layer.bias" if m.path in site_paths else "bias"
        for hf_name, i in _names(fam, tuple(map(str, m.keys)), scanned, leaf):
            tensors[f"{PEFT_PREFIX}{hf_name}.{suffix}"] = np.ascontiguousarray(_layer(arr, i))
    if pl.lora_bias:
        for s in pl.sites:
            leaf = _get(params, s.keys)[ex.BIAS]
            arr = _np(leaf, out_dtype)
            for hf_name, i in _names(fam, tuple(map(str, s.keys)), scanned, leaf):
                tensors[f"{PEFT_PREFIX}{hf_name}.{LORA_B_BIAS}"] = np.ascontiguousarray(
                    _layer(arr, i)
                )

    token_fields: dict[str, list[int]] = {}
    for t in pl.tokens:
        if fam.is_stacked(tuple(map(str, t.keys)), scanned):
            raise ValueError(f"{where}: token rows of the stacked table {t.path!r}")
        hf_name = fam.hf_module_name(t.path, None)
        rows = _np(_get(params, t.keys)[ex.TOKENS][t.leaf], out_dtype)
        tensors[f"{PEFT_PREFIX}{hf_name}.{DELTA}"] = np.ascontiguousarray(
            np.moveaxis(rows, t.axis, 0)
        )
        key = _selector({hf_name}, universe)[0]  # PEFT selects it by endswith too
        token_fields[key] = list(t.ids)
    spec = lora_config.trainable_token_indices
    if spec:
        fields["trainable_token_indices"] = list(spec) if isinstance(spec[0], int) else token_fields

    embeddings: dict[str, tuple[int, float]] = {}
    for e in pl.embeddings:
        hf_name = fam.hf_module_name(e.path, None)
        holder = _get(params, e.keys)
        a = _np(holder[ex.EMBEDDING_A], out_dtype)
        b = _np(holder[ex.EMBEDDING_B], out_dtype)
        if a.shape != (e.vocab, e.rank) or b.shape != (e.rank, e.dim):
            raise ValueError(
                f"{where}: embedding adapter at {e.path!r}: {a.shape} and {b.shape}, expected "
                f"{(e.vocab, e.rank)} and {(e.rank, e.dim)}"
            )
        tensors[f"{PEFT_PREFIX}{hf_name}.{EMB_A}"] = np.ascontiguousarray(a.T)
        tensors[f"{PEFT_PREFIX}{hf_name}.{EMB_B}"] = np.ascontiguousarray(b.T)
        embeddings[hf_name] = (e.rank, lora_config.alpha_for(e.path))
    return Exported(tensors, fields, embeddings)


def with_embeddings(linear: list[str] | str, adapted: set[str], embeddings: Sequence[str]):
    """PEFT's ``target_modules`` for the adapted Linear modules `adapted` (already written as
    `linear`) and the adapted embedding tables."""
    if not embeddings:
        return linear
    names = sorted({last(n, ".") for n in embeddings})
    if isinstance(linear, list):
        candidate = sorted({*linear, *names})
        meta = {"target_modules": candidate}
        chosen = {n for n in (*adapted, *embeddings) if peft_selects(meta, n, [])}
        if chosen == {*adapted, *embeddings}:
            return candidate
        linear = "(?:" + "|".join(re.escape(n) for n in sorted(adapted)) + ")"
    emb = "|".join(re.escape(n) for n in sorted(embeddings))
    return f"(?:{linear}|{emb})" if adapted else f"(?:{emb})"


# ============================================================================ import
@dataclasses.dataclass
class Imported:
    """What `import_extras` read: the extras' adapter tree, the LoraConfig fields, the keys it
    used, embedding tables PEFT adapts (our path -> HF name), base leaves PEFT's file replaces
    (our keys -> array), and the tensors it lacks (with ``strict=False``)."""

    adapters: dict[str, Any]
    fields: dict[str, Any]
    used: set[str]
    embeddings: dict[str, str]
    base_updates: dict[tuple, np.ndarray]
    missing: list[str]


def _check(key: str, shape: tuple, want: tuple, what: str) -> None:
    if tuple(shape) != tuple(want):
        raise ValueError(f"import_peft: tensor {key!r} ({what}) has shape {shape}, expected {want}")


def import_extras(
    meta: Mapping[str, Any],
    reader: Any,
    strip: int,
    fam: ModelFamily,
    model_cfg: Any,
    params: Params,
    scanned: bool,
    targeted: Sequence[str],
    all_linear: Sequence[str],
    dtype: Any,
    strict: bool,
    where: str,
) -> Imported:
    """Reads the extras of a PEFT adapter (see the module docstring).

    Args:
      meta: the adapter_config.json.
      reader: the `rslora_jax.hf.io.TensorReader` of its weights.
      strip: the length of the key prefix (``base_model.model.``) to drop.
      fam: the model family; model_cfg: our model config; params: our base tree.
      scanned: whether `params` are scanned.
      targeted: the HF names of the Linear modules PEFT adapts.
      all_linear: what ``"all-linear"`` expands to.
      dtype: the adapters' dtype.
      strict: refuse missing tensors (else leave those extras at their initial values).
      where: for messages.

    Raises:
      ValueError: options a model of ours cannot compute (a trained copy of a tied output
        layer, or of a tied embedding without ``ensure_weight_tying``; partial copies of stacked
        modules), shapes that do not fit, missing tensors (strict).
    """
    keys = {k[strip:]: k for k in reader.shape}
    np_dtype = np.dtype(dtype)
    modules = hf_modules(fam, params, scanned)
    adapters: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    used: set[str] = set()
    tied = bool(model_cfg.tie_word_embeddings)
    emb_name, out_name = fam.embedding_name, fam.output_name
    missing: list[str] = []

    def read(body: str) -> np.ndarray | None:
        if body not in keys:
            missing.append(PEFT_PREFIX + body)
            return None
        used.add(keys[body])
        return reader.get(keys[body])

    # ---------------------------------------------------------------- modules_to_save
    names = meta.get("modules_to_save") or []
    if isinstance(names, str):
        names = [names]
    matched = sorted(h for h in modules if any(h.endswith(n) for n in names))
    ensure_tying = bool(meta.get("ensure_weight_tying", False))
    if tied and any(out_name.endswith(n) for n in names):
        if not (ensure_tying and emb_name in matched):
            raise ValueError(
                f"{where}: modules_to_save={names!r} trains a copy of {out_name!r}, which this "
                "model ties to its embedding: the copy would untie them, which a tied model "
                "cannot compute"
            )
        used |= {keys[b] for b in (f"{out_name}.weight",) if b in keys}
    if tied and emb_name in matched and ensure_tying and f"{out_name}.weight" in keys:
        used.add(keys[f"{out_name}.weight"])  # the tied output layer's copy: the embedding's
    if tied and emb_name in matched and not ensure_tying:
        raise ValueError(
            f"{where}: modules_to_save={names!r} trains a copy of the tied embedding "
            f"{emb_name!r} without ensure_weight_tying: PEFT then reads the copy in the lookup "
            "only and keeps the original in the output layer, which a tied model cannot compute"
        )
    by_path: dict[tuple, list[Any]] = {}
    for h in matched:
        k, layer = modules[h]
        by_path.setdefault(k, []).append(layer)
    saved_paths = []
    for k, layers in by_path.items():
        path = join_path(k)
        holder = _get(params, k)
        leaves = _leaves(holder)
        stacked = fam.is_stacked(tuple(map(str, k)), scanned)
        if stacked and len(layers) != int(leaves[0][1].shape[0]):
            raise ValueError(
                f"{where}: modules_to_save={names!r} selects only some layers of the stacked "
                f"module {path!r}; load the base with scan_layers=False"
            )
        copy: dict[str, Any] = {}
        for rel, leaf in leaves:
            full = tuple(map(str, (*k, *rel)))
            per_layer = []
            for i in range(int(leaf.shape[0])) if stacked else [None]:
                name, transposed = _hf_tensor_name(fam, full, i)
                x = read(name)
                if x is None:
                    continue
                want = tuple(leaf.shape[1:] if stacked else leaf.shape)
                x = x.T if transposed else x
                _check(PEFT_PREFIX + name, x.shape, want, f"the copy of {path}/{'/'.join(rel)}")
                per_layer.append(x)
            if len(per_layer) == (int(leaf.shape[0]) if stacked else 1):
                arr = np.stack(per_layer) if stacked else per_layer[0]
                set_in(copy, rel, arr.astype(np_dtype))
        if copy:
            set_in(adapters, (*k, ex.FULL), copy)
        saved_paths.append(path)
    if names:
        fields["modules_to_save"] = sorted(saved_paths)

    # ---------------------------------------------------------------- bias, lora_bias
    bias = meta.get("bias", "none")
    fields["bias"] = bias
    if bias in ("all", "lora_only"):
        for body in sorted(keys):
            if not body.endswith(".bias") or body.endswith("." + LORA_B_BIAS):
                continue
            module = body[: -len(".bias")].removesuffix(".base_layer")
            if module not in modules or any(_inside(module, s) for s in matched):
                continue
            k, layer = modules[module]
            holder = _get(params, k)
            if ex.BIAS_LEAF not in holder:
                raise ValueError(f"{where}: {keys[body]!r}: the module {module!r} has no bias")
            x = read(body)
            node = adapters
            for part in k:
                node = node.setdefault(part, {})
            per = node.setdefault(ex.FULL, {}).setdefault("__layers__", {})
            per[layer] = x
        _stack_layers(adapters, params, np_dtype, where)
    lora_bias = bool(meta.get("lora_bias", False))
    fields["lora_bias"] = lora_bias
    if lora_bias:
        groups: dict[tuple, dict[Any, np.ndarray]] = {}
        for name in targeted:
            x = read(f"{name}.{LORA_B_BIAS}")
            if x is None:
                continue
            k, layer = modules[name]
            groups.setdefault(k, {})[layer] = x
        for k, per in groups.items():
            if None in per:
                arr = per[None]
            else:
                n = int(_get(params, k)["kernel"].shape[0])
                if sorted(per) != list(range(n)):
                    continue  # some layers lack it: reported as missing tensors
                arr = np.stack([per[i] for i in range(n)])
            set_in(adapters, (*k, ex.BIAS), arr.astype(np_dtype))

    # ---------------------------------------------------------------- trainable tokens
    spec = meta.get("trainable_token_indices")
    if spec:
        tables = {emb_name} | ({out_name} if not tied and out_name in modules else set())
        if isinstance(spec, list):
            targets = {emb_name: spec}
            fields["trainable_token_indices"] = list(spec)
        else:
            targets = {}
            for name, ids in spec.items():
                hits = [t for t in sorted(tables | {out_name}) if t.endswith(name)]
                if not hits:
                    raise ValueError(
                        f"{where}: trainable_token_indices names {name!r}, which selects no "
                        f"embedding table or output layer of the model ({sorted(tables)})"
                    )
                for t in hits:
                    targets[t] = ids
            if tied and out_name in targets:
                if emb_name in targets and list(targets[out_name]) != list(targets[emb_name]):
                    raise ValueError(
                        f"{where}: trainable_token_indices gives the tied {out_name!r} other "
                        f"token ids than {emb_name!r}; a tied model has one table"
                    )
                ids = targets.pop(out_name)
                targets.setdefault(emb_name, ids)
            fields["trainable_token_indices"] = {
                join_path(modules[t][0]): list(ids) for t, ids in targets.items()
            }
        for t, ids in targets.items():
            x = read(f"{t}.{DELTA}")
            if x is None:
                continue
            k, _ = modules[t]
            holder = _get(params, k)
            leaf = ex.EMBEDDING if ex.EMBEDDING in holder else "kernel"
            table = holder[leaf]
            dim = int(table.shape[1] if leaf == ex.EMBEDDING else table.shape[0])
            _check(keys[f"{t}.{DELTA}"], x.shape, (len(ids), dim), "trainable token rows")
            rows = x if leaf == ex.EMBEDDING else x.T
            set_in(adapters, (*k, ex.TOKENS, leaf), rows.astype(np_dtype))

    # ---------------------------------------------------------------- embedding LoRA
    embeddings: dict[str, str] = {}
    r_default = int(meta["r"])
    rank_pattern = meta.get("rank_pattern") or {}
    if peft_selects(meta, emb_name, all_linear):
        k, _ = modules[emb_name]
        table = _get(params, k)[ex.EMBEDDING]
        vocab, dim = (int(n) for n in table.shape)
        r = int(pattern_value(rank_pattern, emb_name, r_default))
        a = read(f"{emb_name}.{EMB_A}")
        b = read(f"{emb_name}.{EMB_B}")
        if a is not None and b is not None:
            _check(keys[f"{emb_name}.{EMB_A}"], a.shape, (r, vocab), "lora_embedding_A (r, vocab)")
            _check(keys[f"{emb_name}.{EMB_B}"], b.shape, (dim, r), "lora_embedding_B (dim, r)")
            set_in(adapters, (*k, ex.EMBEDDING_A), a.T.astype(np_dtype))
            set_in(adapters, (*k, ex.EMBEDDING_B), b.T.astype(np_dtype))
            embeddings[join_path(k)] = emb_name

    # ---------------------------------------------------------------- whole tables
    base_updates: dict[tuple, np.ndarray] = {}
    for body in (f"{emb_name}.base_layer.weight", f"{emb_name}.weight", f"{out_name}.weight"):
        if body not in keys or keys[body] in used:
            continue
        used.add(keys[body])
        x = reader.get(keys[body])
        module = body.rsplit(".", 1)[0].removesuffix(".base_layer")
        if module == out_name and tied:
            k, leaf, x_ours = modules[emb_name][0], ex.EMBEDDING, x
        elif module == out_name:
            k, leaf, x_ours = modules[out_name][0], "kernel", x.T
        else:
            k, leaf, x_ours = modules[emb_name][0], ex.EMBEDDING, x
        current = base_updates.get((*k, leaf), _get(params, k)[leaf])
        if tuple(x_ours.shape) != tuple(current.shape):
            raise ValueError(
                f"{where}: {keys[body]!r} has shape {x.shape}, but the base's {join_path(k)} is "
                f"{tuple(current.shape)}: the adapter was trained on a resized vocabulary; "
                "resize the base first (rslora_jax.hf.add_tokens)"
            )
        mine = np.asarray(jax.device_get(current))
        if not np.array_equal(x_ours.astype(mine.dtype), mine):
            warnings.warn(
                f"{where}: the adapter carries its own {body!r} (PEFT's save_embedding_layers), "
                f"which differs from the base's {join_path(k)}/{leaf}; PEFT loads it into the "
                "base model, and so does import_peft (the returned base holds it)",
                PeftFormatWarning,
                stacklevel=3,
            )
            base_updates[(*k, leaf)] = x_ours.astype(mine.dtype)

    if missing and strict:
        raise ValueError(
            f"{where}: missing tensors ({len(missing)}) the adapter config asks for: "
            f"{sorted(missing)[:10]}"
        )
    return Imported(adapters, fields, used, embeddings, base_updates, sorted(missing))


def _inside(name: str, outer: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def _stack_layers(adapters: dict, params: Params, np_dtype: Any, where: str) -> None:
    """Turns the per-layer bias copies collected under ``__layers__`` into stacked leaves."""
    stack: list[tuple[dict, tuple]] = []

    def walk(node: dict, prefix: tuple) -> None:
        for k, v in list(node.items()):
            if k == ex.FULL and isinstance(v, dict) and "__layers__" in v:
                stack.append((node, prefix))
            elif isinstance(v, dict):
                walk(v, (*prefix, k))

    walk(adapters, ())
    for node, prefix in stack:
        per = node[ex.FULL].pop("__layers__")
        base_bias = _get(params, prefix)[ex.BIAS_LEAF]
        if None in per:
            arr = per[None]
        else:
            n = int(base_bias.shape[0])
            if sorted(per) != list(range(n)):
                raise ValueError(
                    f"{where}: biases of only some layers of the stacked module "
                    f"{join_path(prefix)!r}; load the base with scan_layers=False"
                )
            arr = np.stack([per[i] for i in range(n)])
        node[ex.FULL][ex.BIAS_LEAF] = arr.astype(np_dtype)


__all__ = ["Exported", "Imported", "export_extras", "import_extras", "with_embeddings"]
