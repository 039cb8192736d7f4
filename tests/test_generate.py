"""Generation (`rslora_jax.generate`) against transformers' and PEFT's ``generate`` (PyTorch, CPU).

References:

- greedy tokens and every step's logits from transformers' ``generate`` (its own key/value
  cache, eager attention, float32) on tiny random checkpoints of each family (Llama with
  Llama-3 RoPE and biases, Mistral with a sliding window shorter than the prompts, Qwen2 with
  tied embeddings, and the cases of ``tests/test_families.py``: Gemma 2 with soft caps and
  alternating windows, Gemma 3 with local/global RoPE, Qwen3 with q/k norms, Phi-3 with fused
  projections and LongRoPE switching from short to long factors during generation, Qwen2 with
  mixed layers), with no adapter, with a PEFT adapter run by PEFT (Llama; Phi-3 through its
  fused ``qkv_proj``/``gate_up_proj``), and with our merged export loaded by transformers; each
  prompt alone on the PyTorch side, all together on ours;
- every step's logits against our own forward pass without a cache over the sequence so far;
- a batch of several adapters against each adapter alone, a mesh of 8 devices against one;
- transformers' logits warpers (temperature, top-k, top-p) for the sampling filters.
"""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax.generate import Generation, SamplingConfig, filter_logits, generate, loop
from rslora_jax.hf import import_peft, load_pretrained, save_pretrained
from rslora_jax.models import (
    DecoderForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    init_params,
    param_specs,
)
from rslora_jax.ops.stack import stack_adapters
from tests._asserts import assert_close
from tests._torch_ref import TINY, VOCAB, family_hf_config, sharpened, torch_model

RTOL = 1e-5  # logits: max |ours - reference| / max |reference|
NEW = 6
PROMPTS = [[int(t) for t in np.random.default_rng(n).integers(0, VOCAB, n)] for n in (3, 11, 7)]
WIDTH = max(len(p) for p in PROMPTS) + NEW
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **TINY, rope_scaling=dict(LLAMA3_ROPE), attention_bias=True, mlp_bias=True
    ),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=5, head_dim=16),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    # tests/test_families.py's cases; their query/key weights sharpened so that windows,
    # soft caps and RoPE variants change the tokens.
    **{
        case: functools.partial(family_hf_config, case)
        for case in ("gemma2", "gemma3", "qwen3", "phi3", "qwen2_mixed")
    },
}


def _hf_generate(model, prompt: list[int], new: int = NEW) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits of each step, from transformers' generate (one prompt)."""
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logits = np.stack([x[0].float().numpy() for x in out.logits])
    return tokens, logits


def _check_against_hf(ours: Generation, model) -> None:
    for i, prompt in enumerate(PROMPTS):
        tokens, logits = _hf_generate(model, prompt)
        assert ours.tokens[i].tolist() == tokens, f"prompt {i}"
        assert_close(ours.logits[i], logits, rel=RTOL, norm="max", what=f"prompt {i} logits")


