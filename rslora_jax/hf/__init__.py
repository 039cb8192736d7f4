"""Hugging Face interop: checkpoint directories in and out, PEFT adapters, module-name mapping.

- :mod:`rslora_jax.hf.io`: safetensors in/out (one dtype table), JSON, the tokenizer loader.
- :mod:`rslora_jax.hf.checkpoint`: ``config.json`` + safetensors checkpoint directories.
- :mod:`rslora_jax.hf.peft`: PEFT-format LoRA adapters.

The model side (config class, parameters, module names) comes from the family registry in
:mod:`rslora_jax.models.families`; atomic directory writes from :mod:`rslora_jax._files`.
transformers (and torch) are imported lazily inside the functions that need them.
"""

from rslora_jax.hf.checkpoint import check_pretrained, load_config, load_pretrained, save_pretrained
from rslora_jax.hf.io import load_tokenizer
from rslora_jax.hf.peft import PeftFormatWarning, export_peft, import_peft
from rslora_jax.models.families import flax_module_path, hf_module_name

__all__ = [
    "PeftFormatWarning",
    "check_pretrained",
    "export_peft",
    "flax_module_path",
    "hf_module_name",
    "import_peft",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
