"""What LoRA alone cannot train (`rslora_jax.core.extras`): trained copies (modules_to_save,
biases), token rows, a bias on B, LoRA on the embedding table.

References are independent of the code under test: the merged tree is written out in numpy
from the formulas (copies replace leaves, rows are written into their table, ``E + s A@B``,
``bias + s b``, ``W + s A@B``), the forward of every mode must equal the plain model on that
tree, and the gradients must equal those of the plain model with respect to the merged leaves,
carried to the extras by the chain rule written in the test. PEFT on PyTorch is the reference
in tests/test_peft_extras.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax.core import extras as ex
from rslora_jax.hf import resize_vocab
from rslora_jax.models import LlamaConfig, LlamaForCausalLM, init_params
from rslora_jax.models.sharding import param_specs
from tests._asserts import assert_close

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
TOKENS = (1, 7, 30)
SCAN = {"model/layers/.*": "lio"}


def _config(**kw) -> LlamaConfig:
    return LlamaConfig.tiny(attention_bias=True, tie_word_embeddings=False, **kw)


FULL = dict(
    rank=2,
    alpha=3.0,
    targets=["q_proj", "v_proj", "embed_tokens"],
    modules_to_save=["model.norm", "post_attention_layernorm"],
    trainable_token_indices={"lm_head": list(TOKENS)},
    bias="all",
    lora_bias=True,
    kernel_axes=SCAN,
)


def _perturbed(params, seed: int, scale: float = 0.3):
    """Adapters (and extras) moved away from their initial values, as by training."""
    adapters, base = rl.split(params)
    rng = np.random.default_rng(seed)
    moved = jax.tree.map(
        lambda x: x + scale * jnp.asarray(rng.standard_normal(x.shape), x.dtype), adapters
    )
    return rl.combine(moved, base)


@pytest.fixture(scope="module")
def full():
    cfg = _config()
    base = init_params(cfg, jax.random.key(0))
    lcfg = rl.LoraConfig(**FULL)
    params = _perturbed(rl.init(base, lcfg, jax.random.key(1)), seed=2)
    return cfg, base, lcfg, params


# ----------------------------------------------------------------------------- the formulas
def _np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _expected_merge(params, lcfg: rl.LoraConfig) -> dict:
    """The merged tree, written out in numpy (float64) from the formulas."""
    out = jax.tree.map(_np, rl.split(params)[1])
    m, ad = out["model"], params["model"]
    layers = ad["layers"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        h = layers["self_attn"][name]
        s = lcfg.scale_for(f"model/layers/self_attn/{name}")
        target = m["layers"]["self_attn"][name]
        target["bias"] = _np(h["lora_full"]["bias"])  # bias="all": every bias is a copy
        if "lora_a" in h:
            ab = np.einsum("lir,lro->lio", _np(h["lora_a"]), _np(h["lora_b"]))
            target["kernel"] = _np(h["kernel"]) + s * ab
            target["bias"] = target["bias"] + s * _np(h["lora_bias"])
    post = layers["post_attention_layernorm"]["lora_full"]["scale"]
    m["layers"]["post_attention_layernorm"]["scale"] = _np(post)
    m["norm"]["scale"] = _np(ad["norm"]["lora_full"]["scale"])
    emb = ad["embed_tokens"]
    s_e = lcfg.scale_for("model/embed_tokens")
    m["embed_tokens"]["embedding"] = _np(emb["embedding"]) + s_e * _np(
        emb["lora_embedding_a"]
    ) @ _np(emb["lora_embedding_b"])
    head = _np(params["lm_head"]["kernel"])
    head[:, list(TOKENS)] = _np(params["lm_head"]["lora_tokens"]["kernel"])
    out["lm_head"]["kernel"] = head
    return out


def test_init_keeps_the_output_and_copies_the_base():
    cfg = _config()
    base = init_params(cfg, jax.random.key(0))
    lcfg = rl.LoraConfig(**FULL)
    params = rl.init(base, lcfg, jax.random.key(1))
    adapters, rest = rl.split(params)
    assert jax.tree.structure(rest) == jax.tree.structure(base)
    shapes = jax.tree.map(jnp.shape, adapters)
    assert shapes["lm_head"] == {"lora_tokens": {"kernel": (32, 3)}}
    assert shapes["model"]["embed_tokens"] == {
        "lora_embedding_a": (64, 2),
        "lora_embedding_b": (2, 32),
    }
    assert shapes["model"]["norm"] == {"lora_full": {"scale": (32,)}}
    q = shapes["model"]["layers"]["self_attn"]["q_proj"]
    assert q == {"lora_a": (2, 32, 2), "lora_b": (2, 2, 32), "lora_bias": (2, 32),
                 "lora_full": {"bias": (2, 32)}}  # fmt: skip
    assert "lora_full" in shapes["model"]["layers"]["self_attn"]["k_proj"]  # bias="all"
    # Copies and rows start at the base's values, the embedding A and bias on B at zero.
    np.testing.assert_array_equal(
        adapters["model"]["norm"]["lora_full"]["scale"], base["model"]["norm"]["scale"]
    )
    np.testing.assert_array_equal(
        adapters["lm_head"]["lora_tokens"]["kernel"], base["lm_head"]["kernel"][:, list(TOKENS)]
    )
    assert not np.any(adapters["model"]["embed_tokens"]["lora_embedding_a"])
    assert np.std(np.asarray(adapters["model"]["embed_tokens"]["lora_embedding_b"])) > 0.5
    model = LlamaForCausalLM(cfg)
    y0 = model.apply({"params": base}, IDS)
    for mode in ("factored", "merged"):
        assert_close(rl.lora(model.apply, lcfg, mode)({"params": params}, IDS), y0, rel=1e-6)
    # split / combine are exact inverses with the extras.
    again = rl.combine(*rl.split(params))
    assert jax.tree.structure(again) == jax.tree.structure(params)


def test_merge_and_every_mode_match_the_formulas(full):
    cfg, _, lcfg, params = full
    want = _expected_merge(params, lcfg)
    merged = jax.jit(rl.merge, static_argnums=1)(params, lcfg)
    assert_close(merged, want, rel=1e-6)
    model = LlamaForCausalLM(cfg)
    ref = model.apply({"params": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), want)}, IDS)
    base_out = model.apply({"params": rl.split(params)[1]}, IDS)
    assert np.abs(np.asarray(ref - base_out)).max() > 1e-2  # the extras matter
    for mode in ("factored", "fused", "auto"):  # "merged" runs the merge above
        out = jax.jit(rl.lora(model.apply, lcfg, mode))({"params": params}, IDS)
        assert_close(out, ref, rel=1e-5, norm="max", what=mode)


def test_gradients_reach_exactly_the_extras(full):
    """d loss / d extras by the chain rule from the plain model's gradient at the merged tree."""
    cfg, _, lcfg, params = full
    model = LlamaForCausalLM(cfg)
    weights = jnp.asarray(np.random.default_rng(3).standard_normal((2, 7, 64)), jnp.float32)
    adapters, base = rl.split(params)

    def loss(ad):
        logits = rl.lora(model.apply, lcfg, "factored")({"params": rl.combine(ad, base)}, IDS)
        return jnp.sum(logits * weights)

    grads = jax.grad(loss)(adapters)
    merged = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _expected_merge(params, lcfg))
    g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, IDS) * weights))(merged)
    gm, ga = g["model"], grads["model"]
    sa = ga["layers"]["self_attn"]
    for name in ("q_proj", "v_proj"):
        s = lcfg.scale_for(f"model/layers/self_attn/{name}")
        a = params["model"]["layers"]["self_attn"][name]["lora_a"]
        b = params["model"]["layers"]["self_attn"][name]["lora_b"]
        gw, gb = gm["layers"]["self_attn"][name]["kernel"], gm["layers"]["self_attn"][name]["bias"]
        assert_close(sa[name]["lora_a"], s * jnp.einsum("lio,lro->lir", gw, b), rel=1e-4)
        assert_close(sa[name]["lora_b"], s * jnp.einsum("lir,lio->lro", a, gw), rel=1e-4)
        assert_close(sa[name]["lora_full"]["bias"], gb, rel=1e-4)
        assert_close(sa[name]["lora_bias"], s * gb, rel=1e-4)
    assert_close(
        sa["k_proj"]["lora_full"]["bias"], gm["layers"]["self_attn"]["k_proj"]["bias"], rel=1e-4
    )
    assert_close(ga["norm"]["lora_full"]["scale"], gm["norm"]["scale"], rel=1e-4)
    assert_close(
        ga["layers"]["post_attention_layernorm"]["lora_full"]["scale"],
        gm["layers"]["post_attention_layernorm"]["scale"],
        rel=1e-4,
    )
    assert_close(
        grads["lm_head"]["lora_tokens"]["kernel"], g["lm_head"]["kernel"][:, list(TOKENS)], rel=1e-4
    )
    emb = params["model"]["embed_tokens"]
    s_e = lcfg.scale_for("model/embed_tokens")
    ge = gm["embed_tokens"]["embedding"]  # untied: the table is only looked up
    assert_close(
        ga["embed_tokens"]["lora_embedding_a"], s_e * ge @ emb["lora_embedding_b"].T, rel=1e-4
    )
    assert_close(
        ga["embed_tokens"]["lora_embedding_b"], s_e * emb["lora_embedding_a"].T @ ge, rel=1e-4
    )


