"""Hugging Face interop: checkpoint directories in and out, module-name mapping.

transformers (and torch) are imported lazily inside the functions that need them.
"""

from rslora_jax.hf.checkpoint import (
    flax_module_path,
    hf_module_name,
    load_config,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)
from rslora_jax.hf.peft import PeftFormatWarning, export_peft, import_peft

__all__ = [
    "PeftFormatWarning",
    "export_peft",
    "flax_module_path",
    "hf_module_name",
    "import_peft",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