def _full_forward_logits(forward, params, prompt: list[int], new: list[int]) -> np.ndarray:
    """Logits that predicted each new token, each from a forward pass without a cache over the
    sequence so far (`forward`: a jitted apply). The sequences are right-padded to `WIDTH` (one
    compilation) with padding at position 0, which changes nothing before it: attention is
    causal in sequence order and LongRoPE's choice follows the largest position."""
    out = []
    for j in range(len(new)):
        seq = prompt + new[:j]
        n = len(seq)
        ids = np.zeros((1, WIDTH), np.int32)
        ids[0, :n] = seq
        positions = np.zeros((1, WIDTH), np.int32)
        positions[0, :n] = np.arange(n)
        logits = forward({"params": params}, ids, positions)
        out.append(np.asarray(logits[0, n - 1], np.float32))
    return np.stack(out)


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def family(request, tmp_path_factory):
    model = torch_model(HF_CONFIGS[request.param]())
    model = _no_eos(model if request.param in ("llama", "mistral", "qwen2") else sharpened(model))
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    config, params = load_pretrained(directory)
    return SimpleNamespace(name=request.param, torch=model, config=config, params=params)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The plain Llama checkpoint with a PEFT adapter (random A and B) trained on PyTorch."""
    base = _no_eos(torch_model(transformers.LlamaConfig(**TINY), seed=3))
    directory = tmp_path_factory.mktemp("llama")
    base.save_pretrained(directory)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    pm = peft.get_peft_model(copy.deepcopy(base), lora)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    pm.eval().save_pretrained(str(directory / "peft"))
    config, base_params = load_pretrained(directory)
    params, lora_config = import_peft(directory / "peft", base_params, config)
    return SimpleNamespace(
        dir=directory,
        torch=base,
        peft=pm,
        config=config,
        base=base_params,
        params=params,
        lora_config=lora_config,
    )


@pytest.fixture(scope="module")
def with_adapter(llama):
    """Our greedy generation with the PEFT adapter applied factored (all prompts at once)."""
    model = LlamaForCausalLM(llama.config)
    sampling = SamplingConfig(max_new_tokens=NEW)
    return generate(
        model,
        llama.params,
        PROMPTS,
        sampling,
        lora_config=llama.lora_config,
        return_logits=True,
    )


# --------------------------------------------------------------------------------------------
# Greedy decoding against transformers and PEFT


def test_greedy_matches_transformers(family):
    out = generate(
        DecoderForCausalLM(family.config),
        family.params,
        PROMPTS,
        SamplingConfig(max_new_tokens=NEW),
        return_logits=True,
    )
    _check_against_hf(out, family.torch)
    assert out.lengths.tolist() == [NEW] * len(PROMPTS) and not out.stopped.any()
    # Each step's logits (through the cache) = a forward pass without cache over the sequence.
    forward = jax.jit(DecoderForCausalLM(family.config).apply)
    for i, prompt in enumerate(PROMPTS):
        full = _full_forward_logits(forward, family.params, prompt, out.tokens[i].tolist())
        assert_close(out.logits[i], full, rel=RTOL, norm="max", what=f"prompt {i}")


def test_peft_adapter_matches_peft_generate(llama, with_adapter):
    _check_against_hf(with_adapter, llama.peft)
    base_tokens = [_hf_generate(llama.torch, p)[0] for p in PROMPTS]
    assert with_adapter.tokens.tolist() != base_tokens  # the adapter changes the text
    apply = rl.lora(LlamaForCausalLM(llama.config).apply, llama.lora_config, mode="factored")
    forward = jax.jit(apply)
    for i, prompt in enumerate(PROMPTS):
        full = _full_forward_logits(forward, llama.params, prompt, with_adapter.tokens[i].tolist())
        assert_close(with_adapter.logits[i], full, rel=RTOL, norm="max", what=f"prompt {i}")


def test_merged_export_matches_transformers(llama, with_adapter, tmp_path):
    merged = rl.merge(llama.params, llama.lora_config)
    save_pretrained(tmp_path, merged, llama.config)
    hf = _no_eos(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ).eval()
    for i, prompt in enumerate(PROMPTS):
        assert _hf_generate(hf, prompt)[0] == with_adapter.tokens[i].tolist(), f"prompt {i}"
    # Our sampler on the merged tree (no adapter leaves: the plain model) agrees too.
    out = generate(
        LlamaForCausalLM(llama.config), merged, PROMPTS, SamplingConfig(max_new_tokens=NEW)
    )
    assert out.tokens.tolist() == with_adapter.tokens.tolist()


def test_phi3_fused_peft_adapters_match_peft_generate(tmp_path):
    """Phi-3 adapters that PEFT trained on its fused ``qkv_proj``/``gate_up_proj``: each alone,
    and both in one batch (per-row adapters on the split projections), give PEFT's tokens and
    logits, while LongRoPE switches from short to long factors during generation."""
    base_model = _no_eos(sharpened(torch_model(family_hf_config("phi3"))))
    base_model.save_pretrained(tmp_path)
    config, base = load_pretrained(tmp_path)
    refs, trees = [], []
    for seed in (1, 2):
        pcfg = peft.LoraConfig(
            r=4,
            lora_alpha=6,
            target_modules="all-linear",
            use_rslora=True,
            init_lora_weights=False,  # random A and B: the adapter changes the text
        )
        torch.manual_seed(seed)
        pm = peft.get_peft_model(copy.deepcopy(base_model), pcfg).eval()
        pm.save_pretrained(str(tmp_path / f"peft{seed}"))
        refs.append(pm)
        params, lora_config = import_peft(tmp_path / f"peft{seed}", base, config)
        trees.append(params)
    sampling = SamplingConfig(max_new_tokens=NEW)
    model = DecoderForCausalLM(config)
    one = generate(model, trees[0], PROMPTS, sampling, lora_config=lora_config, return_logits=True)
    _check_against_hf(one, refs[0])
    rows = [1, 0, 1]
    stacked = rl.combine(stack_adapters(trees, lora_config), base)
    mixed = generate(
        model,
        stacked,
        PROMPTS,
        sampling,
        lora_config=lora_config,
        adapter_index=rows,
        return_logits=True,
    )
    for i, (prompt, r) in enumerate(zip(PROMPTS, rows)):
        tokens, logits = _hf_generate(refs[r], prompt)
        assert mixed.tokens[i].tolist() == tokens, f"row {i}"
        assert_close(mixed.logits[i], logits, rel=RTOL, norm="max", what=f"row {i}")


# --------------------------------------------------------------------------------------------
# Rows of a batch, several adapters, a mesh


def test_batch_rows_equal_one_prompt_at_a_time(llama, with_adapter):
    model = LlamaForCausalLM(llama.config)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(
            model,
            llama.params,
            [prompt],
            SamplingConfig(max_new_tokens=NEW),
            lora_config=llama.lora_config,
            return_logits=True,
        )
        assert alone.tokens[0].tolist() == with_adapter.tokens[i].tolist()
        assert_close(alone.logits[0], with_adapter.logits[i], rel=RTOL, norm="max")


def _random_adapters(base, lora_config, seed: int):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: rl.init_adapters(base, lora_config, jax.random.key(0)))
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama (4 K/V heads, so that a 4-way model axis splits the cache) and three
    random LoRA adapters."""
    config = LlamaConfig.tiny(num_key_value_heads=4, vocab_size=VOCAB)
    base = init_params(config, jax.random.key(0))
    lc = rl.LoraConfig(rank=4, targets="all-linear", kernel_axes={"model/layers/.*": "lio"})
    adapters = [_random_adapters(base, lc, seed) for seed in range(3)]
    return SimpleNamespace(config=config, base=base, lora_config=lc, adapters=adapters)


