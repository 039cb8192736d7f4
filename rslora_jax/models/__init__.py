"""Model definitions: the Llama-family causal LM (Llama, Mistral, Qwen2)."""

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

__all__ = [
    "MODEL_TYPES",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "RopeScaling",
    "causal_lm_loss",
    "convert_scan",
    "init_params",
    "rope_inv_freq",
]
