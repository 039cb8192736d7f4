"""The PyTorch reference side of the parity tests: tiny transformers models, their logits."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB, SEQ = 96, 12
#: A tiny Llama-family shape (GQA: k/v_proj 32 -> 16), shared by the parity tests.
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ))


def torch_model(hf_config, seed: int = 0):
    """A transformers model from `hf_config` with non-trivial norms, biases and larger weights."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def torch_logits(model, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()