def test_mixed_adapter_batch_equals_one_adapter_at_a_time(tiny):
    model = LlamaForCausalLM(tiny.config)
    prompts = [p[:5] for p in PROMPTS] + [PROMPTS[1]]
    rows = [2, 0, 1, 0]
    sampling = SamplingConfig(max_new_tokens=NEW)
    stacked = rl.combine(stack_adapters(tiny.adapters, tiny.lora_config), tiny.base)
    mixed = generate(
        model,
        stacked,
        prompts,
        sampling,
        lora_config=tiny.lora_config,
        adapter_index=rows,
        return_logits=True,
    )
    for i, (prompt, r) in enumerate(zip(prompts, rows)):
        alone = generate(
            model,
            rl.combine(tiny.adapters[r], tiny.base),
            [prompt],
            sampling,
            lora_config=tiny.lora_config,
            return_logits=True,
        )
        assert mixed.tokens[i].tolist() == alone.tokens[0].tolist(), f"row {i}"
        assert_close(mixed.logits[i], alone.logits[0], rel=RTOL, norm="max", what=f"row {i}")
    assert mixed.tokens[1].tolist() != mixed.tokens[0].tolist()  # other adapter, other text


def test_sharded_decode_equals_one_device(tiny):
    params = rl.combine(tiny.adapters[1], tiny.base)
    model = LlamaForCausalLM(tiny.config)
    sampling = SamplingConfig(max_new_tokens=NEW, temperature=0.7, top_k=20)
    key = jax.random.key(4)
    prompts = [*PROMPTS, PROMPTS[0][:2]]
    one = generate(
        model, params, prompts, sampling, lora_config=tiny.lora_config, key=key, return_logits=True
    )
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    base_specs = param_specs(tiny.base, mesh.axis_names)
    specs = rl.partition_specs(params, base_specs, tiny.lora_config)
    placed = jax.device_put(
        params,
        jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)),
    )
    q = placed["model"]["layers"]["self_attn"]["q_proj"]
    assert q["kernel"].sharding.spec == P(None, None, "model")
    assert q["lora_b"].sharding.spec == P(None, None, "model")
    many = generate(
        model,
        placed,
        prompts,
        sampling,
        lora_config=tiny.lora_config,
        key=key,
        mesh=mesh,
        return_logits=True,
    )
    assert many.tokens.tolist() == one.tokens.tolist()
    assert_close(many.logits, one.logits, rel=RTOL, norm="max")