def test_tied_table_rows_and_copies():
    """Token ids as a list: rows of the only table, read by the tied output layer too."""
    cfg = LlamaConfig.tiny(tie_word_embeddings=True)
    base = init_params(cfg, jax.random.key(4))
    lcfg = rl.LoraConfig(
        rank=2, targets=["o_proj"], trainable_token_indices=list(TOKENS),
        modules_to_save=["model.norm"], kernel_axes=SCAN,
    )  # fmt: skip
    params = _perturbed(rl.init(base, lcfg, jax.random.key(5)), seed=6)
    table = np.asarray(base["model"]["embed_tokens"]["embedding"], np.float64)
    table[list(TOKENS)] = np.asarray(params["model"]["embed_tokens"]["lora_tokens"]["embedding"])
    merged = jax.jit(rl.merge, static_argnums=1)(params, lcfg)
    assert_close(merged["model"]["embed_tokens"]["embedding"], table, rel=1e-7)
    assert_close(
        merged["model"]["norm"]["scale"], params["model"]["norm"]["lora_full"]["scale"], rel=0
    )
    model = LlamaForCausalLM(cfg)
    ref = model.apply({"params": merged}, IDS)
    out = rl.lora(model.apply, lcfg, "fused")({"params": params}, IDS)
    assert_close(out, ref, rel=1e-5, norm="max")


