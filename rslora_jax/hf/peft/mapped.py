"""PEFT export of models we do not implement, over a module map: JAX-native einsum models.

`export_peft` knows our own models through their family. The JAX-native models people fine-tune
(Google's ``gemma`` library, google-tunix's Llama 3 / Qwen 2-3 / Gemma 3) have Hugging Face
counterparts whose projections are the same matrices; a *module map* names, for each adapted
weight of ours, the HF module(s) it is: one name, or one per member of a stacked projection
(gemma's ``kv_einsum`` -> ``k_proj``, ``v_proj``; ``gating_einsum`` -> ``gate_proj``,
``up_proj``). `gemma_module_map` and `tunix_module_map` build the maps of those libraries;
`export_peft_mapped` writes the adapter directory.

Each member's factors are the adapter's, flattened as the kernel axes say (`rslora_jax.core.
layout`): ``d_in`` / ``d_out`` are the input / output axes in kernel order, which is the order
of the HF weight's features for these models (heads outer, head dimension inner: ``q_einsum``
``(N, D, H)`` is ``q_proj`` with ``out_features = N * H``). PEFT stores ``lora_A.weight = A.T``
``(r, d_in)`` and ``lora_B.weight = B.T`` ``(d_out, r)``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rslora_jax import _files
from rslora_jax._types import Params
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.sites import layout_for
from rslora_jax.core.tree import KERNEL, adapted_holders, is_adapter_key
from rslora_jax.hf import _peft_rules as rules
from rslora_jax.hf import io as hf_io
from rslora_jax.hf.peft._format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_FORMAT_VERSION,
    PEFT_PREFIX,
    check_export_args,
    leaves_for,
    method_to_peft,
)

ModuleMap = Mapping[str, tuple[str, ...]]

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
_GEMMA_ATTN = {
    "q_einsum": ("q_proj",),
    "kv_einsum": ("k_proj", "v_proj"),
    "qkv_einsum": ("q_proj", "k_proj", "v_proj"),
    "attn_vec_einsum": ("o_proj",),
}
_GEMMA_MLP = {"gating_einsum": ("gate_proj", "up_proj"), "linear": ("down_proj",)}
_TUNIX_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_TUNIX_MLP = {"gate_proj", "up_proj", "down_proj"}


def _map_by(
    params: Params, rule: Callable[[list[str]], tuple[str, ...] | None]
) -> dict[str, tuple[str, ...]]:
    out = {}
    for path, _ in adapted_holders(params):
        names = rule(path.split("/"))
        if names is not None:
            out[path] = names
    return out


def gemma_module_map(params: Params) -> dict[str, tuple[str, ...]]:
    """The HF module names of the adapted weights of a ``gemma``-library Transformer.

    ``layer_<i>/attn/{q,kv,qkv,attn_vec}_einsum`` -> ``model.layers.<i>.self_attn.{q,(k,v),
    (q,k,v),o}_proj``; ``layer_<i>/mlp/{gating_einsum,linear}`` -> ``model.layers.<i>.mlp.
    {(gate,up),down}_proj``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"layer_0": {"attn": {"kv_einsum": {"w": jnp.ones((2, 1, 4, 2)),
      ...      "lora_a": jnp.ones((2, 4, 1)), "lora_b": jnp.ones((2, 1, 2))}}}}
      >>> gemma_module_map(p)
      {'layer_0/attn/kv_einsum': ('model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj')}
    """

    def rule(parts: list[str]) -> tuple[str, ...] | None:
        match = re.fullmatch(r"layer_(\d+)", parts[0]) if len(parts) == 3 else None
        if match is None:
            return None
        layer, block, name = match.group(1), parts[1], parts[2]
        if block == "attn" and name in _GEMMA_ATTN:
            return tuple(f"model.layers.{layer}.self_attn.{n}" for n in _GEMMA_ATTN[name])
        if block == "mlp" and name in _GEMMA_MLP:
            return tuple(f"model.layers.{layer}.mlp.{n}" for n in _GEMMA_MLP[name])
        return None

    return _map_by(params, rule)


def tunix_module_map(params: Params) -> dict[str, tuple[str, ...]]:
    """The HF module names of the adapted weights of a google-tunix NNX model (Llama 3, Qwen 2/3:
    ``layers/<i>/attn/{q,k,v,o}_proj``, ``layers/<i>/mlp/{gate,up,down}_proj``; Gemma 3:
    ``layers/<i>/attn/{q,kv,qkv,attn_vec}_einsum`` as `gemma_module_map`), as
    `rslora_jax.nnx.to_params` lays them out.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"layers": {0: {"mlp": {"up_proj": {"kernel": jnp.ones((4, 6)),
      ...      "lora_a": jnp.ones((4, 1)), "lora_b": jnp.ones((1, 6))}}}}}
      >>> tunix_module_map(p)
      {'layers/0/mlp/up_proj': ('model.layers.0.mlp.up_proj',)}
    """

    def rule(parts: list[str]) -> tuple[str, ...] | None:
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit():
            return None
        layer, block, name = parts[1], parts[2], parts[3]
        if block == "attn" and name in _TUNIX_ATTN:
            return (f"model.layers.{layer}.self_attn.{name}",)
        if block == "attn" and name in _GEMMA_ATTN:
            return tuple(f"model.layers.{layer}.self_attn.{n}" for n in _GEMMA_ATTN[name])
        if block == "mlp" and name in _TUNIX_MLP:
            return (f"model.layers.{layer}.mlp.{name}",)
        return None

    return _map_by(params, rule)


def export_peft_mapped(
    directory: str | os.PathLike[str],
    params: Params,
    lora_config: LoraConfig,
    module_map: ModuleMap,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    dtype: Any = None,
) -> None:
    """Writes the adapters of `params` as a PEFT LoRA adapter directory with HF module names.

    Args:
      directory: target directory (replaced in one step, as `export_peft` does).
      params: the tree with adapters (linen params, or `rslora_jax.nnx.to_params` of a model).
      lora_config: the adapters' config; its kernel axes must cover every adapted weight with
        more than two axes (as the config the adapters were made with does).
      module_map: ``{our weight path: HF module names}``: one name, or one per member of a
        stacked projection (the weight's single layer axis ``l``); e.g. `gemma_module_map`.
      base_model_name_or_path: recorded in the config.
      task_type: PEFT's ``task_type`` (``"CAUSAL_LM"`` or None).
      dtype: dtype of the stored tensors; None keeps the adapters'.

    Raises:
      ValueError: a method without a PEFT format (RaSA), an adapted weight the map does not
        name, a number of names that does not match the weight's members, or layer axes other
        than one member axis.

    Example:
      >>> import json, tempfile, jax, jax.numpy as jnp
      >>> from rslora_jax import LoraConfig, init
      >>> p = {"layer_0": {"attn": {"q_einsum": {"w": jnp.ones((2, 8, 4))}}}}
      >>> cfg = LoraConfig(rank=2, kernel_axes={"layer_0/attn/q_einsum": "oio"})
      >>> p = init(p, cfg, jax.random.key(0))
      >>> tmp = tempfile.TemporaryDirectory()
      >>> export_peft_mapped(tmp.name, p, cfg, gemma_module_map(p))
      >>> json.load(open(os.path.join(tmp.name, "adapter_config.json")))["target_modules"]
      ['q_proj']
      >>> tmp.cleanup()
    """
    where = "export_peft_mapped"
    out_dtype = check_export_args(lora_config, params, task_type, dtype, where)
    holders = adapted_holders(params)
    if not holders:
        raise ValueError(f"{where}: params hold no adapters")
    specs = leaves_for(lora_config)
    wanted = {spec.ours for spec in specs}
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, holder in holders:
        if path not in module_map:
            raise ValueError(
                f"{where}: the module map names no HF module for the adapted weight {path!r} "
                f"(it names {sorted(module_map)[:10]})"
            )
        names = tuple(module_map[path])
        present = {k for k in holder if is_adapter_key(k)}
        if present != wanted:
            raise ValueError(
                f"{where}: the adapter at {path!r} has leaves {sorted(present)}, but the config's "
                f"method {lora_config.method.title} calls for {sorted(wanted)}"
            )
        lay = layout_for(lora_config, path, holder[KERNEL])
        members = lay.layer_shape
        if (
            len(members) > 1
            or (members and members[0] != len(names))
            or (not members and len(names) != 1)
        ):
            raise ValueError(
                f"{where}: {path!r} (kernel {lay.shape}, axes {lay.axes!r}) has "
                f"{members[0] if members else 1} member(s) along its layer axes, but the module "
                f"map names {len(names)}: {names}"
            )
        a_name = next(spec.ours for spec in specs if spec.layout == "a")
        r = int(holder[a_name].shape[-1])
        for spec in specs:
            arr = np.asarray(jax.device_get(holder[spec.ours]))
            if out_dtype is None and arr.dtype not in hf_io.NP_TO_ST:
                raise ValueError(f"{where}: {path}/{spec.ours} has dtype {arr.dtype}; pass dtype")
            dt = arr.dtype if out_dtype is None else out_dtype
            for i, name in enumerate(names):
                x = spec.to_peft(arr[i] if members else arr)
                tensors[f"{PEFT_PREFIX}{name}.{spec.peft}"] = np.ascontiguousarray(x, dtype=dt)
        for name in names:
            ranks[name] = r
            alphas[name] = lora_config.alpha_for(path)
    adapted_names = sorted(ranks)
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
        "target_modules": sorted({rules.last(n, ".") for n in adapted_names}),
        "exclude_modules": None,
        "rank_pattern": rules.patterns(ranks, lora_config.rank, ".", adapted_names),
        "alpha_pattern": {
            k: rules.number(v)
            for k, v in rules.patterns(alphas, lora_config.alpha, ".", adapted_names).items()
        },
        "lora_dropout": lora_config.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        **method_to_peft(lora_config),
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        "target_parameters": None,
        "trainable_token_indices": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
    }
    text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    real_dir = Path(directory).resolve()
    if real_dir.is_dir():
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            _files.check_target(real_dir, name, where)
    with _files.staged_directory(directory, who=where) as staging:
        hf_io.write_safetensors(staging / ADAPTER_WEIGHTS_NAME, tensors)
        (staging / ADAPTER_CONFIG_NAME).write_text(text, encoding="utf-8")


__all__ = ["ModuleMap", "export_peft_mapped", "gemma_module_map", "tunix_module_map"]