# --------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    model = LlamaForCausalLM(tiny.config)
    params = tiny.base
    hot = SamplingConfig(max_new_tokens=12, temperature=1.5)
    a = generate(model, params, PROMPTS, hot, key=jax.random.key(0))
    b = generate(model, params, PROMPTS, hot, key=jax.random.key(0))
    c = generate(model, params, PROMPTS, hot, key=jax.random.key(1))
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.tokens.tolist() != c.tokens.tolist()
    # A row's draws depend on its own key only: the second prompt alone, with its row's key.
    alone = generate(
        model, params, [PROMPTS[1]], hot, key=jax.random.fold_in(jax.random.key(0), 1)[None]
    )
    assert alone.tokens[0].tolist() == a.tokens[1].tolist()
    greedy = generate(model, params, PROMPTS, SamplingConfig(max_new_tokens=12))
    top1 = generate(
        model,
        params,
        PROMPTS,
        SamplingConfig(max_new_tokens=12, temperature=1.5, top_k=1),
        key=jax.random.key(2),
    )
    assert top1.tokens.tolist() == greedy.tokens.tolist()


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 7, 0.6)]
)
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
    scores = torch.as_tensor(logits)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = scores.numpy()
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(filter_logits(jnp.asarray(logits), sampling))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    kept = np.isfinite(ref)
    assert_close(ours[kept], ref[kept], rel=1e-6, norm="max")
    assert kept.sum(axis=1).min() >= 1


def test_stop_tokens_end_rows(tiny):
    model = LlamaForCausalLM(tiny.config)
    free = generate(model, tiny.base, PROMPTS, SamplingConfig(max_new_tokens=NEW))
    stop = int(free.tokens[1, 2])  # the third token of the second row
    out = generate(
        model,
        tiny.base,
        PROMPTS,
        SamplingConfig(max_new_tokens=NEW, stop_tokens=(stop,), pad_token=63),
    )
    for i, row in enumerate(free.tokens.tolist()):
        n = row.index(stop) + 1 if stop in row else NEW
        assert out.lengths[i] == n and bool(out.stopped[i]) == (stop in row)
        assert out.tokens[i, :n].tolist() == row[:n]
        assert out.tokens[i, n:].tolist() == [63] * (NEW - n)
        assert out.completions()[i] == row[:n]


# --------------------------------------------------------------------------------------------
# Bad input: clear errors before anything is compiled


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0: expected an integer >= 1"),
        ({"max_new_tokens": -3}, "max_new_tokens=-3"),
        ({"temperature": -0.1}, r"temperature=-0.1: expected a finite number >= 0"),
        ({"top_p": 0.0}, r"top_p=0.0: expected a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"stop_tokens": (-2,)}, "stop_tokens"),
    ],
)
def test_bad_sampling_settings(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**fields)


def test_bad_input_raises_before_compiling(tiny, monkeypatch):
    def compile_nothing(*args, **kwargs):
        raise AssertionError("compiled before checking the input")

    monkeypatch.setattr(loop, "_program", compile_nothing)
    model = LlamaForCausalLM(tiny.config)  # 128 positions, vocabulary 96
    adapted = rl.combine(tiny.adapters[0], tiny.base)
    stacked = rl.combine(stack_adapters(tiny.adapters[:2], tiny.lora_config), tiny.base)
    s = SamplingConfig(max_new_tokens=4)
    cases = [
        (dict(params=tiny.base, prompts=[[1] * 129]), "129 tokens, more than the model's 128"),
        (dict(params=tiny.base, prompts=[[1] * 126]), "lower max_new_tokens to 2 or less"),
        (dict(params=tiny.base, prompts=[[]]), r"prompts\[0\]: expected a non-empty"),
        (dict(params=tiny.base, prompts=[[1, 96]]), "token id 96 is outside"),
        (dict(params=tiny.base, prompts="abc"), "non-empty list"),
        (dict(params=adapted, prompts=[[1]]), "pass their lora_config"),
        (
            dict(params=tiny.base, prompts=[[1]], sampling=SamplingConfig(temperature=1.0)),
            "needs a PRNG key",
        ),
        (
            dict(params=tiny.base, prompts=[[1]], sampling=SamplingConfig(stop_tokens=(99,))),
            "token id 99",
        ),
        (
            dict(
                params=stacked,
                prompts=[[1], [2]],
                lora_config=tiny.lora_config,
                adapter_index=[0, 2],
            ),
            r"outside \[0, 2\)",
        ),
        (
            dict(
                params=stacked, prompts=[[1], [2]], lora_config=tiny.lora_config, adapter_index=[0]
            ),
            "expected 2 integers",
        ),
        (
            dict(params=adapted, prompts=[[1]], lora_config=tiny.lora_config, adapter_index=[0]),
            "are not stacked",
        ),
    ]
    for kwargs, match in cases:
        kwargs.setdefault("sampling", s)
        with pytest.raises(ValueError, match=match):
            generate(model, **kwargs)