@pytest.mark.loose_dtypes  # optax's Adam mixes int and float in its bias correction
def test_optimizer_state_only_for_adapters_and_extras(full):
    params = full[3]
    opt = rl.optimizer(optax.adam(1e-2), params)
    state = opt.init(params)  # the whole tree: frozen leaves get no state
    sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "ndim") and x.ndim > 0)
    assert sizes == 2 * rl.num_adapter_params(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, state, params)
    moved = {
        jax.tree_util.keystr(p)
        for p, u in jax.tree_util.tree_leaves_with_path(updates)
        if jnp.any(u)
    }
    trained = {
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(params)
        if rl.is_adapter_path(p)
    }
    assert moved == trained
    # LoRA+: biases on B and copies of 1-D parameters are "fast" (PEFT's rule), rows are not.
    labels = rl.lora_plus_labels(params)
    q = labels["model"]["layers"]["self_attn"]["q_proj"]
    assert (q["lora_bias"], q["lora_full"]["bias"], q["lora_a"]) == ("fast", "fast", "other")
    assert labels["lm_head"]["lora_tokens"]["kernel"] == "other"
    assert labels["model"]["embed_tokens"]["lora_embedding_b"] == "other"


@pytest.mark.loose_dtypes
def test_checkpoint_resume_is_exact(full, tmp_path):
    cfg, _, lcfg, params = full
    model = LlamaForCausalLM(cfg)
    adapters, base = rl.split(params)
    opt = rl.optimizer(optax.adam(1e-2))

    @jax.jit
    def step(ad, st):
        def loss(a):
            logits = rl.lora(model.apply, lcfg, "factored")({"params": rl.combine(a, base)}, IDS)
            return jnp.mean(logits**2)

        upd, st = opt.update(jax.grad(loss)(ad), st, ad)
        return optax.apply_updates(ad, upd), st

    state = opt.init(adapters)
    ad, st = step(adapters, state)
    with rl.CheckpointManager(tmp_path / "ckpt", config=lcfg) as mngr:
        mngr.save(1, rl.combine(ad, base), st)
        straight = step(*step(ad, st))
        restored, st2, at, _ = mngr.restore(base, jax.eval_shape(opt.init, adapters))
    assert at == 1
    resumed = step(*step(rl.split(restored)[0], st2))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rl.save_adapters(tmp_path / "adapters", params, lcfg)
    loaded, got = rl.load_adapters(tmp_path / "adapters", base)
    assert got == lcfg
    for a, b in zip(jax.tree.leaves(rl.split(loaded)[0]), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Rows and copies are checked against the leaves they replace before anything is read.
    grown, _ = resize_vocab(base, cfg, 70)
    with pytest.raises(rl.CheckpointError, match=r"'lm_head/kernel'.*\(32, 64\).*\(32, 70\)"):
        rl.load_adapters(tmp_path / "adapters", grown)


def test_sharding_specs_follow_the_leaves_they_change(full):
    cfg, _, lcfg, params = full
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "model"))
    base_specs = param_specs(jax.eval_shape(lambda: rl.split(params)[1]), mesh.axis_names)
    specs = rl.partition_specs(params, base_specs, lcfg)
    m = specs["model"]
    q = m["layers"]["self_attn"]["q_proj"]
    assert q["lora_full"]["bias"] == base_specs["model"]["layers"]["self_attn"]["q_proj"]["bias"]
    assert q["lora_bias"] == P(None, "model")  # the output features' spec
    assert m["norm"]["lora_full"]["scale"] == P()
    assert specs["lm_head"]["lora_tokens"]["kernel"] == P("fsdp", None)  # tokens replicated
    assert m["embed_tokens"]["lora_embedding_a"] == P("model", None)  # the vocabulary's spec
    assert m["embed_tokens"]["lora_embedding_b"] == P(None, "fsdp")  # the features' spec
    # A sharded forward with these specs computes the same logits.
    model = LlamaForCausalLM(cfg)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    apply = jax.jit(rl.lora(model.apply, lcfg, "factored"))
    sharded = apply({"params": jax.device_put(params, shardings)}, IDS)
    assert_close(sharded, apply({"params": params}, IDS), rel=1e-5, norm="max")


