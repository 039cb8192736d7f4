"""PEFT-format LoRA adapters in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

`export_peft` writes the adapters of a params tree so that Hugging Face PEFT
(``PeftModel.from_pretrained(transformers_model, directory)``) computes the same logits as our
forward pass; `import_peft` reads an adapter trained with PEFT on PyTorch into our tree.

On-disk format (PEFT's, adapter name stripped), for each adapted module, e.g.
``model.layers.0.self_attn.q_proj``::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight       (r, in)   = lora_a.T
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight       (out, r)  = lora_b.T
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  (out,) = lora_magnitude

(the last one with DoRA only). Scanned layers (a leading layer axis) are written one layer per
module name and stacked again on import.

Scale. PEFT computes ``lora_alpha / sqrt(r)`` if ``use_rslora`` else ``lora_alpha / r``, with
``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (the first key
that matches a '.'-bounded suffix of the module name, ``re.match(rf"(.*\\.)?({key})$", name)``).
The export always writes ``use_rslora`` and writes patterns computed from the per-module values
(not a textual translation of our regexes), so PEFT reproduces ``LoraConfig.scale_for`` for every
module; the import computes PEFT's per-module values and writes them back as patterns over our
'/' paths. An ``adapter_config.json`` without ``use_rslora`` was written by a PEFT version older
than rsLoRA, so it is read as PEFT reads it (``alpha / r``), with a `PeftFormatWarning`.

PEFT's own config rules (which modules a config selects, rank/alpha patterns, refused options)
are in :mod:`rslora_jax.hf._peft_rules`. The format is model-independent: the model side is the family's map between our module paths
and HF module names with the kernels' shapes (:meth:`ModelFamily.linear_modules
<rslora_jax.models.families.ModelFamily.linear_modules>`), looked up by the model config's
``model_type``.

What depends on the adapter method comes from the method protocol (`rslora_jax.core.protocol`):
each method declares its leaves' PEFT key suffixes and layouts (`Leaf.peft`, `Leaf.layout`) and
its adapter_config.json fields (``use_dora`` for DoRA; RaSA has no PEFT format and is refused),
the initialiser its ``init_lora_weights``. A new method with a PEFT format needs nothing here.

transformers, torch and peft are not imported: this module reads and writes JSON and safetensors.
"""

from rslora_jax.hf._peft_rules import PeftFormatWarning
from rslora_jax.hf.peft._format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_FORMAT_VERSION,
    LeafSpec,
)
from rslora_jax.hf.peft.export import export_peft
from rslora_jax.hf.peft.importer import import_peft
from rslora_jax.hf.peft.mapped import export_peft_mapped, gemma_module_map, tunix_module_map

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_FORMAT_VERSION",
    "LeafSpec",
    "PeftFormatWarning",
    "export_peft",
    "export_peft_mapped",
    "gemma_module_map",
    "import_peft",
    "tunix_module_map",
]
