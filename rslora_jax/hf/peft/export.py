"""`export_peft`: our adapters as a PEFT adapter directory (see `rslora_jax.hf.peft`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rslora_jax import _files
from rslora_jax._types import Params
from rslora_jax.core import extras as ex
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.tree import (
    KERNEL,
    adapted_holders,
    adapter_leaves,
    is_adapter_key,
)
from rslora_jax.hf import _peft_rules as rules
from rslora_jax.hf import io as hf_io
from rslora_jax.hf.peft._format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LAYOUT_KEY,
    PEFT_FORMAT_VERSION,
    PEFT_PREFIX,
    base_modules,
    check_export_args,
    known_leaf_names,
    layout_record,
    leaves_for,
    method_to_peft,
)
from rslora_jax.hf.peft._fused import fuse_adapters
from rslora_jax.hf.peft.extras import export_extras, with_embeddings
from rslora_jax.models.families import LinearModule, family_of
from rslora_jax.ops.finite import NonFiniteError, nonfinite_paths


# ---------------------------------------------------------------------------- export
def export_peft(
    directory: str | os.PathLike[str],
    params: Params,
    lora_config: LoraConfig,
    model_config: Any,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    dtype: Any = None,
) -> None:
    """Writes the adapters of `params` as a PEFT LoRA adapter directory.

    Writes ``adapter_config.json`` (``peft_type`` LORA, ``use_rslora`` always explicit, ``r``,
    ``lora_alpha``, ``rank_pattern`` / ``alpha_pattern`` as dotted HF module-name regexes that
    give every module the rank and alpha of `lora_config`, ``target_modules`` as HF module names
    (the set of last name components of the adapted modules, or a regex when those names would
    also select modules without an adapter), ...) and ``adapter_model.safetensors`` with PEFT's
    key names and (out, in) layouts. ``PeftModel.from_pretrained(model, directory)`` on the
    transformers model of the same base then computes the same logits as
    ``rslora_jax.lora(LlamaForCausalLM(config).apply, lora_config)``.

    The extras (`rslora_jax.core.extras`) go under PEFT's names (`rslora_jax.hf.peft.extras`):
    trained copies as ``modules_to_save`` (and ``bias``), token rows as
    ``trainable_token_indices``, biases on B as ``lora_bias``, embedding adapters as
    ``lora_embedding_A`` / ``lora_embedding_B`` with the table in ``target_modules``.

    ``init_lora_weights`` records `lora_config.init` in PEFT's terms (True for
    ``kaiming_uniform``). With PiSSA/OLoRA (``init="pissa"``/``"olora"``), PEFT recomputes the
    residual base from the base it is given when it loads the adapter: load it onto the original
    (pre-PiSSA) base model, not onto the residual. For ``"pissa_niter_<n>"``, PEFT's randomized
    SVD draws other numbers than ours, so that residual differs slightly.

    Both files are written into a new directory next to `directory`, which then replaces
    `directory` in one step (:func:`rslora_jax._files.staged_directory`): a reader sees the old
    adapter or the new one, never new factors with an old ``lora_alpha``. Other files already in
    `directory` are kept; symbolic links at the two target names are refused.

    Args:
      directory: target directory (created if missing; its parent must be writable).
      params: our params tree with adapters (``lora_a``/``lora_b``, and ``lora_magnitude`` with
        DoRA), layers scanned (stacked on a leading axis) or not (``model/layers/<i>``).
      lora_config: the adapters' config (ranks, alphas, scaling).
      model_config: our model config (e.g. `LlamaConfig`) or a transformers config of the base
        model; its ``model_type`` selects the model family (the module-name map). The layout
        (scanned or not) is read off `params`.
      base_model_name_or_path: recorded in the config (PEFT's field); default: the
        transformers config's ``name_or_path`` if there is one, else None.
      task_type: PEFT's ``task_type`` (``"CAUSAL_LM"`` or None).
      dtype: dtype of the stored tensors; None keeps the adapters' dtype.

    The safetensors file records the factors' orientation (metadata ``rslora_jax.layout``), so
    `import_peft` can trust a full-rank square adapter whose shapes cannot show it.

    Raises:
      ValueError: RaSA adapters (not a PEFT format), adapter leaves without a PEFT counterpart,
        factors whose shapes or ranks do not fit their kernel and `lora_config`, factors
        holding NaN or Inf (naming them; also once cast to `dtype`), params that do not match
        `model_config`, a bad `dtype` or `task_type`, or a symbolic link at a target.

    Example:
      >>> import tempfile, jax
      >>> from rslora_jax import LoraConfig, init
      >>> from rslora_jax.models import LlamaConfig, init_params
      >>> cfg = LlamaConfig.tiny(scan_layers=False)
      >>> lcfg = LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
      >>> params = init(init_params(cfg, jax.random.key(0)), lcfg, jax.random.key(1))
      >>> tmp = tempfile.TemporaryDirectory()
      >>> export_peft(tmp.name, params, lcfg, cfg)
      >>> sorted(os.listdir(tmp.name))
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> meta = json.load(open(os.path.join(tmp.name, "adapter_config.json")))
      >>> meta["use_rslora"], meta["r"], meta["target_modules"]
      (True, 4, ['q_proj', 'v_proj'])
      >>> tmp.cleanup()
    """
    where = "export_peft"
    out_dtype = check_export_args(lora_config, params, task_type, dtype, where)
    fam = family_of(model_config, where)
    scanned = fam.is_scanned(params, where)
    model_cfg = fam.config(model_config, scan_layers=scanned, where=where)
    specs = leaves_for(lora_config)
    # The extras are planned on our tree (members split), as the config names them.
    extra = export_extras(params, lora_config, fam, model_cfg, scanned, out_dtype, where)
    if fam.fused:  # the checkpoint's fused modules (Phi-3's qkv_proj): adapters joined, exactly
        if lora_config.lora_bias or lora_config.bias != "none":
            raise ValueError(
                f"{where}: bias={lora_config.bias!r}, lora_bias={lora_config.lora_bias} with a "
                f"family whose checkpoint fuses projections ({type(model_cfg).__name__}): the "
                "PEFT format would need the members' biases joined, which this export does not "
                "do; train with bias='none' and lora_bias=False"
            )
        base_modules(fam, params, model_cfg, where)
        params, lora_config = fuse_adapters(fam, params, lora_config, specs, where)
        fam = fam.fused_view()
    modules = base_modules(fam, params, model_cfg, where)
    holders = adapted_holders(params)
    if not holders and not extra.embeddings:
        raise ValueError(f"{where}: params hold no adapters (no kernel with adapter leaves)")

    adapters = {path: adapter_leaves(holder) for path, holder in holders}
    bad, after = nonfinite_paths(adapters), ""
    if not bad and out_dtype is not None:
        bad, after = nonfinite_paths(adapters, out_dtype), f" once cast to {out_dtype}"
    if bad:
        raise NonFiniteError(
            f"{where}: the adapters hold NaN or Inf values{after} at {len(bad)} leaf(s): "
            f"{bad[:10]}; refusing to write {str(directory)!r}"
        )

    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    adapted_paths: set[str] = set()
    for path, holder in holders:
        module = modules[path]
        adapted_paths.add(path)
        _check_export_axes(lora_config, path, holder[KERNEL], module)
        present = {k for k in holder if is_adapter_key(k) and k not in ex.KEYS}
        known = known_leaf_names()
        unknown = sorted(present - known)
        if unknown:
            raise ValueError(
                f"{where}: adapter leaves {unknown} at {path!r} have no PEFT counterpart "
                f"(known: {sorted(known)})"
            )
        wanted = {spec.ours for spec in specs}
        if present != wanted:
            raise ValueError(
                f"{where}: the adapter at {path!r} has leaves {sorted(present)}, but "
                f"the config's method {lora_config.method.title} calls for {sorted(wanted)}"
            )
        a_name = next(spec.ours for spec in specs if spec.layout == "a")
        r = int(holder[a_name].shape[-1])
        if r != lora_config.rank_for(path):
            raise ValueError(
                f"{where}: the adapter at {path!r} has rank {r} ({a_name} {tuple(holder[a_name].shape)}), "
                f"but lora_config gives rank {lora_config.rank_for(path)} there: the scale would be wrong"
            )
        stack = (len(module.names),) if module.stacked else ()
        arrays = {}
        for spec in specs:
            want = (*stack, *spec.ours_shape(r, module.d_in, module.d_out))
            got = tuple(holder[spec.ours].shape)
            if got != want:
                raise ValueError(
                    f"{where}: {path}/{spec.ours} has shape {got}, expected {want} for a kernel "
                    f"{(*stack, module.d_in, module.d_out)} at rank {r}"
                )
            arr = np.asarray(jax.device_get(holder[spec.ours]))
            if out_dtype is None and arr.dtype not in hf_io.NP_TO_ST:
                raise ValueError(
                    f"{where}: {path}/{spec.ours} has dtype {arr.dtype}; pass dtype=float32"
                )
            arrays[spec] = arr
        for i, name in enumerate(module.names):
            ranks[name] = r
            alphas[name] = lora_config.alpha_for(path)
            for spec, arr in arrays.items():
                x = spec.to_peft(arr[i] if module.stacked else arr)
                dt = arr.dtype if out_dtype is None else out_dtype
                tensors[f"{PEFT_PREFIX}{name}.{spec.peft}"] = np.ascontiguousarray(x, dtype=dt)

    tensors.update(extra.tensors)
    for name, (r, alpha) in extra.embeddings.items():
        ranks[name], alphas[name] = r, alpha
    adapted_names = [n for p in sorted(adapted_paths) for n in modules[p].names]
    linear_targets = rules.target_modules(modules, adapted_paths) if adapted_paths else []
    target_modules = with_embeddings(linear_targets, set(adapted_names), list(extra.embeddings))
    adapted_names += list(extra.embeddings)
    if base_model_name_or_path is None and not isinstance(model_config, fam.config_class):
        base_model_name_or_path = getattr(model_config, "name_or_path", None) or None
    config_dict = {
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "peft_version": PEFT_FORMAT_VERSION,
        "inference_mode": True,
        "r": lora_config.rank,
        "lora_alpha": rules.number(lora_config.alpha),
        "use_rslora": lora_config.scaling == "rslora",
        "target_modules": target_modules,
        "exclude_modules": None,
        "rank_pattern": rules.patterns(ranks, lora_config.rank, ".", adapted_names),
        "alpha_pattern": {
            k: rules.number(v)
            for k, v in rules.patterns(alphas, lora_config.alpha, ".", adapted_names).items()
        },
        "lora_dropout": lora_config.dropout,
        "bias": extra.fields["bias"],
        "fan_in_fan_out": False,
        **method_to_peft(lora_config),
        "lora_bias": extra.fields["lora_bias"],
        "modules_to_save": extra.fields["modules_to_save"],
        "ensure_weight_tying": extra.fields["ensure_weight_tying"],
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        "target_parameters": None,
        "trainable_token_indices": extra.fields["trainable_token_indices"],
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
    }
    if task_type is None:  # what PEFT writes for AutoPeftModel without a task type
        package = model_cfg.model_type.removesuffix("_text")  # gemma3_text lives in gemma3
        config_dict["auto_mapping"] = {
            "base_model_class": fam.architecture(model_cfg.model_type),
            "parent_library": f"transformers.models.{package}.modeling_{package}",
        }
    text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"

    real_dir = Path(directory).resolve()
    if real_dir.is_dir():
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            _files.check_target(real_dir, name, where)
    with _files.staged_directory(directory, who=where) as staging:
        hf_io.write_safetensors(
            staging / ADAPTER_WEIGHTS_NAME, tensors, metadata={LAYOUT_KEY: layout_record(specs)}
        )
        (staging / ADAPTER_CONFIG_NAME).write_text(text, encoding="utf-8")


def _check_export_axes(config: LoraConfig, path: str, kernel: Any, module: LinearModule) -> None:
    """The config's axis roles for this kernel, if it states them, must be a Linear's ones."""
    try:
        axes = config.axes_for(path, kernel.shape)
    except ValueError:
        return  # a stacked kernel without kernel_axes: the model's layout is used
    expected = "lio" if module.stacked else "io"
    if axes != expected:
        raise ValueError(
            f"export_peft: LoraConfig gives kernel axes {axes!r} for {path!r} (kernel "
            f"{tuple(kernel.shape)}), but this Linear kernel is {expected!r}; PEFT's factors would "
            "be laid out wrongly"
        )
