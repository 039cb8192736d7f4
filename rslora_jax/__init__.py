"""rslora_jax: rank-stabilised LoRA (rsLoRA) adapters for JAX/Flax parameter trees.

Pure functions add adapter factors to a Flax parameter tree (`init`), run the model with them
(`lora`), train only them (`optimizer`, `split`/`combine`), shard them like the base
(`partition_specs`), checkpoint them (`save_adapters`, `CheckpointManager`) and fold them back
into a plain tree for serving (`merge`). Variants: RaSA rank sharing (`rasa`), DoRA, PiSSA/OLoRA
initialisation (`variants`), LoRA+ (``optimizer(..., lora_plus_ratio=...)``). Models and
Hugging Face interop live in `rslora_jax.models` and `rslora_jax.hf`.
"""

from rslora_jax import rasa, variants
from rslora_jax.adapters import (
    adapter_paths,
    combine,
    init,
    init_adapters,
    is_adapter_path,
    num_adapter_params,
    split,
)
from rslora_jax.checkpoint import CheckpointManager, load_adapters, save_adapters
from rslora_jax.config import LoraConfig
from rslora_jax.forward import infer_kernel_axes, lora, register_dense_like
from rslora_jax.merge import merge, unmerge
from rslora_jax.optim import lora_plus_labels, optimizer
from rslora_jax.sharding import factor_specs, opt_state_specs, partition_specs
from rslora_jax.variants import principal_init

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "LoraConfig",
    "adapter_paths",
    "combine",
    "factor_specs",
    "infer_kernel_axes",
    "init",
    "init_adapters",
    "is_adapter_path",
    "load_adapters",
    "lora",
    "lora_plus_labels",
    "merge",
    "num_adapter_params",
    "opt_state_specs",
    "optimizer",
    "partition_specs",
    "principal_init",
    "rasa",
    "register_dense_like",
    "save_adapters",
    "split",
    "unmerge",
    "variants",
]
