"""Model definitions: the Llama-family causal LM (Llama, Mistral, Qwen2), its sharding policy."""

from rslora_jax.models.llama import (
    MODEL_TYPES,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    RopeScaling,
    causal_lm_loss,
    convert_scan,
    init_params,
    rope_inv_freq,
)
from rslora_jax.models.sharding import param_specs

__all__ = [
    "MODEL_TYPES",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "RopeScaling",
    "causal_lm_loss",
    "convert_scan",
    "init_params",
    "param_specs",
    "rope_inv_freq",
]
