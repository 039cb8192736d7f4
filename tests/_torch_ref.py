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
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.5],
    "long_factor": [2.0, 3.5],
    "original_max_position_embeddings": 8,
    "partial_rotary_factor": 0.5,
}


def family_hf_config(case: str, **extra):
    """A tiny transformers config of a family other than Llama (`case`: ``"gemma2"``,
    ``"gemma3"``, ``"qwen3"``, ``"phi3"`` or ``"qwen2_mixed"``), every feature that differs
    from Llama switched on and made to matter at this size."""
    t = {**TINY, **extra}
    if case == "gemma2":  # soft caps that matter, query scale != head_dim, alternating layers
        return transformers.Gemma2Config(
            **t,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            attn_logit_softcapping=0.2,
            final_logit_softcapping=3.0,
        )
    if case == "gemma3":  # local/global RoPE bases, linear scaling on global layers, q/k norms
        return transformers.Gemma3TextConfig(
            **{**t, "num_hidden_layers": 3},
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=3.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        )
    if case == "qwen3":  # q/k norms, head_dim != D / H, upper layer sliding, bias, tied
        return transformers.Qwen3Config(
            **t,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            attention_bias=True,
            tie_word_embeddings=True,
        )
    if case == "phi3":  # fused qkv/gate_up, LongRoPE, partial rotation, window on every layer
        return transformers.Phi3Config(
            **t,
            sliding_window=5,
            pad_token_id=None,
            rope_parameters=dict(LONGROPE),
            original_max_position_embeddings=8,  # transformers copies it into rope_parameters
        )
    assert case == "qwen2_mixed"  # layer 0 full, layer 1 sliding
    return transformers.Qwen2Config(
        **t, use_sliding_window=True, sliding_window=4, max_window_layers=1
    )


def sharpened(model):
    """Larger query/key weights: attention far from uniform, so that windows, RoPE variants
    and soft caps change the logits visibly at this size."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(4.0)
    return model


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


def hf_base(tmp_path_factory, name: str, hf_config):
    """A tiny random transformers model saved to a fresh directory, and its params loaded
    scanned and unscanned: ``.model``, ``.dir``, ``.layouts[scan]``."""
    from types import SimpleNamespace

    from rslora_jax.hf import load_pretrained

    model = torch_model(hf_config)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    layouts = {scan: load_pretrained(directory, scan_layers=scan) for scan in (True, False)}
    return SimpleNamespace(model=model, dir=directory, layouts=layouts)