def test_unmerge_inverts_where_it_can():
    cfg = _config()
    base = init_params(cfg, jax.random.key(7))
    lcfg = rl.LoraConfig(
        rank=2, targets=["q_proj", "embed_tokens"], lora_bias=True, kernel_axes=SCAN
    )
    params = _perturbed(rl.init(base, lcfg, jax.random.key(8)), seed=9)
    merged = rl.merge(params, lcfg)
    back = rl.unmerge(merged, params, lcfg)
    # float32 rounding of E + s*A@B - s*A@B, where s*A@B is some times larger than E.
    assert_close(back, base, rel=2e-5)
    copies = rl.LoraConfig(
        rank=2, targets=["q_proj"], modules_to_save=["model.norm"], kernel_axes=SCAN
    )
    params = rl.init(base, copies, jax.random.key(8))
    with pytest.raises(ValueError, match="cannot recover the base values.*model/norm/lora_full"):
        rl.unmerge(rl.merge(params, copies), params, copies)


def test_lora_bias_needs_a_layer_bias_to_merge():
    cfg = LlamaConfig.tiny()
    base = init_params(cfg, jax.random.key(0))
    lcfg = rl.LoraConfig(rank=2, targets=["o_proj"], lora_bias=True, kernel_axes=SCAN)
    params = rl.init(base, lcfg, jax.random.key(1))
    with pytest.raises(ValueError, match="lora_bias.*'model/layers/self_attn/o_proj'.*no bias"):
        rl.merge(params, lcfg)
    # ... but the unmerged forward adds it: y + s * b.
    params = _perturbed(params, seed=1)
    model = LlamaForCausalLM(cfg)
    assert_close(
        rl.lora(model.apply, lcfg, "factored")({"params": params}, IDS),
        rl.lora(model.apply, lcfg, "fused")({"params": params}, IDS),
        rel=1e-5,
        norm="max",
    )


