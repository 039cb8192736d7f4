"""`import_peft`: a PEFT adapter directory into our tree (see `rslora_jax.hf.peft`)."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rslora_jax import _files
from rslora_jax._types import Params
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.tree import (
    combine,
    is_adapter_key,
)
from rslora_jax.hf import _peft_rules as rules
from rslora_jax.hf import io as hf_io
from rslora_jax.hf._peft_rules import PeftFormatWarning
from rslora_jax.hf.peft._format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LAYOUT_KEY,
    PEFT_PREFIX,
    PICKLE_NAMES,
    UNSUPPORTED_SUFFIXES,
    LeafSpec,
    base_modules,
    check_method_options,
    known_specs,
    layout_record,
    leaves_for,
    method_from_peft,
)
from rslora_jax.hf.peft._fused import member_targets, split_adapters
from rslora_jax.models.families import LinearModule, family_of, fuse_params
from rslora_jax.ops.finite import NonFiniteError
from rslora_jax.ops.quantize import is_quantized


# ---------------------------------------------------------------------------- import
def import_peft(
    directory: str | os.PathLike[str],
    params: Params,
    model_config: Any,
    *,
    strict: bool = True,
    expected_base_model: str | None = None,
    dtype: Any = jnp.float32,
) -> tuple[Params, LoraConfig]:
    """Loads a PEFT LoRA/rsLoRA adapter (trained with PEFT on PyTorch) into our params tree.

    Applies PEFT's rules to the adapter's config: which modules are adapted
    (``target_modules``, ``exclude_modules``, ``layers_to_transform``), their rank and alpha
    (``rank_pattern``/``alpha_pattern``, first '.'-bounded suffix match), and the scale
    (``lora_alpha/sqrt(r)`` with ``use_rslora``, else ``lora_alpha/r``). The returned
    `LoraConfig` gives, through ``scale_for(path)``/``rank_for(path)``, the same per-module
    values with patterns over our '/' paths, so
    ``rslora_jax.lora(LlamaForCausalLM(config).apply, lora_config)`` computes PEFT's logits.

    A config without ``use_rslora`` is read as PEFT reads it (``alpha / r``: such files come from
    PEFT versions before rsLoRA), with a `PeftFormatWarning`.

    Checks (each a ValueError naming the key, shapes and what was expected): ``peft_type`` other
    than LORA; options we do not implement (``bias`` other than "none", ``lora_bias``,
    ``fan_in_fan_out``, layer replication, trainable tokens, aLoRA, ... and base-changing inits
    such as PiSSA/OLoRA, which PEFT recomputes on load); adapters on embeddings or on a tied
    ``lm_head``; modules or shapes that do not exist in `params` (a different base model);
    lora_A not (r, in_features) or lora_B not (out_features, r) with r from
    ``rank_pattern``/``r`` (a transposed factor has the right numbers in the wrong order; a
    square one is caught by its rank); missing or unexpected tensors (with ``strict``); a
    ``base_model_name_or_path`` other than `expected_base_model`; a factor holding NaN or Inf
    (or overflowing `dtype`). Only safetensors are read: a pickled ``adapter_model.bin`` is
    refused. Warnings (`PeftFormatWarning`): a field PEFT's LoraConfig does not define (a
    typo such as ``lora_alhpa``); a full-rank adapter (r = in_features or out_features), whose
    square factor looks the same transposed, in a file without the orientation record that
    `export_peft` writes.

    Args:
      directory: the adapter directory (``adapter_config.json``,
        ``adapter_model.safetensors``).
      params: our base params tree (no adapters), scanned or not.
      model_config: our `LlamaConfig` or a transformers config of the base model.
      strict: if False, adapted modules without tensors get no adapter, and tensors we cannot
        use (unknown modules, embeddings, ``modules_to_save``) are ignored, with a
        `PeftFormatWarning` listing them. Shape and rank errors are never relaxed.
      expected_base_model: if given, must equal the adapter's ``base_model_name_or_path``.
      dtype: dtype of the adapter factors (and of the returned config).

    Returns:
      ``(params_with_adapters, lora_config)``. Scanned params get stacked adapters and a
      config with ``kernel_axes="lio"``.

    Raises:
      ValueError: see above; also per-layer ranks or alphas that differ within a scanned
        (stacked) module, or adapters on only some of its layers (load with
        ``scan_layers=False``).

    Example:
      >>> import tempfile, jax
      >>> from rslora_jax import LoraConfig, init
      >>> from rslora_jax.models import LlamaConfig, init_params
      >>> from rslora_jax.hf import export_peft
      >>> cfg = LlamaConfig.tiny(scan_layers=False)
      >>> base = init_params(cfg, jax.random.key(0))
      >>> lcfg = LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
      >>> tmp = tempfile.TemporaryDirectory()
      >>> export_peft(tmp.name, init(base, lcfg, jax.random.key(1)), lcfg, cfg)
      >>> params, got = import_peft(tmp.name, base, cfg)
      >>> got.scale_for("model/layers/0/self_attn/q_proj"), got.targets
      (4.0, ('q_proj', 'v_proj'))
      >>> params["model"]["layers"]["1"]["self_attn"]["v_proj"]["lora_b"].shape
      (4, 16)
      >>> tmp.cleanup()
    """
    where = "import_peft"
    path = Path(directory)
    _files.recover_directory(path)
    config_file = path / ADAPTER_CONFIG_NAME
    weights_file = path / ADAPTER_WEIGHTS_NAME
    if not config_file.is_file():
        raise ValueError(f"{where}: {str(path)!r} has no {ADAPTER_CONFIG_NAME}")
    if not weights_file.is_file():
        pickles = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickles:
            raise ValueError(
                f"{where}: {str(path)!r} holds only pickled weights ({', '.join(pickles)}); "
                "rslora_jax reads safetensors only (pickles can run code on load). Re-save the "
                "adapter with PEFT's save_pretrained(..., safe_serialization=True)"
            )
        raise ValueError(f"{where}: {str(path)!r} has no {ADAPTER_WEIGHTS_NAME}")
    meta = hf_io.read_json(config_file, where)
    rules.check_options(meta, config_file, strict)
    check_method_options(meta, f"{where}: {str(config_file)!r}")
    if expected_base_model is not None and meta.get("base_model_name_or_path") != (
        expected_base_model
    ):
        raise ValueError(
            f"{where}: the adapter in {str(path)!r} was trained on base_model_name_or_path="
            f"{meta.get('base_model_name_or_path')!r}, expected {expected_base_model!r}"
        )
    if "use_rslora" not in meta:
        warnings.warn(
            f"{where}: {str(config_file)!r} has no 'use_rslora' field; reading it as PEFT does, "
            "with use_rslora=False (scale lora_alpha / r)",
            PeftFormatWarning,
            stacklevel=2,
        )
    use_rslora = bool(meta.get("use_rslora", False))
    method = method_from_peft(meta)
    r_default = int(meta["r"])
    alpha_default = float(meta.get("lora_alpha", 8))
    rank_pattern = meta.get("rank_pattern") or {}
    alpha_pattern = meta.get("alpha_pattern") or {}

    if any(is_adapter_key(k) for k in _all_keys(params)):
        raise ValueError(f"{where}: params already hold adapter leaves; pass the base tree")
    fam = family_of(model_config, where)
    scanned = fam.is_scanned(params, where)
    model_cfg = fam.config(model_config, scan_layers=scanned, where=where)
    ours = base_modules(fam, params, model_cfg, where)
    split_family = fam
    if fam.fused:  # PEFT adapts the checkpoint's fused modules (Phi-3's qkv_proj)
        fam = fam.fused_view()
        view = jax.eval_shape(lambda p: fuse_params(split_family.fused, p), _kernels(params))
        modules = base_modules(fam, view, model_cfg, where)
    else:
        modules = ours
    by_name = {name: (m, i) for m in modules.values() for i, name in enumerate(m.names)}
    linear_names = list(by_name)
    all_linear = fam.all_linear(linear_names)

    # Modules PEFT adapts, per its config.
    unsupported = {fam.embedding_name: "the token embedding"}
    if model_cfg.tie_word_embeddings:
        unsupported[fam.output_name] = f"the tied {fam.output_name}"
    for name, what in unsupported.items():
        if rules.peft_selects(meta, name, all_linear):
            raise ValueError(
                f"{where}: {str(config_file)!r} (target_modules={meta.get('target_modules')!r}) "
                f"adapts {name!r}, {what}; LoRA there is not supported"
            )
    targeted = [n for n in linear_names if rules.peft_selects(meta, n, all_linear)]
    if not targeted:
        raise ValueError(
            f"{where}: target_modules={meta.get('target_modules')!r} selects no Linear module of "
            f"the base model (modules: {linear_names[:10]}...)"
        )
    specs = leaves_for(LoraConfig(**method))

    with contextlib.ExitStack() as stack:
        reader = hf_io.TensorReader([weights_file], stack)
        keys = list(reader.shape)
        shapes, dtypes = reader.shape, reader.dtype
        prefixed = [k.startswith(PEFT_PREFIX) for k in keys]
        strip = len(PEFT_PREFIX) if keys and all(prefixed) else 0
        if any(prefixed) and not all(prefixed):
            bad = [k for k, p in zip(keys, prefixed) if not p][:5]
            raise ValueError(
                f"{where}: {str(weights_file)!r} mixes keys with and without the "
                f"{PEFT_PREFIX!r} prefix, e.g. {bad}"
            )
        found, unexpected = _classify_keys(keys, strip, specs, by_name, targeted, meta)
        missing = [
            f"{PEFT_PREFIX}{n}.{s.peft}"
            for n in targeted
            for s in specs
            if (n, s.ours) not in found
        ]
        missing_modules = {n for n in targeted if any((n, s.ours) not in found for s in specs)}
        if strict and (unexpected or missing):
            msg = [f"{where}: {str(weights_file)!r} does not match its adapter config and base:"]
            if missing:
                msg.append(f"missing tensors ({len(missing)}): {missing[:10]}")
            if unexpected:
                msg.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:10]}")
            raise ValueError(" ".join(msg))
        if unexpected or missing:
            warnings.warn(
                f"{where}: strict=False: ignoring unexpected tensors {unexpected[:10]} and "
                f"modules without (all) tensors {sorted(missing_modules)[:10]}",
                PeftFormatWarning,
                stacklevel=2,
            )
        loaded = [n for n in targeted if n not in missing_modules]
        if not loaded:
            raise ValueError(f"{where}: {str(weights_file)!r} holds no usable adapter")

        # Shapes, ranks, dtypes: checked for every tensor before any is read.
        ranks = {n: rules.pattern_value(rank_pattern, n, r_default) for n in loaded}
        alphas = {n: float(rules.pattern_value(alpha_pattern, n, alpha_default)) for n in loaded}
        for name in loaded:
            module, _ = by_name[name]
            r = ranks[name]
            for spec in specs:
                key = found[(name, spec.ours)]
                _check_shape(key, shapes[key], spec, r, module, rank_pattern)
                if dtypes[key] not in hf_io.ST_DTYPES:
                    raise ValueError(
                        f"{where}: tensor {key!r} has dtype {dtypes[key]}; expected one of "
                        f"{sorted(hf_io.ST_DTYPES)}"
                    )

        _check_orientation(reader.metadata.get(weights_file, {}), specs, loaded, ranks, by_name)

        # Group by our path (stacked modules: all layers must agree).
        per_path: dict[str, list[str]] = {}
        for name in loaded:
            per_path.setdefault(by_name[name][0].path, []).append(name)
        path_rank: dict[str, int] = {}
        path_alpha: dict[str, float] = {}
        adapters: dict[str, Any] = {}
        np_dtype = np.dtype(jnp.dtype(dtype))
        for p, names in per_path.items():
            module = modules[p]
            if module.stacked:
                if len(names) != len(module.names):
                    absent = sorted(set(module.names) - set(names))
                    raise ValueError(
                        f"{where}: the adapter covers only some layers of the stacked module "
                        f"{p!r} (no adapter on {absent[:5]}); load the base with "
                        "scan_layers=False"
                    )
                for field, vals in (("rank", ranks), ("alpha", alphas)):
                    seen = {n: vals[n] for n in module.names}
                    if len(set(seen.values())) > 1:
                        raise ValueError(
                            f"{where}: per-layer {field}s differ within the stacked module "
                            f"{p!r} ({seen}); a scanned tree holds one {field} per stack: load "
                            "the base with scan_layers=False"
                        )
                names = list(module.names)
            path_rank[p] = ranks[names[0]]
            path_alpha[p] = alphas[names[0]]
            node = adapters
            for k in p.split("/"):
                node = node.setdefault(k, {})
            for spec in specs:
                arrs = [_finite(reader, found[(n, spec.ours)], spec, np_dtype) for n in names]
                arr = np.stack(arrs) if module.stacked else arrs[0]
                node[spec.ours] = jnp.asarray(arr)

    if split_family.fused:  # back onto our split members
        sizes = {p: m.d_out for p, m in ours.items()}
        adapters, path_rank, path_alpha = split_adapters(
            split_family, adapters, path_rank, path_alpha, sizes, specs
        )
        per_path = dict.fromkeys(path_rank)
        meta = member_targets(split_family, meta)
        modules = ours
    adapted = set(per_path)
    lora_config = LoraConfig(
        rank=r_default,
        alpha=alpha_default,
        targets=rules.our_targets(adapted, meta, list(modules)),
        scaling="rslora" if use_rslora else "lora",
        rank_pattern=rules.our_patterns(path_rank, r_default),
        alpha_pattern=rules.our_patterns(path_alpha, alpha_default),
        dropout=float(meta.get("lora_dropout", 0.0) or 0.0),
        dtype=dtype,
        kernel_axes="lio" if scanned else None,
        **method,
    )
    for p in adapted:  # the translation is exact (a cheap check of our own patterns)
        if lora_config.rank_for(p) != path_rank[p] or lora_config.alpha_for(p) != path_alpha[p]:
            raise AssertionError(f"internal error: pattern translation failed at {p!r}")
    return combine(adapters, params), lora_config


def _finite(reader: hf_io.TensorReader, key: str, spec: LeafSpec, dtype: np.dtype) -> np.ndarray:
    """Tensor `key` in our layout and `dtype`; refused if it holds NaN or Inf (or overflows)."""
    raw = reader.get(key)
    x = spec.from_peft(raw).astype(dtype)
    if not np.isfinite(x).all():
        after = f" once cast to {dtype}" if np.isfinite(raw).all() else ""
        raise NonFiniteError(
            f"import_peft: tensor {key!r} in {str(reader.files[key])!r} holds NaN or Inf "
            f"values{after}; the adapter is broken"
        )
    return x


def _check_orientation(
    metadata: Mapping[str, str],
    specs: Sequence[LeafSpec],
    loaded: Sequence[str],
    ranks: Mapping[str, int],
    by_name: Mapping[str, Any],
) -> None:
    """The factors' orientation: checked against export_peft's record, or a warning where shapes
    cannot show it (a full-rank factor is square: r = in_features or r = out_features)."""
    record = metadata.get(LAYOUT_KEY)
    if record is not None:
        if record != layout_record(specs):
            raise ValueError(
                f"import_peft: the adapter file records the layout {record!r} ({LAYOUT_KEY}), "
                f"but PEFT's is {layout_record(specs)!r}: it was not written in PEFT's format"
            )
        return
    square = []
    for name in loaded:
        module = by_name[name][0]
        dims = {"a": module.d_in, "b": module.d_out}
        if any(dims.get(spec.layout) == ranks[name] for spec in specs):
            square.append(name)
    if square:
        warnings.warn(
            f"import_peft: full-rank adapters (rank = in_features or out_features) at "
            f"{square[:5]}{' ...' if len(square) > 5 else ''}: a square lora_A or lora_B looks "
            "the same transposed, and the file records no orientation (it was not written by "
            "rslora_jax.export_peft), so PEFT's (lora_A: (r, in), lora_B: (out, r)) is assumed "
            "unchecked",
            PeftFormatWarning,
            stacklevel=3,
        )


def _classify_keys(
    keys: Sequence[str],
    strip: int,
    specs: Sequence[LeafSpec],
    by_name: Mapping[str, Any],
    targeted: Sequence[str],
    meta: Mapping[str, Any],
) -> tuple[dict[tuple[str, str], str], list[str]]:
    """``{(module name, our leaf): key}`` for the usable keys, and the others with a reason."""
    found: dict[tuple[str, str], str] = {}
    unexpected: list[str] = []
    chosen = set(targeted)
    for key in keys:
        body = key[strip:]
        spec = next((s for s in specs if body.endswith("." + s.peft)), None)
        if spec is None:
            known = next((d for s, d in UNSUPPORTED_SUFFIXES.items() if s in body), None)
            other = next(
                ((s, cls) for s, (_, cls) in known_specs().items() if body.endswith("." + s)),
                None,
            )
            if known:
                reason = f"{known} is not supported"
            elif other is not None:
                needs = ", ".join(other[1].peft_fields or {})
                reason = f"{other[0]!r} needs {needs or other[1].title}"
            else:
                reason = "not a LoRA factor"
            unexpected.append(f"{key} ({reason})")
            continue
        name = body[: -len(spec.peft) - 1]
        if name not in by_name:
            unexpected.append(f"{key} (module {name!r} does not exist in the base params)")
        elif name not in chosen:
            unexpected.append(
                f"{key} (module {name!r} is not selected by target_modules="
                f"{meta.get('target_modules')!r})"
            )
        else:
            found[(name, spec.ours)] = key
    return found, unexpected


def _kernels(tree: Any) -> Any:
    """The leaves of a base tree as `jax.ShapeDtypeStruct` (nothing copied; a quantized kernel
    by its logical shape)."""

    def shape(x: Any) -> jax.ShapeDtypeStruct:
        dtype = np.float32 if is_quantized(x) else x.dtype
        return jax.ShapeDtypeStruct(tuple(np.shape(x) if not is_quantized(x) else x.shape), dtype)

    return jax.tree.map(shape, tree, is_leaf=is_quantized)


def _all_keys(tree: Any) -> list[str]:
    out = []
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.append(k)
            out.extend(_all_keys(v))
    return out


def _check_shape(
    key: str,
    shape: tuple[int, ...],
    spec: LeafSpec,
    r: int,
    module: LinearModule,
    rank_pattern: Mapping[str, Any],
) -> None:
    want = spec.shape(r, module.d_in, module.d_out)
    if shape == want:
        return
    source = (
        "rank_pattern"
        if rank_pattern and any(re.match(rf"(.*\.)?({k})$", module.names[0]) for k in rank_pattern)
        else "r"
    )
    msg = (
        f"import_peft: tensor {key!r} has shape {shape}, expected {want} "
        f"({spec.peft} of a module with in_features={module.d_in}, "
        f"out_features={module.d_out}, rank {r} from the config's {source})"
    )
    if len(shape) == len(want) == 2 and shape == want[::-1]:
        msg += ": the factor is stored transposed"
    elif len(shape) == 2 and len(want) == 2:
        r_axis = 0 if spec.peft.startswith("lora_A") else 1
        other = 1 - r_axis
        if shape[other] == want[other]:
            msg += (
                f": its rank is {shape[r_axis]}, but the config (rank_pattern/r) says {r}, so "
                "the scale would be wrong"
            )
        elif shape[::-1][other] == want[other]:
            msg += ": the factor looks transposed and its rank does not match the config"
    raise ValueError(msg)
