"""RaSA: the paper's parameter count and rank, forward == merge == a numpy formula (unscanned and
scanned), the reconstruction claim, and the core machinery (optimizer, sharding, checkpoints)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from tests._asserts import assert_close

KEY = jax.random.key(0)
D = 8  # model width
LAYERS = 3


# ---------------------------------------------------------------------------- models
class Block(nn.Module):
    """A Llama-like block: attention q/o projections and an MLP up/down, all Dense."""

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(12, name="q_proj")(x)
        x = x + nn.Dense(D, name="o_proj")(jnp.tanh(h))
        h = nn.Dense(16, use_bias=True, name="up_proj")(x)
        return x + nn.Dense(D, name="down_proj")(nn.gelu(h)), None


class LayerList(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x, _ = Block(name=str(i))(x)
        return x


class Unscanned(nn.Module):
    """Paths model/layers/<i>/{q_proj,...} as in a Hugging Face Llama."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        x = LayerList(name="layers")(x)
        return nn.Dense(5, name="lm_head")(x)


class Scanned(nn.Module):
    """The same model with nn.scan(nn.remat(Block)): kernels (L, d_in, d_out), axes 'lio'."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        stack = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True, "lora_dropout": True},
            length=LAYERS,
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(5, name="lm_head")(x)


BLOCK_TARGETS = r".*layers/.*"  # the block's projections, not embed / lm_head
MODULES = ("q_proj", "o_proj", "up_proj", "down_proj")
SHAPES = {"q_proj": (D, 12), "o_proj": (12, D), "up_proj": (D, 16), "down_proj": (16, D)}


def _config(scanned, **kw):
    return rl.LoraConfig(
        rank=kw.pop("rank", 4),
        alpha=kw.pop("alpha", 6.0),
        rasa=True,
        targets=BLOCK_TARGETS,
        kernel_axes="lio" if scanned else None,
        **kw,
    )


def _randomize(tree, seed=0, std=0.4):
    """Random values for every adapter leaf (init's zero B and constant d hide bugs)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if not rl.is_adapter_path(path):
            return leaf
        return jnp.asarray(rng.standard_normal(leaf.shape) * std, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)


def _random_like(abstract, seed, std=0.3):
    """Random arrays with the shapes of `abstract` (cheaper than compiling a model's init)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * std, s.dtype), abstract
    )


def _rasa_update(a, b, d, a_s, b_s):
    """The paper's DeltaW = [A_i | A_S] diag(d_i) [B_i ; B_S], written out in float64."""
    a, b, d, a_s, b_s = (np.asarray(v, np.float64) for v in (a, b, d, a_s, b_s))
    a_cat = np.concatenate([a, a_s], axis=1)
    b_cat = np.concatenate([b, b_s], axis=0)
    return a_cat @ np.diag(d) @ b_cat


def _reference_kernels(adapted, scanned):
    """The plain tree with every block kernel replaced by W_i + DeltaW_i (numpy)."""
    out = jax.tree.map(np.asarray, rl.split(adapted)[1])
    pools = adapted["lora_shared"]["layers"]
    for mod in MODULES:
        a_s, b_s = pools[mod]["lora_a"], pools[mod]["lora_b"]
        if scanned:
            h = adapted["layers"][mod]
            w = np.asarray(h["kernel"], np.float64)
            for i in range(LAYERS):
                w[i] += _rasa_update(h["lora_a"][i], h["lora_b"][i], h["lora_d"][i], a_s, b_s)
            out["layers"][mod]["kernel"] = w.astype(np.float32)
        else:
            for i in range(LAYERS):
                h = adapted["layers"][str(i)][mod]
                w = np.asarray(h["kernel"], np.float64)
                w = w + _rasa_update(h["lora_a"], h["lora_b"], h["lora_d"], a_s, b_s)
                out["layers"][str(i)][mod]["kernel"] = w.astype(np.float32)
    return jax.tree.map(jnp.asarray, out)


@pytest.fixture(scope="module", params=["unscanned", "scanned"])
def case(request):
    """One model per layout, with its compiled functions shared by the tests below. The scanned
    case uses our rank-stabilised diagonal init, the unscanned one the paper's."""
    scanned = request.param == "scanned"
    model = Scanned() if scanned else Unscanned()
    x = jax.random.normal(jax.random.key(1), (2, 3, 6))
    params = _random_like(jax.eval_shape(model.init, KEY, x)["params"], seed=2)
    cfg = _config(scanned, rasa_init="rslora" if scanned else "paper")
    zero = rl.init(params, cfg, jax.random.key(3))
    adapted = _randomize(zero, std=0.25)
    adapters, base = rl.split(adapted)

    def loss(ad, base, mode):
        y = rl.lora(model.apply, cfg, mode=mode)({"params": rl.combine(ad, base)}, x)
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss), static_argnums=2)
    return dict(
        scanned=scanned,
        model=model,
        x=x,
        params=params,
        cfg=cfg,
        zero=zero,
        adapted=adapted,
        plain=jax.jit(model.apply),
        factored=jax.jit(rl.lora(model.apply, cfg, mode="factored")),
        loss=loss,
        grads={mode: grad(adapters, base, mode) for mode in ("factored", "fused", "merged")},
    )


