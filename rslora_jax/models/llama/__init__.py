"""The Llama-family causal LM (Llama, Mistral, Qwen2): `config` (LlamaConfig, RopeScaling,
from / to transformers configs) and `model` (the linen modules, parameters, scan conversion,
the loss). ``from rslora_jax.models.llama import ...`` keeps every name of both."""

from rslora_jax.models.llama.config import MODEL_TYPES, LlamaConfig, RopeScaling
from rslora_jax.models.llama.model import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    RMSNorm,
    causal_lm_loss,
    convert_scan,
    init_params,
    rope_inv_freq,
)

__all__ = [
    "MODEL_TYPES",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "RMSNorm",
    "RopeScaling",
    "causal_lm_loss",
    "convert_scan",
    "init_params",
    "rope_inv_freq",
]
