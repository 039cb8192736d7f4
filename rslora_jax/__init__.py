"""rslora_jax: rank-stabilised LoRA (rsLoRA) adapters for JAX/Flax parameter trees.

Pure functions add adapter factors to a Flax parameter tree (`init`), run the model with them
(`lora`), train only them (`optimizer`, `split`/`combine`), shard them like the base
(`partition_specs`), checkpoint them (`save_adapters`, `CheckpointManager`) and fold them back
into a plain tree for serving (`merge`). Methods (`rslora_jax.methods`): LoRA/rsLoRA (default),
RaSA rank sharing, DoRA; initialisers Kaiming, Gaussian, PiSSA, OLoRA; LoRA+
(``optimizer(..., lora_plus_ratio=...)``). A frozen base can be stored quantized (`quantize`:
int8, QLoRA's nf4, fp8), dequantized per layer inside the adapted matmul. Models and Hugging Face interop live in
`rslora_jax.models` and `rslora_jax.hf`.

The package is layered (see the README's Layout): `core` (config, paths, tree operations, the
method protocol) <- `methods` <- `ops` (init, merge, optimizer, sharding, checkpoints) and
`execution` (low-rank and fused math, the dispatch) <- `frontends` (linen, NNX) <- `models` <-
`hf` <- `cli`.
"""

from rslora_jax import methods, rasa, variants
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.tree import (
    adapter_paths,
    combine,
    is_adapter_path,
    num_adapter_params,
    split,
)
from rslora_jax.frontends.linen import infer_kernel_axes, lora, register_dense_like
from rslora_jax.frontends.registry import EinsumLayer, register_einsum_layer, register_stacked
from rslora_jax.methods import DoRA, LoRA, RaSA
from rslora_jax.ops.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_adapters,
    save_adapters,
)
from rslora_jax.ops.init import init, init_adapters, principal_init
from rslora_jax.ops.merge import merge, unmerge
from rslora_jax.ops.optim import lora_plus_labels, optimizer
from rslora_jax.ops.quantize import (
    QuantizedArray,
    base_bytes,
    dequantize,
    is_quantized,
    quantize,
)
from rslora_jax.ops.sharding import factor_specs, opt_state_specs, partition_specs

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "DoRA",
    "EinsumLayer",
    "LoRA",
    "LoraConfig",
    "QuantizedArray",
    "RaSA",
    "adapter_paths",
    "base_bytes",
    "combine",
    "dequantize",
    "factor_specs",
    "infer_kernel_axes",
    "init",
    "init_adapters",
    "is_adapter_path",
    "is_quantized",
    "load_adapters",
    "lora",
    "lora_plus_labels",
    "merge",
    "methods",
    "num_adapter_params",
    "opt_state_specs",
    "optimizer",
    "partition_specs",
    "principal_init",
    "quantize",
    "rasa",
    "register_dense_like",
    "register_einsum_layer",
    "register_stacked",
    "save_adapters",
    "split",
    "unmerge",
    "variants",
]
