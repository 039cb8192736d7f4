"""The Llama family's model: the shared decoder (`rslora_jax.models.decoder`) under Llama names.

Llama, Mistral and Qwen2 are :class:`~rslora_jax.models.decoder.DecoderForCausalLM` with a
:class:`~rslora_jax.models.llama.LlamaConfig`; the names below are kept for existing code
(``LlamaForCausalLM(config).apply(...)``). RoPE follows Hugging Face's ``rotate_half``
convention, including Llama-3 and linear scaling of the inverse frequencies exactly as
transformers computes them (in float32).
"""

from __future__ import annotations

import numpy as np

from rslora_jax.models.decoder import (
    MLP,
    Attention,
    DecoderForCausalLM,
    DecoderLayer,
    DecoderModel,
    RMSNorm,
    causal_lm_loss,
    convert_scan,
    init_params,
)
from rslora_jax.models.llama.config import LlamaConfig

LlamaForCausalLM = DecoderForCausalLM
LlamaModel = DecoderModel
LlamaDecoderLayer = DecoderLayer
LlamaAttention = Attention
LlamaMLP = MLP


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies (head_dim // 2,), float32, computed as transformers does.

    Args:
        config: the model configuration (``rope_theta``, ``head_dim``, ``rope_scaling``).

    Returns:
        A float32 numpy array.

    Example:
        >>> rope_inv_freq(LlamaConfig.tiny()).shape
        (4,)
    """
    return config.rope_for("full_attention").inv_freq()


__all__ = [
    "LlamaAttention",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "RMSNorm",
    "causal_lm_loss",
    "convert_scan",
    "init_params",
    "rope_inv_freq",
]