# ---------------------------------------------------------------------------- structure
@pytest.mark.parametrize("scanned", [False, True])
@pytest.mark.parametrize(("rank", "rasa_k"), [(8, None), (8, 3), (6, 2)])
def test_parameter_count_is_the_papers_formula(scanned, rank, rasa_k):
    """Per module type: L*r*(a + b) + L*(r - k + L*k), a = d_in, b = d_out (methods reference)."""
    model = Scanned() if scanned else Unscanned()
    x = jnp.ones((1, 1, 6))
    abstract = jax.eval_shape(model.init, KEY, x)["params"]
    cfg = _config(scanned, rank=rank, rasa_k=rasa_k)
    adapters = jax.eval_shape(lambda key: rl.init_adapters(abstract, cfg, key), KEY)
    k = rasa_k if rasa_k is not None else max(rank // 8, 1)
    L = LAYERS
    total = 0
    for mod in MODULES:
        a, b = SHAPES[mod]
        want = L * rank * (a + b) + L * (rank - k + L * k)
        got = sum(
            math.prod(v.shape)
            for path, v in jax.tree_util.tree_leaves_with_path(adapters)
            if any(getattr(p, "key", None) == mod for p in path)
        )
        assert got == want, (mod, got, want)
        total += want
        pool = adapters["lora_shared"]["layers"][mod]
        assert pool["lora_a"].shape == (a, L * k) and pool["lora_b"].shape == (L * k, b)
        layer = adapters["layers"][mod] if scanned else adapters["layers"]["1"][mod]
        lead = (L,) if scanned else ()
        assert layer["lora_a"].shape == (*lead, a, rank - k)
        assert layer["lora_b"].shape == (*lead, rank - k, b)
        assert layer["lora_d"].shape == (*lead, rank - k + L * k)
    assert rl.num_adapter_params(rl.combine(adapters, abstract)) == total


def test_initial_values(case):
    """Paper: d_i = alpha/(2(r-k)) on private, alpha/(2Lk) on shared entries. Ours ("rslora"):
    alpha/(2 sqrt(r-k)) and alpha/(2 sqrt(Lk)). B zero; A as LoRA's A."""
    zero = case["zero"]
    r, k, L, alpha = 4, 1, LAYERS, 6.0
    if case["cfg"].rasa_init == "paper":
        private, shared = alpha / (2 * (r - k)), alpha / (2 * L * k)
    else:
        private, shared = alpha / (2 * math.sqrt(r - k)), alpha / (2 * math.sqrt(L * k))
    layers = zero["layers"]
    holder = layers["q_proj"] if case["scanned"] else layers["2"]["q_proj"]
    d = np.asarray(holder["lora_d"]).reshape(-1, r - k + L * k)
    np.testing.assert_allclose(d[:, : r - k], private, rtol=1e-6)
    np.testing.assert_allclose(d[:, r - k :], shared, rtol=1e-6)
    np.testing.assert_array_equal(holder["lora_b"], 0)
    pool = zero["lora_shared"]["layers"]["q_proj"]
    np.testing.assert_array_equal(pool["lora_b"], 0)
    bound = 1 / math.sqrt(D)  # kaiming-uniform on d_in = 8, as LoRA's A
    assert 0.5 * bound < np.abs(pool["lora_a"]).max() <= bound
    assert 0.5 * bound < np.abs(holder["lora_a"]).max() <= bound
    assert not np.allclose(pool["lora_a"][:, 0], pool["lora_a"][:, 1])


@pytest.mark.parametrize(("k", "L"), [(1, 4), (2, 4), (1, 6)])
def test_merged_update_has_rank_r_minus_k_plus_Lk(k, L):
    """A trained-like tree (every factor and diagonal random and non-zero), built by hand in the
    documented format: each layer's merged update has rank r - k + L*k, LoRA's has rank r."""
    r, d_in, d_out = 8, 64, 48
    rng = np.random.default_rng(k * 10 + L)

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    layers = {
        str(i): {
            "w": {
                "kernel": jnp.zeros((d_in, d_out)),  # zero base: merged kernel == update
                "lora_a": rand(d_in, r - k),
                "lora_b": rand(r - k, d_out),
                "lora_d": rand(r - k + L * k),
            }
        }
        for i in range(L)
    }
    tree = {
        "layers": layers,
        "lora_shared": {
            "layers": {"w": {"lora_a": rand(d_in, L * k), "lora_b": rand(L * k, d_out)}}
        },
    }
    cfg = rl.LoraConfig(rank=r, rasa=True, rasa_k=k)
    merged = rl.merge(tree, cfg)
    lora = rl.merge(
        {
            "w": {
                "kernel": jnp.zeros((d_in, d_out)),
                "lora_a": rand(d_in, r),
                "lora_b": rand(r, d_out),
            }
        },
        rl.LoraConfig(rank=r),
    )
    assert np.linalg.matrix_rank(np.asarray(lora["w"]["kernel"])) == r
    for i in range(L):
        delta = np.asarray(merged["layers"][str(i)]["w"]["kernel"])
        assert np.linalg.matrix_rank(delta) == r - k + L * k


# ---------------------------------------------------------------------------- forward / merge
def test_forward_equals_merge_equals_formula(case):
    x, adapted, plain = case["x"], case["adapted"], case["plain"]
    want = np.asarray(plain({"params": _reference_kernels(adapted, case["scanned"])}, x))
    assert np.abs(np.asarray(plain({"params": case["params"]}, x)) - want).max() > 1e-2
    factored = case["factored"]({"params": adapted}, x)
    assert_close(factored, want, rel=1e-5, what="factored")
    fused = rl.lora(case["model"].apply, case["cfg"], mode="fused")({"params": adapted}, x)
    assert_close(fused, want, rel=1e-5, what="fused")
    merged = rl.merge(adapted, case["cfg"])
    assert jax.tree.structure(merged) == jax.tree.structure(case["params"])
    assert_close(plain({"params": merged}, x), want, rel=1e-5, what="merged")
    # B = 0 at init: the model's output is unchanged.
    np.testing.assert_array_equal(
        case["factored"]({"params": case["zero"]}, x), plain({"params": case["params"]}, x)
    )


def test_factored_fused_and_merged_gradients_agree_and_reach_the_pool(case):
    g_f, g_m = case["grads"]["factored"], case["grads"]["merged"]
    assert jax.tree.structure(g_f) == jax.tree.structure(rl.split(case["adapted"])[0])
    # float32; the merged path rounds W + update (measured: 2e-6).
    assert_close(g_f, g_m, rel=5e-5, what="factored")
    assert_close(case["grads"]["fused"], g_m, rel=5e-5, what="fused")
    for path, g in jax.tree_util.tree_leaves_with_path(g_f):
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def test_unmerge_recovers_base(case):
    adapters, base = rl.split(case["adapted"])
    back = rl.unmerge(rl.merge(case["adapted"], case["cfg"]), adapters, case["cfg"])
    assert_close(back, base, rel=1e-6)  # float32 rounding of (W + d) - d


# ---------------------------------------------------------------------------- the paper's claim
@pytest.mark.loose_dtypes  # optax Adam
def test_rasa_reconstructs_better_than_lora_at_the_same_rank():
    """Fit L = 8 targets (64 x 64) whose spectra decay as i^-1.5 and which share 8 directions
    (with per-layer weights) besides 24 private ones. LoRA's best rank-r fit is the truncated
    SVD (Eckart-Young); RaSA at the same r, trained by Adam, must beat it, and even beat LoRA at
    rank r + 1, which has more parameters than RaSA."""
    L, n, r = 8, 64, 8
    rng = np.random.default_rng(0)

    def orth(k):
        return np.linalg.qr(rng.standard_normal((n, k)))[0]

    sigma = np.arange(1, 25) ** -1.5
    u_s, v_s = orth(8), orth(8)
    targets = np.stack(
        [
            u_s @ np.diag(sigma[:8] * rng.uniform(0.5, 1.5, 8)) @ v_s.T
            + orth(24) @ np.diag(sigma) @ orth(24).T
            for _ in range(L)
        ]
    )

    def lora_optimum(rank):
        return sum(np.sum(np.linalg.svd(t, compute_uv=False)[rank:] ** 2) for t in targets)

    # The paper's initialisation (k = 1), in the documented tree format.
    k, alpha, bound = 1, float(r), 1 / math.sqrt(n)
    d0 = np.r_[np.full(r - k, alpha / (2 * (r - k))), np.full(L * k, alpha / (2 * L * k))]
    adapters = {
        "layers": {
            str(i): {
                "w": {
                    "lora_a": jnp.asarray(rng.uniform(-bound, bound, (n, r - k)), jnp.float32),
                    "lora_b": jnp.zeros((r - k, n)),
                    "lora_d": jnp.asarray(d0, jnp.float32),
                }
            }
            for i in range(L)
        },
        "lora_shared": {
            "layers": {
                "w": {
                    "lora_a": jnp.asarray(rng.uniform(-bound, bound, (n, L * k)), jnp.float32),
                    "lora_b": jnp.zeros((L * k, n)),
                }
            }
        },
    }
    base = {"layers": {str(i): {"w": {"kernel": jnp.zeros((n, n))}} for i in range(L)}}
    cfg = rl.LoraConfig(rank=r, alpha=alpha, rasa=True)
    t = jnp.asarray(targets, jnp.float32)

    def loss(ad):
        merged = rl.merge(rl.combine(ad, base), cfg)["layers"]
        return jnp.sum((jnp.stack([merged[str(i)]["w"]["kernel"] for i in range(L)]) - t) ** 2)

    steps = 800
    tx = optax.adam(optax.cosine_decay_schedule(1e-2, steps))

    @jax.jit
    def fit(ad):
        def step(carry, _):
            ad, state = carry
            g = jax.grad(loss)(ad)
            upd, state = tx.update(g, state, ad)
            return (optax.apply_updates(ad, upd), state), None

        return jax.lax.scan(step, (ad, tx.init(ad)), None, length=steps)[0][0]

    rasa_err = float(loss(fit(adapters)))
    lora_err, lora_err_plus = lora_optimum(r), lora_optimum(r + 1)
    rasa_params = rl.num_adapter_params(adapters)
    assert rasa_params == L * r * 2 * n + L * (r - 1 + L)  # k = 1
    assert rasa_params < L * (r + 1) * 2 * n  # LoRA at rank r + 1 has more
    print(
        f"\nsquared reconstruction error, {L} targets 64x64: RaSA r={r} (Adam) {rasa_err:.4f} | "
        f"LoRA r={r} optimum {lora_err:.4f} | LoRA r={r + 1} optimum {lora_err_plus:.4f} | "
        f"targets {np.sum(targets**2):.2f}"
    )
    assert rasa_err < 0.6 * lora_err
    assert rasa_err < lora_err_plus


# ---------------------------------------------------------------------------- machinery
@pytest.mark.loose_dtypes  # optax Adam
def test_optimizer_trains_every_rasa_leaf_and_freezes_the_base(case):
    from rslora_jax.ops.optim import labels

    params = case["adapted"]
    for path, label in jax.tree_util.tree_leaves_with_path(labels(params)):
        keys = [getattr(p, "key", None) for p in path]
        want = "adapter" if any(str(k).startswith("lora_") for k in keys) else "frozen"
        assert label == want, jax.tree_util.keystr(path)
    adapters = rl.split(params)[0]
    opt = rl.optimizer(optax.adam(1e-2), params)
    state = opt.init(params)
    n_float = sum(
        math.prod(v.shape) for v in jax.tree.leaves(state) if jnp.issubdtype(v.dtype, jnp.floating)
    )
    assert n_float == 2 * rl.num_adapter_params(params)  # Adam: mu and nu for every adapter leaf
    upd, _ = jax.jit(opt.update)(case["grads"]["factored"], opt.init(adapters), adapters)
    new = optax.apply_updates(adapters, upd)
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(adapters), jax.tree.leaves(new)):
        assert not np.allclose(u, v), jax.tree_util.keystr(path)


