"""What LoRA alone cannot train, against Hugging Face PEFT on PyTorch (CPU), both directions.

For each feature (``modules_to_save``, ``trainable_token_indices`` on an untied and a tied
model, ``bias="all" | "lora_only"`` with ``lora_bias``, LoRA on the embedding table, a trained
copy of a tied embedding): our extras exported with `export_peft` must give PEFT's logits; an
adapter PEFT makes (random trainable values, saved by ``save_pretrained``) must import with
PEFT's logits and PEFT's gradients for every trained tensor (ours exported under PEFT's names
through `export_peft` and compared key by key with PEFT's own ``get_peft_model_state_dict`` of
the PyTorch gradients). Growing the vocabulary is checked against transformers'
``resize_token_embeddings(mean_resizing=True)``, and a merged export of a grown model against
transformers loading it.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import rslora_jax as rl
from rslora_jax.hf import (
    PeftFormatWarning,
    export_peft,
    import_peft,
    resize_vocab,
    save_pretrained,
)
from rslora_jax.models import LlamaForCausalLM
from tests._asserts import assert_close, rel_error
from tests._torch_ref import IDS, TINY, VOCAB, hf_base, torch_logits

RTOL = 1e-5  # logits, relative to their largest entry
GTOL = 1e-4  # gradients, relative to each tensor's norm


_base = hf_base


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _base(tmp_path_factory, "llama", transformers.LlamaConfig(**TINY))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):  # q/k/v bias, tied embeddings
    return _base(
        tmp_path_factory, "qwen2", transformers.Qwen2Config(**TINY, tie_word_embeddings=True)
    )


# case -> (base fixture, our LoraConfig fields, PEFT's LoraConfig fields)
CASES = {
    "modules_to_save": (
        "llama",
        dict(targets=["q_proj", "v_proj"], modules_to_save=["lm_head", "input_layernorm"]),
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "input_layernorm"]),
    ),
    "tokens_untied": (
        "llama",
        dict(targets=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5], "lm_head": [2, 3, 4]}),
        dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5], "lm_head": [2, 3, 4]}),
    ),
    "tokens_tied": (
        "qwen2",
        dict(targets=["o_proj"], trainable_token_indices=[3, 9, 40]),
        dict(target_modules=["o_proj"], trainable_token_indices=[3, 9, 40]),
    ),
    "bias_all_lora_bias": (
        "qwen2",
        dict(targets=["q_proj", "v_proj"], bias="all", lora_bias=True),
        dict(target_modules=["q_proj", "v_proj"], bias="all", lora_bias=True),
    ),
    "bias_lora_only": (
        "qwen2",
        dict(targets=["k_proj", "o_proj"], bias="lora_only"),
        dict(target_modules=["k_proj", "o_proj"], bias="lora_only"),
    ),
    "embedding": (
        "llama",
        dict(targets=["q_proj", "embed_tokens"], rank_pattern={"embed_tokens": 4}),
        dict(target_modules=["q_proj", "embed_tokens"], rank_pattern={"embed_tokens": 4}),
    ),
    "tied_embedding_copy": (
        "qwen2",
        dict(targets=["up_proj"], modules_to_save=["embed_tokens"]),
        dict(target_modules=["up_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    ),
}  # fmt: skip


def _ours(config, lora_config, params, mode="factored") -> np.ndarray:
    apply = rl.lora(LlamaForCausalLM(config).apply, lora_config, mode=mode)
    return np.asarray(apply({"params": params}, jnp.asarray(IDS, jnp.int32)), np.float32)


def _peft_model(base, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base.model), str(directory)).eval()


def _moved(params, seed: int, scale: float = 0.1):
    adapters, base = rl.split(params)
    rng = np.random.default_rng(seed)
    moved = jax.tree.map(
        lambda x: x + scale * jnp.asarray(rng.standard_normal(x.shape), x.dtype), adapters
    )
    return rl.combine(moved, base)


def _meta(directory) -> dict:
    return json.loads((Path(directory) / "adapter_config.json").read_text())


# --------------------------------------------------------------------------------------------
# Export: our extras -> PEFT


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_matches_peft(request, tmp_path, case):
    name, ours_kw, peft_kw = CASES[case]
    base = request.getfixturevalue(name)
    config, params = base.layouts[True]  # scanned: stacked copies and biases, one key per layer
    lcfg = rl.LoraConfig(rank=2, alpha=3.0, kernel_axes="lio", **ours_kw)
    params = _moved(rl.init(params, lcfg, jax.random.key(0)), seed=1)
    export_peft(tmp_path, params, lcfg, config)
    meta = _meta(tmp_path)
    for field in ("modules_to_save", "bias", "lora_bias", "trainable_token_indices"):
        if field in peft_kw:
            want = peft_kw[field]
            assert (sorted(meta[field]) if field == "modules_to_save" else meta[field]) == (
                sorted(want) if field == "modules_to_save" else want
            ), field
    if case == "tied_embedding_copy":
        assert meta["ensure_weight_tying"] is True
    ref = torch_logits(_peft_model(base, tmp_path))
    assert rel_error(ref, torch_logits(base.model), norm="max") > 1e-2
    assert_close(_ours(config, lcfg, params), ref, rel=RTOL, norm="max")
    # The merged tree is what PEFT's merge_and_unload computes, where PEFT can merge.
    merged = rl.merge(params, lcfg)
    out = LlamaForCausalLM(config).apply({"params": merged}, jnp.asarray(IDS, jnp.int32))
    if case != "embedding":  # PEFT's merge folds E + s*A@B into the table the tied head reads
        assert_close(out, ref, rel=RTOL, norm="max")


# --------------------------------------------------------------------------------------------
# Import: PEFT's adapters -> ours, logits and gradients


def _peft_adapter(base, directory, seed: int, **kwargs):
    """A PEFT adapter with every trainable tensor moved from its initial value, saved."""
    lora = peft.LoraConfig(r=2, lora_alpha=3, task_type="CAUSAL_LM", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base.model), lora)
        torch.manual_seed(seed)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        pm.eval().save_pretrained(str(directory))
    return pm


def _peft_grads(pm, weights: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch gradients of sum(logits * weights), named as PEFT saves the tensors."""
    pm.zero_grad()
    logits = pm(torch.as_tensor(IDS)).logits
    (logits * torch.as_tensor(weights)).sum().backward()
    params = pm.named_parameters(remove_duplicate=False)  # a tied copy is one tensor, two names
    grads = {n: p.grad for n, p in params if p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        named = peft.get_peft_model_state_dict(pm, state_dict=grads, save_embedding_layers=False)
    return {k: v.numpy() for k, v in named.items()}


def _our_grads(config, lcfg, params, weights, directory) -> dict[str, np.ndarray]:
    """Our gradients of the same loss, written under PEFT's names by export_peft."""
    adapters, base = rl.split(params)
    apply = rl.lora(LlamaForCausalLM(config).apply, lcfg, mode="factored")
    ids = jnp.asarray(IDS, jnp.int32)
    grads = jax.grad(lambda a: jnp.sum(apply({"params": rl.combine(a, base)}, ids) * weights))(
        adapters
    )
    export_peft(directory, rl.combine(grads, base), lcfg, config)
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_peft_logits_and_gradients(request, tmp_path, case):
    name, _, peft_kw = CASES[case]
    base = request.getfixturevalue(name)
    pm = _peft_adapter(base, tmp_path / "peft", seed=3, **peft_kw)
    ref = torch_logits(pm)
    assert rel_error(ref, torch_logits(base.model), norm="max") > 1e-2
    config, params = base.layouts[False]  # unscanned (the export test covers scanned)
    got, lcfg = import_peft(tmp_path / "peft", params, config)
    assert_close(_ours(config, lcfg, got), ref, rel=RTOL, norm="max")
    assert_close(_ours(config, lcfg, got, mode="fused"), ref, rel=RTOL, norm="max")
    weights = np.random.default_rng(4).standard_normal(ref.shape).astype(np.float32)
    theirs = _peft_grads(pm, weights)
    ours = _our_grads(config, lcfg, got, jnp.asarray(weights), tmp_path / "grads")
    if case == "tied_embedding_copy":  # the tied head's copy is the embedding's: one tensor
        ours.pop("base_model.model.lm_head.weight")
        theirs.pop("base_model.model.lm_head.weight", None)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert_close(ours[key], theirs[key], rel=GTOL, what=key)


def test_import_embedding_weights_peft_saves_alongside(llama, tmp_path):
    """PEFT saves the embedding table with an embedding adapter: equal to the base, ignored;
    different (trained elsewhere), loaded into the base, as PEFT does."""
    pm = _peft_adapter(llama, tmp_path / "peft", seed=5, target_modules=["embed_tokens", "q_proj"])
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert key in tensors
    config, params = llama.layouts[True]
    _, lcfg = import_peft(tmp_path / "peft", params, config)  # equal: no warning
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.warns(PeftFormatWarning, match="differs from the base"):
        got, lcfg = import_peft(tmp_path / "peft", params, config)
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.base_layer.weight.add_(0.01)
    assert_close(_ours(config, lcfg, got), torch_logits(pm), rel=RTOL, norm="max")


def test_import_refuses_what_a_tied_model_cannot_compute(qwen2, tmp_path):
    _peft_adapter(
        qwen2, tmp_path, seed=6, target_modules=["q_proj"], modules_to_save=["embed_tokens"]
    )
    config, params = qwen2.layouts[False]
    with pytest.raises(
        ValueError, match="tied embedding 'model.embed_tokens' without ensure_weight_tying"
    ):
        import_peft(tmp_path, params, config)


# --------------------------------------------------------------------------------------------
# A larger vocabulary


def test_resize_vocab_matches_transformers_mean_resizing(llama):
    config, params = llama.layouts[True]
    grown, cfg2 = resize_vocab(params, config, VOCAB + 5)
    assert cfg2.vocab_size == VOCAB + 5
    model = copy.deepcopy(llama.model)
    torch.manual_seed(0)
    model.resize_token_embeddings(VOCAB + 5, mean_resizing=True)
    emb = model.get_input_embeddings().weight.detach().numpy()
    head = model.get_output_embeddings().weight.detach().numpy()
    ours_emb = np.asarray(grown["model"]["embed_tokens"]["embedding"])
    ours_head = np.asarray(grown["lm_head"]["kernel"]).T
    np.testing.assert_array_equal(ours_emb[:VOCAB], emb[:VOCAB])
    np.testing.assert_array_equal(ours_head[:VOCAB], head[:VOCAB])
    # transformers samples N(mean, 1e-9 * covariance): the mean to ~3e-5 of the rows' spread.
    spread = float(np.linalg.norm(emb[:VOCAB].std(axis=0)))
    for ours, theirs in ((ours_emb, emb), (ours_head, head)):
        err = np.linalg.norm(ours[VOCAB:] - theirs[VOCAB:], axis=1).max()
        assert err < 1e-3 * spread


def test_trained_new_tokens_merge_into_a_grown_model(llama, tmp_path):
    """New rows trained as token rows; the merged export loads in transformers (new vocab)."""
    config, params = llama.layouts[False]
    new = list(range(VOCAB, VOCAB + 3))
    grown, cfg2 = resize_vocab(params, config, VOCAB + 3)
    lcfg = rl.LoraConfig(
        rank=2, targets=["v_proj"], trainable_token_indices={"embed_tokens": new, "lm_head": new}
    )
    trained = _moved(rl.init(grown, lcfg, jax.random.key(0)), seed=8, scale=0.3)
    ids = np.concatenate([IDS, np.asarray([new * 4], np.int64).repeat(2, 0)], axis=1)
    ours = rl.lora(LlamaForCausalLM(cfg2).apply, lcfg)({"params": trained}, jnp.asarray(ids))
    save_pretrained(tmp_path / "merged", rl.merge(trained, lcfg), cfg2)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert loaded.config.vocab_size == VOCAB + 3
    assert_close(np.asarray(ours), torch_logits(loaded, ids), rel=RTOL, norm="max")