# ----------------------------------------------------------------------------- config, plan
def test_config_fields_round_trip_and_validate():
    cfg = rl.LoraConfig(
        modules_to_save=["lm_head", "model.norm"], trainable_token_indices={"embed_tokens": [3, 1]},
        bias="lora_only", lora_bias=True,
    )  # fmt: skip
    assert cfg.modules_to_save == ("lm_head", "model/norm")
    assert cfg.trainable_token_indices == (("embed_tokens", (3, 1)),)
    assert rl.LoraConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)
    assert rl.LoraConfig.from_dict(
        rl.LoraConfig(trainable_token_indices=[5]).to_dict()
    ).trainable_token_indices == (5,)
    assert rl.LoraConfig().to_dict()["trainable_token_indices"] is None
    bad = {
        "bias": (dict(bias="some"), r"LoraConfig.bias must be one of"),
        "lora_bias": (dict(lora_bias=1), r"LoraConfig.lora_bias must be true or false"),
        "dora_bias": (dict(lora_bias=True, method="dora"), r"lora_bias=True works with LoRA only"),
        "pissa_bias": (dict(lora_bias=True, init="pissa"), r"lora_bias=True cannot.*pissa"),
        "names": (dict(modules_to_save="lm_head"), r"modules_to_save must be a list"),
        "dup": (dict(trainable_token_indices=[1, 1]), r"lists token ids more than once: \[1\]"),
        "neg": (dict(trainable_token_indices=[-1]), r"-1 is not a token id"),
        "empty": (dict(trainable_token_indices={"e": []}), r"non-empty list of token ids"),
    }
    for kwargs, match in bad.values():
        with pytest.raises(ValueError, match=match):
            rl.LoraConfig(**kwargs)


PLAN_ERRORS = {
    "nothing": (dict(modules_to_save=["classifier"]), r"'classifier' selects no module.*'lm_head'"),
    "nested": (
        dict(modules_to_save=["mlp", "down_proj"]),
        r"selects 'model/layers/mlp/down_proj' inside 'model/layers/mlp'",
    ),
    "lora_inside": (
        dict(targets="all-linear", modules_to_save=["self_attn"]),
        r"both a LoRA target and inside",
    ),
    "range": (dict(trainable_token_indices=[64]), r"token ids \[64\] are out of range.*add_tokens"),
    "both": (
        dict(targets=["q_proj", "embed_tokens"], trainable_token_indices=[3]),
        r"both LoRA .* and trainable tokens",
    ),
    "tokens_saved": (
        dict(trainable_token_indices=[3], modules_to_save=["embed_tokens"]),
        r"in LoraConfig.modules_to_save .* and has trainable tokens",
    ),
    "tied_head": (
        dict(trainable_token_indices={"lm_head": [3]}),
        r"'lm_head' selects no embedding.*tied",
        "tied",
    ),
    "rank": (
        dict(rank=40, targets=["embed_tokens"], rank_pattern={}),
        r"rank 40 at the embedding table",
    ),
}


@pytest.mark.parametrize("case", sorted(PLAN_ERRORS))
def test_plan_errors(case):
    kwargs, match, *tied = PLAN_ERRORS[case]
    cfg = LlamaConfig.tiny(tie_word_embeddings=bool(tied))
    base = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    kwargs = {"rank": 2, "kernel_axes": SCAN, "targets": ["q_proj"], **kwargs}
    with pytest.raises(ValueError, match=match):
        ex.plan(base, rl.LoraConfig(**kwargs))


def test_abstract_params_plan_and_traced_init():
    """The plan reads shapes only; values are read under a trace with params as an argument."""
    cfg = _config()
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    lcfg = rl.LoraConfig(**FULL)
    assert ex.plan(abstract, lcfg).any
    shapes = jax.eval_shape(lambda p: rl.init_adapters(p, lcfg, jax.random.key(0)), abstract)
    assert shapes["lm_head"]["lora_tokens"]["kernel"].shape == (32, 3)
    with pytest.raises(ValueError, match="copies the base's values, but the params are abstract"):
        rl.init_adapters(abstract, lcfg, jax.random.key(0))


def test_embedding_only_targets_and_nnx_refusal():
    cfg = _config()
    base = init_params(cfg, jax.random.key(0))
    lcfg = rl.LoraConfig(rank=2, targets=["embed_tokens"])
    params = rl.init(base, lcfg, jax.random.key(1))
    assert rl.adapter_paths(params) == []  # no kernel is adapted
    assert set(params["model"]["embed_tokens"]) == {
        "embedding",
        "lora_embedding_a",
        "lora_embedding_b",
    }
    # "all-linear" never selects an embedding table, as in PEFT.
    assert (
        "lora_embedding_a"
        not in rl.init(base, rl.LoraConfig(rank=2, kernel_axes=SCAN), jax.random.key(1))["model"][
            "embed_tokens"
        ]
    )
    from flax import nnx

    import rslora_jax.nnx

    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="add_adapters does not implement modules_to_save"):
        rslora_jax.nnx.add_adapters(layer, rl.LoraConfig(rank=2, bias="all"), jax.random.key(0))