@pytest.mark.loose_dtypes  # optax Adam
def test_checkpoint_round_trip_and_resume(case, tmp_path):
    cfg, adapted, params = case["cfg"], case["adapted"], case["params"]
    rl.save_adapters(tmp_path / "ad", adapted, cfg)
    restored, restored_cfg = rl.load_adapters(tmp_path / "ad", params)
    assert restored_cfg == cfg
    assert jax.tree.structure(restored) == jax.tree.structure(adapted)
    for u, v in zip(jax.tree.leaves(restored), jax.tree.leaves(adapted)):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)
    opt = rl.optimizer(optax.adam(1e-3))
    adapters = rl.split(adapted)[0]
    state = opt.init(adapters)
    with rl.CheckpointManager(tmp_path / "run", config=cfg) as mngr:
        mngr.save(7, adapted, state)
        back, back_state, step, _ = mngr.restore(params, jax.eval_shape(opt.init, adapters))
    assert step == 7
    for u, v in zip(jax.tree.leaves((back, back_state)), jax.tree.leaves((adapted, state))):
        np.testing.assert_array_equal(u, v)


def test_sharded_gradient_equals_single_device(case):
    """A 2 x 4 mesh, kernels sharded Megatron-style over both axes (one layout per case)."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    x, cfg, adapted = case["x"], case["cfg"], case["adapted"]
    lead = (None,) if case["scanned"] else ()

    def base_spec(path, leaf):
        keys = [getattr(p, "key", None) for p in path]
        if keys[-1] == "kernel" and "layers" in keys:
            if keys[-2] in ("q_proj", "up_proj"):
                return P(*lead, "data", "model")
            return P(*lead, "model", "data")
        return P()

    base_specs = jax.tree_util.tree_map_with_path(base_spec, rl.split(adapted)[1])
    specs = rl.partition_specs(adapted, base_specs, cfg)
    # The pools: A_S takes the kernels' input spec, B_S their output spec, no layer axis.
    pools = specs["lora_shared"]["layers"]
    assert pools["q_proj"]["lora_a"] == P("data", None)
    assert pools["q_proj"]["lora_b"] == P(None, "model")
    assert pools["down_proj"]["lora_a"] == P("model", None)
    assert pools["down_proj"]["lora_b"] == P(None, "data")
    layers = specs["layers"]
    layer = layers["q_proj"] if case["scanned"] else layers["0"]["q_proj"]
    assert layer["lora_a"] == P(*lead, "data", None)
    assert layer["lora_b"] == P(*lead, None, "model")
    assert layer["lora_d"] == P(*lead, None)
    if not case["scanned"]:
        return  # the sharded step below is compiled for the scanned case only (time)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)
    )
    adapters_sh, base_sh = rl.split(shardings)
    adapters, base = rl.split(adapted)

    def loss(ad, base):  # mode="auto", the default
        return jnp.sum(
            jnp.sin(rl.lora(case["model"].apply, cfg)({"params": rl.combine(ad, base)}, x))
        )

    fn = jax.jit(jax.grad(loss), in_shardings=(adapters_sh, base_sh), out_shardings=adapters_sh)
    got = fn(jax.device_put(adapters, adapters_sh), jax.device_put(base, base_sh))
    assert_close(got, case["grads"]["factored"], rel=5e-5)  # auto vs factored: measured 3e-6
    pool_a = got["lora_shared"]["layers"]["q_proj"]["lora_a"]
    assert pool_a.sharding.spec == P("data", None)
    assert {s.data.shape for s in pool_a.addressable_shards} == {(4, 3)}  # (8, 3) split on data


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"rasa": True, "rank": 4, "rasa_k": 4},
            r"LoraConfig.rasa_k must be smaller than rank \(4\).*got rasa_k=4",
        ),
        ({"rasa": True, "rasa_k": 0}, r"LoraConfig.rasa_k must be a positive int or None, got 0"),
        ({"rasa_k": 2}, r"LoraConfig.rasa_k=2 is set but rasa=False"),
        (
            {"rasa": True, "rasa_init": "lora"},
            r"LoraConfig.rasa_init must be one of \('paper', 'rslora'\), got 'lora'",
        ),
        (
            {"rasa": True, "rasa_layer_pattern": r"layers/\d+"},
            r"rasa_layer_pattern must have exactly one group .* 0 groups",
        ),
        (
            {"rasa": True, "rasa_layer_pattern": "("},
            r"LoraConfig.rasa_layer_pattern: invalid regex",
        ),
        ({"rasa": "yes"}, r"LoraConfig.rasa must be a bool, got 'yes'"),
        ({"rasa": True, "rank": 1}, r"LoraConfig.rank must be >= 2 with rasa=True .* got 1"),
        (
            {"rasa": True, "init": "pissa"},
            r"LoraConfig.init='pissa' cannot be combined with rasa=True",
        ),
        ({"rasa": True, "use_dora": True}, r"use_dora=True cannot be combined with rasa=True"),
    ],
)
def test_invalid_rasa_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rl.LoraConfig(**kwargs)


def test_config_round_trips_with_rasa_fields():
    cfg = rl.LoraConfig(
        rank=8, rasa=True, rasa_k=2, rasa_init="rslora", rasa_layer_pattern=r"h/(\d+)/"
    )
    assert rl.LoraConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.rasa_module("transformer/h/11/attn/c_attn") == ("transformer/h/attn/c_attn", 11)


def test_grouping_errors_name_the_paths():
    kernels = {"model": {"layers": {str(i): {"q": {"kernel": jnp.ones((8, 8))}} for i in range(2)}}}
    kernels["model"]["proj"] = {"kernel": jnp.ones((8, 8))}
    with pytest.raises(
        ValueError, match=r"no layer index matching .* no leading layer axis.*'model/proj'"
    ):
        rl.init(kernels, rl.LoraConfig(rank=4, rasa=True), KEY)
    kernels = {
        "layers": {
            "0": {"q": {"kernel": jnp.ones((8, 8))}},
            "1": {"q": {"kernel": jnp.ones((8, 6))}},
        }
    }
    with pytest.raises(
        ValueError, match=r"'layers/1/q' \(d_in=8, d_out=6, rank=4\) differs from 'layers/0/q'"
    ):
        rl.init(kernels, rl.LoraConfig(rank=4, rasa=True), KEY)
    with pytest.raises(ValueError, match=r"rasa_k=4 must be smaller than the rank there \(4\)"):
        rl.init(
            {"layers": {"0": {"q": {"kernel": jnp.ones((8, 8))}}}},
            rl.LoraConfig(rank=8, rasa=True, rasa_k=4, rank_pattern={"q": 4}),
            KEY,
        )


def test_missing_pool_and_config_mismatch_are_errors(case):
    model, x, cfg, adapted = case["model"], case["x"], case["cfg"], case["adapted"]
    no_pool = {k: v for k, v in adapted.items() if k != "lora_shared"}
    with pytest.raises(ValueError, match=r"need their shared pool at params\['lora_shared'\]"):
        rl.lora(model.apply, cfg, mode="factored")({"params": no_pool}, x)
    with pytest.raises(
        ValueError, match=r"has a RaSA leaf \('lora_d'\), but the config's method is LoRA"
    ):
        rl.merge(adapted, rl.LoraConfig(rank=4, kernel_axes=cfg.kernel_axes))
