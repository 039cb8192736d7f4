"""The model's own loss (``labels=``, ``loss_chunk=``) against the logits path and the formula.

``DecoderForCausalLM(config).apply(v, ids, labels=t, loss_mask=m, loss_chunk=c)`` computes the
loss a chunk of positions at a time, each chunk rematerialised, so that the (B, S, vocab) logits
are never held whole. The reference is the second code path: the logits of a plain call scored
by ``causal_lm_loss`` (optax's cross-entropy, float32), and for one case the cross-entropy
written out in the test. Gradients w.r.t. the adapters (through `rl.lora`) must agree too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rslora_jax as rl
from rslora_jax.models import DecoderForCausalLM, LlamaConfig, causal_lm_loss, init_params
from rslora_jax.models.gemma import GemmaConfig
from tests._asserts import assert_close

B, S = 2, 9  # chunks of 4 leave a short last chunk


def _setup(config):
    base = init_params(config, jax.random.key(0))
    lcfg = rl.LoraConfig(
        rank=4, alpha=8.0, targets="all-linear", kernel_axes={"model/layers/.*": "lio"}
    )
    params = rl.init(base, lcfg, jax.random.key(1))
    # Non-zero B, so that the adapters change the loss and get gradients through both factors.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, params
    )
    adapters, frozen = rl.split(params)
    apply = rl.lora(DecoderForCausalLM(config).apply, lcfg)
    ids = jax.random.randint(jax.random.key(2), (B, S + 1), 0, config.vocab_size)
    mask = (jax.random.uniform(jax.random.key(3), (B, S)) > 0.3).astype(jnp.float32)
    return apply, adapters, frozen, ids, mask


CONFIGS = {
    "llama-untied": lambda: LlamaConfig.tiny(tie_word_embeddings=False),
    "gemma-tied-softcap": lambda: GemmaConfig.tiny(),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_loss_and_gradients_equal_the_logits_path(name):
    config = CONFIGS[name]()
    apply, adapters, frozen, ids, mask = _setup(config)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def via_logits(ad):
        logits = apply({"params": rl.combine(ad, frozen)}, inputs)
        return causal_lm_loss(logits, targets, mask)

    def chunked(ad, chunk):
        v = {"params": rl.combine(ad, frozen)}
        return apply(v, inputs, labels=targets, loss_mask=mask, loss_chunk=chunk)

    want, want_grads = jax.value_and_grad(via_logits)(adapters)
    for chunk in (None, 4):
        got, grads = jax.value_and_grad(chunked)(adapters, chunk)
        assert_close(got, want, rel=1e-6)
        assert_close(grads, want_grads, rel=1e-5)


def test_unmasked_loss_is_the_written_cross_entropy():
    config = LlamaConfig.tiny()
    apply, adapters, frozen, ids, _ = _setup(config)
    v = {"params": rl.combine(adapters, frozen)}
    logits = np.asarray(apply(v, ids[:, :-1]), np.float64)
    targets = np.asarray(ids[:, 1:])
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], -1).mean()
    got = apply(v, ids[:, :-1], labels=targets, loss_chunk=2)
    assert_close(got, want, rel=1e-6)


def test_bad_labels_and_chunks_are_errors():
    config = LlamaConfig.tiny()
    apply, adapters, frozen, ids, _ = _setup(config)
    v = {"params": rl.combine(adapters, frozen)}
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        apply(v, ids[:, :-1], labels=ids[:, :-2])
    with pytest.raises(ValueError, match="loss_mask must have the shape"):
        apply(v, ids[:, :-1], labels=ids[:, 1:], loss_mask=jnp.ones((B, 3)))
    with pytest.raises(ValueError, match="loss_chunk must be a positive int"):
        apply(v, ids[:, :-1], labels=ids[:, 1:], loss_chunk=0)
    with pytest.raises(ValueError, match="not with cache or logits_index"):
        apply(v, ids[:, :-1], labels=ids[:, 1:], logits_index=jnp.zeros((B,), jnp.int32))
