"""Model definitions: one decoder-only causal LM (`decoder`) configured per family (Llama,
Mistral, Qwen2 in `llama`; Gemma 2/3 in `gemma`; Qwen3 in `qwen3`; Phi-3 in `phi3`), the
families' registry (`families`) and sharding policy (`sharding`)."""

from rslora_jax.models.decoder import DecoderForCausalLM
from rslora_jax.models.gemma import GemmaConfig
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
from rslora_jax.models.phi3 import Phi3Config
from rslora_jax.models.qwen3 import Qwen3Config
from rslora_jax.models.sharding import param_specs

__all__ = [
    "MODEL_TYPES",
    "DecoderForCausalLM",
    "GemmaConfig",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "Phi3Config",
    "Qwen3Config",
    "RopeScaling",
    "causal_lm_loss",
    "convert_scan",
    "init_params",
    "param_specs",
    "rope_inv_freq",
]
