"""Flax NNX: factored adapters on nnx.Linear / LinearGeneral / Einsum and a small NNX Llama.

References are independent of `rslora_jax.nnx`: numpy float64 formulas (tests/_reference.py and
einsums written here), the core dict functions (`rslora_jax.init` / `merge` on
`nnx.to_pure_dict`), and a one-device run for the sharded step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax import nnx as rln
from tests import _reference as R
from tests._asserts import assert_close


# ---------------------------------------------------------------------------- helpers
def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _randomize_b(model, seed=0, std=0.5):
    """Random lora_b everywhere (init leaves it zero, which hides layout bugs)."""
    adapters = rl.split(rln.to_params(model))[0]
    new = R.randomize_b(adapters, seed, std)
    new = jax.tree.map(lambda n, old: jax.device_put(n, old.sharding), new, adapters)
    rln.update_from_dict(model, new)
    return model


def _np(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------- single layers
# (constructor, input shape, numpy einsum of (x, kernel) -> y as the layer computes it, roles)
LAYERS = {
    "linear": (lambda r: nnx.Linear(6, 5, rngs=r), (3, 6), "bi,io->bo", "io"),
    "linear_general_out": (
        lambda r: nnx.LinearGeneral(6, (2, 3), use_bias=False, rngs=r),
        (3, 6),
        "bi,ino->bno",
        "ioo",
    ),
    "linear_general_in": (
        lambda r: nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), use_bias=False, rngs=r),
        (4, 2, 3),
        "bij,ijo->bo",
        "iio",
    ),
    "linear_general_unsorted_axis": (  # contracted in sorted order, as LinearGeneral does
        lambda r: nnx.LinearGeneral((2, 3), 5, axis=(-1, -2), use_bias=False, rngs=r),
        (4, 2, 3),
        "bij,ijo->bo",
        "iio",
    ),
    "linear_general_middle_axis": (
        lambda r: nnx.LinearGeneral(3, 4, axis=1, use_bias=False, rngs=r),
        (2, 3, 5),
        "bic,io->bco",
        "io",
    ),
    "linear_general_batch": (
        lambda r: nnx.LinearGeneral(3, (4, 2), batch_axis={0: 2}, use_bias=False, rngs=r),
        (2, 5, 3),
        "nti,nipq->ntpq",
        "lioo",
    ),
    "einsum_interleaved": (
        lambda r: nnx.Einsum("btd,ndh->btnh", (2, 6, 3), rngs=r),
        (2, 4, 6),
        "btd,ndh->btnh",
        "oio",
    ),
    "einsum_per_head": (
        lambda r: nnx.Einsum("btnh,nhk->btnk", (2, 3, 4), rngs=r),
        (2, 4, 2, 3),
        "btnh,nhk->btnk",
        "lio",
    ),
    "einsum_merge_heads": (
        lambda r: nnx.Einsum("btnk,nkd->btd", (2, 4, 6), (6,), rngs=r),
        (2, 4, 2, 4),
        "btnk,nkd->btd",
        "iio",
    ),
}
# Layers whose adapter add_adapters(mode="fused") computes with rslora_jax.fused (one matmul on
# the kernel W + gamma*A@B): the input's trailing axes against the kernel's leading ones, no
# transpose and no batch axes (the dispatch's rule, as for linen). The others stay factored.
FUSABLE = {
    "linear",
    "linear_general_out",
    "linear_general_in",
    "linear_general_unsorted_axis",
    "einsum_merge_heads",
}
# Both scalings, alternating over the layers (each case compiles its own shapes).
CASES = [(name, ("rslora", "lora")[i % 2]) for i, name in enumerate(sorted(LAYERS))]


@pytest.mark.parametrize(("name", "scaling"), CASES)
def test_layer_factored_equals_merged_equals_formula(name, scaling):
    make, x_shape, eq, roles = LAYERS[name]
    layer = make(nnx.Rngs(0))
    kernel = _np(layer.kernel[...])
    bias = None if layer.bias is None else _np(layer.bias[...])
    x = jax.random.normal(jax.random.key(1), x_shape)
    # The base layer computes exactly the written einsum (checks the reference itself).
    y_base = np.einsum(eq, _np(x), kernel)
    if bias is not None:
        y_base = y_base + bias
    assert_close(layer(x), y_base, rel=1e-5)

    r, alpha = 2, 3.0
    cfg = rl.LoraConfig(rank=r, alpha=alpha, scaling=scaling)
    assert rln.kernel_axes(layer) == {"": roles}
    rln.add_adapters(layer, cfg, jax.random.key(2))
    assert layer.lora_scale == R.gamma(alpha, r, scaling)
    assert np.all(np.asarray(layer.lora_b[...]) == 0)
    _randomize_b(layer, seed=3)
    a, b = _np(layer.lora_a[...]), _np(layer.lora_b[...])
    d_in = math.prod(s for s, c in zip(kernel.shape, roles) if c == "i")
    d_out = math.prod(s for s, c in zip(kernel.shape, roles) if c == "o")
    n_l = roles.count("l")
    assert a.shape == (*kernel.shape[:n_l], d_in, r) and b.shape == (*kernel.shape[:n_l], r, d_out)

    merged_kernel = kernel + R.delta_kernel(a, b, R.gamma(alpha, r, scaling), roles, kernel.shape)
    want = np.einsum(eq, _np(x), merged_kernel) + (0.0 if bias is None else bias)
    factored = layer(x)
    merged_layer = rln.merge(layer)
    assert type(merged_layer) is type(make(nnx.Rngs(0)))
    assert not hasattr(merged_layer, "lora_a")
    assert_close(merged_layer.kernel[...], merged_kernel, rel=1e-6)
    assert_close(factored, want, rel=1e-5, what="factored")
    assert_close(merged_layer(x), want, rel=1e-5, what="merged")
    for mode, fuses in (("factored", False), ("fused", name in FUSABLE)):
        layer.lora_mode = mode
        assert layer._fuses(x) is fuses, mode
        assert_close(layer(x), want, rel=1e-5, what=mode)
    layer.lora_mode = "auto"
    # merge left the adapted layer alone.
    np.testing.assert_array_equal(layer(x), factored)


def test_einsum_called_with_another_equation_fails_clearly():
    layer = nnx.Einsum("btd,ndh->btnh", (2, 6, 3), rngs=nnx.Rngs(0))
    rln.add_adapters(layer, rl.LoraConfig(rank=2), jax.random.key(0))
    with pytest.raises(ValueError, match=r"adapted for kernel axes 'oio'"):
        layer(jnp.ones((2, 4, 2)), "btn,ndh->btdh")


def test_subclass_without_own_call_is_adapted_and_others_are_refused():
    class Tagged(nnx.Linear):
        def describe(self):
            return "tagged"

    class Custom(nnx.Linear):
        def __call__(self, x):
            return super().__call__(2 * x)

    layer = rln.add_adapters(
        Tagged(4, 4, rngs=nnx.Rngs(0)), rl.LoraConfig(rank=2), jax.random.key(0)
    )
    assert isinstance(layer, Tagged) and layer.describe() == "tagged"
    _randomize_b(layer)
    x = jnp.ones((1, 4))
    assert_close(rln.merge(layer)(x), layer(x), rel=1e-5)
    assert type(rln.merge(layer)) is Tagged
    with pytest.raises(ValueError, match=r"'' is a Custom, which the factored NNX forward"):
        rln.add_adapters(Custom(4, 4, rngs=nnx.Rngs(0)), rl.LoraConfig(rank=2), jax.random.key(0))


# ---------------------------------------------------------------------------- NNX Llama
VOCAB, D, HEADS, MLP_D, LAYERS_N = 32, 16, 2, 24, 2
# FSDP over 'data' on the input axis, tensor parallel over 'model' on the output axis.
COLUMN, ROW = ("data", "model"), ("model", "data")


def _init(names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class Attention(nnx.Module):
    def __init__(self, rngs):
        lin = lambda names: nnx.Linear(D, D, use_bias=False, kernel_init=_init(names), rngs=rngs)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = lin(COLUMN), lin(COLUMN), lin(COLUMN)
        self.o_proj = lin(ROW)

    def __call__(self, x):
        b, t, _ = x.shape
        hd = D // HEADS
        q, k, v = (p(x).reshape(b, t, HEADS, hd) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(hd))
        mask = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(mask, scores, jnp.float32(-1e9))
        out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
        return self.o_proj(out.reshape(b, t, D))


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.gate_proj = nnx.Linear(D, MLP_D, use_bias=False, kernel_init=_init(COLUMN), rngs=rngs)
        self.up_proj = nnx.Linear(D, MLP_D, use_bias=False, kernel_init=_init(COLUMN), rngs=rngs)
        self.down_proj = nnx.Linear(MLP_D, D, use_bias=False, kernel_init=_init(ROW), rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.input_layernorm = nnx.RMSNorm(D, rngs=rngs)
        self.self_attn = Attention(rngs)
        self.post_attention_layernorm = nnx.RMSNorm(D, rngs=rngs)
        self.mlp = Mlp(rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(
            VOCAB,
            D,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.5), (None, "model")),
            rngs=rngs,
        )
        self.layers = nnx.List([Block(rngs) for _ in range(LAYERS_N)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Llama(nnx.Module):
    """A tiny Llama-style causal LM with Hugging Face's module names."""

    def __init__(self, rngs):
        self.model = Decoder(rngs)
        self.lm_head = nnx.Linear(D, VOCAB, use_bias=False, kernel_init=_init(COLUMN), rngs=rngs)

    def __call__(self, tokens):
        return self.lm_head(self.model(tokens))


# The Llama tests share compiled programs (model init, factor draws, Adam steps); optax Adam is
# not strict-promotion clean (see test_optim), and one promotion mode for all of them keeps
# one compilation of each. Strict promotion of the NNX layers runs in the single-layer tests.
LLAMA_DTYPES = pytest.mark.loose_dtypes

CFG = rl.LoraConfig(
    rank=4, alpha=8.0, rank_pattern={"o_proj": 2}, alpha_pattern={"mlp/down_proj": 3.0}
)
SEQ, BATCH = 8, 4


@nnx.jit
def _build_llama():
    return Llama(nnx.Rngs(0))


def _llama():
    """A fresh model (one compiled init program instead of one per initializer and shape)."""
    with nnx.use_eager_sharding(False):  # sharding metadata only; values on one device
        return _build_llama()


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


TX = optax.adam(2e-2)
STEPS = 4


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(11), (BATCH, SEQ + 1), 0, VOCAB)


def _train_functional(model, tokens, steps=STEPS):
    """Adam steps on the nnx.LoRAParam state alone (jax.grad w.r.t. the adapters only).

    Returns the trained adapters, the losses and the adapter gradients at the trained adapters.
    """
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def step(lora, opt_state, rest, tokens):
        value, grads = jax.value_and_grad(lambda lo: _loss(nnx.merge(graphdef, lo, rest), tokens))(
            lora
        )
        updates, opt_state = TX.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value, grads

    opt_state = jax.jit(TX.init)(lora)
    shardings = jax.tree.map(lambda x: x.sharding, (lora, opt_state))
    # Compiled once: same in/out layout.
    step = jax.jit(step, out_shardings=(*shardings, None, None))
    losses = []
    for _ in range(steps):
        lora, opt_state, value, _ = step(lora, opt_state, rest, tokens)
        losses.append(float(value))
    grads = step(lora, opt_state, rest, tokens)[3]
    return lora, losses, grads


@nnx.jit
def _nnx_step(model, opt, tokens):
    """The NNX way: nnx.Optimizer over nnx.LoRAParam, gradients w.r.t. the adapters only.

    Returns the loss and the adapter gradients (both before the update)."""
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, tokens)
    opt.update(model, grads)
    return loss, grads


def _fresh(key):
    """Adapted model + nnx.Optimizer, arrays committed to one device (as restored ones are, so
    a restored run reuses the compiled step)."""
    model = rln.add_adapters(_llama(), CFG, key)
    opt = nnx.Optimizer(model, TX, wrt=nnx.LoRAParam)
    for node in (model, opt):
        nnx.update(node, jax.device_put(nnx.state(node), jax.devices()[0]))
    return model, opt


def _one_device_grads(adapters, tokens):
    """Adapter gradients of the one-device factored model (`_nnx_step`, compiled once for the
    reference run) at the adapter values `adapters` (a pure dict)."""
    model, opt = _fresh(jax.random.key(1))
    rln.update_from_dict(model, jax.device_put(adapters, jax.devices()[0]))
    return nnx.to_pure_dict(_nnx_step(model, opt, tokens)[1])


@pytest.fixture(scope="module")
def reference_run(tokens):
    """One device, nnx.Optimizer Adam steps from the default (B = 0) init."""
    with jax.numpy_dtype_promotion("standard"):  # as LLAMA_DTYPES
        model, opt = _fresh(jax.random.key(1))
        before = rln.to_params(model)
        losses = [float(_nnx_step(model, opt, tokens)[0]) for _ in range(STEPS)]
    return model, opt, before, losses


@LLAMA_DTYPES
def test_adapters_are_the_core_layout_and_values():
    model = _llama()
    base = rln.to_params(model)
    rln.add_adapters(model, CFG, jax.random.key(1))
    # Same tree, same values as the core's init on the pure dict of the base model: the layout
    # (lora_a / lora_b next to kernel, integer list keys) that checkpoints and PEFT export read.
    _assert_trees_equal(rln.to_params(model), rl.init(base, CFG, jax.random.key(1)))
    want_paths = sorted(
        f"model/layers/{i}/{m}"
        for i in range(LAYERS_N)
        for m in (
            "self_attn/q_proj",
            "self_attn/k_proj",
            "self_attn/v_proj",
            "self_attn/o_proj",
            "mlp/gate_proj",
            "mlp/up_proj",
            "mlp/down_proj",
        )
    )
    assert sorted(rl.adapter_paths(rln.to_params(model))) == want_paths  # lm_head left out
    layer = model.model.layers[1]
    assert layer.self_attn.q_proj.lora_scale == R.gamma(8.0, 4, "rslora")  # 4.0
    assert layer.self_attn.o_proj.lora_scale == R.gamma(8.0, 2, "rslora")
    assert layer.mlp.down_proj.lora_scale == R.gamma(3.0, 4, "rslora")
    assert layer.self_attn.o_proj.lora_a.shape == (D, 2)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(rl.split(rln.to_params(model))[0]))
    assert (
        rln.num_adapter_params(model)
        == n
        == LAYERS_N
        * (3 * (D * 4 + 4 * D) + (D * 2 + 2 * D) + 2 * (D * 4 + 4 * MLP_D) + (MLP_D * 4 + 4 * D))
    )
    # Factor variables are nnx.LoRAParam (an nnx.Param) and carry derived sharding names.
    q = layer.self_attn.q_proj
    assert isinstance(q.lora_a, nnx.LoRAParam) and isinstance(q.lora_a, nnx.Param)
    assert q.lora_a.get_metadata("out_sharding") == ("data", None)
    assert q.lora_b.get_metadata("out_sharding") == (None, "model")
    o = layer.self_attn.o_proj
    assert o.lora_a.get_metadata("out_sharding") == ("model", None)
    assert o.lora_b.get_metadata("out_sharding") == (None, "data")


@LLAMA_DTYPES
def test_llama_factored_equals_merged_and_split_merge_round_trips(tokens):
    model = _llama()
    base_graphdef = nnx.graphdef(model)
    rln.add_adapters(model, CFG, jax.random.key(1))
    _randomize_b(model, seed=4, std=0.3)
    params = rln.to_params(model)
    factored = model(tokens)

    # nnx.split / nnx.merge round trip keeps the LoRA layers.
    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    assert type(again.model.layers[0].mlp.up_proj) is rln.LoraLinear
    np.testing.assert_array_equal(again(tokens), factored)

    # rslora_jax.nnx.merge: a plain model, same structure as before add_adapters.
    merged = rln.merge(model)
    assert nnx.graphdef(merged) == base_graphdef
    want = R.merge_reference(params, CFG.scale_for, lambda _: "io")
    got = rln.to_params(merged)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert_close(got, want, rel=1e-6)  # float32 rounding of W + gamma * A @ B
    # The core's merge of the same pure dict, rebuilt with nnx.merge (the merged recipe).
    core = rln.merged_model(base_graphdef, params, CFG)
    for what, out in (("nnx merge", merged(tokens)), ("core merge", core(tokens))):
        assert_close(out, factored, rel=1e-5, what=what)
    assert np.abs(np.asarray(factored) - np.asarray(_llama()(tokens))).max() > 1e-2


@LLAMA_DTYPES
def test_fused_and_factored_linear_layers_agree(tokens):
    """add_adapters(mode=...): the fused nnx.Linear path (rslora_jax.fused) gives the factored
    path's loss and adapter gradients; "auto" fuses at this token count."""

    def run(mode):
        model = rln.add_adapters(_llama(), CFG, jax.random.key(1), mode=mode)
        _randomize_b(model, seed=4, std=0.3)
        grad = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
        loss, grads = nnx.jit(grad)(model, tokens)
        layer = model.model.layers[0].mlp.up_proj
        assert layer.lora_mode == mode
        return loss, nnx.to_pure_dict(grads), layer._fuses(jnp.zeros((BATCH, SEQ, D)), None)

    ref_loss, ref_grads, fuses = run("factored")
    assert not fuses
    for mode in ("fused", "auto"):
        loss, grads, fuses = run(mode)
        assert fuses
        assert_close(loss, ref_loss, rel=1e-5, what=mode)
        # float32; the fused path rounds W + gamma * A @ B, and layer 0's gradient carries that
        # back through the whole model (measured: up to 7e-6).
        assert_close(grads, ref_grads, rel=1e-4, what=mode)
        assert all(np.abs(np.asarray(w)).max() > 0 for w in jax.tree.leaves(ref_grads))
    with pytest.raises(ValueError, match="mode must be 'auto', 'factored' or 'fused', got 'x'"):
        rln.add_adapters(_llama(), CFG, jax.random.key(1), mode="x")


@LLAMA_DTYPES
def test_nnx_optimizer_trains_only_adapters(reference_run):
    model, opt, before, losses = reference_run
    assert losses[-1] < losses[0] - 0.05, losses
    adapters_before, base_before = rl.split(before)
    adapters_after, base_after = rl.split(rln.to_params(model))
    _assert_trees_equal(base_after, base_before)  # bit-identical base
    for a, b in zip(jax.tree.leaves(adapters_after), jax.tree.leaves(adapters_before)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0  # every factor moved
    # Adam keeps exactly two adapter-sized moments (no base-sized state).
    moments = jax.tree.leaves(nnx.state(opt, nnx.OptState))
    assert sum(x.size for x in moments) == 2 * rln.num_adapter_params(model) + 2  # + counts


@LLAMA_DTYPES
def test_merged_recipe_trains_like_the_factored_model(tokens, reference_run):
    """Core issue recipe: nnx.split -> pure dict -> init / optimizer / merge, merged forward."""
    graphdef, state, rest = nnx.split(_llama(), nnx.Param, ...)
    params = rl.init(nnx.to_pure_dict(state), CFG, jax.random.key(1))
    adapters, base = rl.split(params)
    opt = rl.optimizer(TX, params)
    opt_state = opt.init(adapters)

    @jax.jit
    def step(adapters, opt_state, base, rest, tokens):
        def loss(adapters):
            model = rln.merged_model(graphdef, rl.combine(adapters, base), CFG, rest)
            return _loss(model, tokens)

        value, grads = jax.value_and_grad(loss)(adapters)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value, grads

    losses = []
    for _ in range(STEPS):
        adapters, opt_state, value, _ = step(adapters, opt_state, base, rest, tokens)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.05
    # Same key -> same init as the factored model; the two forwards train alike.
    model, _, _, want_losses = reference_run
    np.testing.assert_allclose(losses, want_losses, rtol=2e-4)
    want = rl.split(rln.to_params(model))[0]
    assert jax.tree.structure(adapters) == jax.tree.structure(want)
    # Trained adapters are not compared entry by entry: Adam turns a near-zero gradient's
    # rounding into a whole lr-sized step. The gradients at the trained point are.
    grads = step(adapters, opt_state, base, rest, tokens)[3]
    assert_close(grads, _one_device_grads(adapters, tokens), rel=1e-4, what="merged recipe")


# ---------------------------------------------------------------------------- sharding
@LLAMA_DTYPES
def test_sharded_step_equals_single_device(tokens, reference_run):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    model = _llama()
    state = nnx.state(model)  # shard by the partitioning metadata (nnx.with_partitioning)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    assert model.model.layers[0].mlp.up_proj.kernel[...].sharding.spec == P(*COLUMN)
    rln.add_adapters(model, CFG, jax.random.key(1))
    # Factors of sharded kernels are placed on the mesh: A takes the input axis, B the output.
    up = model.model.layers[0].mlp.up_proj
    assert up.lora_a[...].sharding == NamedSharding(mesh, P("data", None))
    assert up.lora_b[...].sharding == NamedSharding(mesh, P(None, "model"))
    down = model.model.layers[0].mlp.down_proj
    assert down.lora_a[...].sharding.spec == P("model", None)
    assert {s.data.shape for s in down.lora_a[...].addressable_shards} == {(MLP_D // 4, 4)}
    # The metadata tells nnx.get_partition_spec the same.
    specs = nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))
    spec_q = specs["model"]["layers"][1]["self_attn"]["q_proj"]
    assert spec_q["lora_a"].get_value() == P("data", None)
    assert spec_q["lora_b"].get_value() == P(None, "model")

    with jax.set_mesh(mesh):
        lora, losses, grads = _train_functional(model, tokens)
    # The functional step on 8 devices equals nnx.Optimizer on one: same losses, and the same
    # gradients at the trained adapters (the trained adapters themselves are not compared entry
    # by entry: Adam turns a near-zero gradient's rounding into a whole lr-sized step).
    ref_model, _, _, want_losses = reference_run
    want_adapters = nnx.to_pure_dict(nnx.state(ref_model, nnx.LoRAParam))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    got = nnx.to_pure_dict(lora)
    assert jax.tree.structure(got) == jax.tree.structure(want_adapters)
    want_grads = _one_device_grads(got, tokens)
    assert_close(nnx.to_pure_dict(grads), want_grads, rel=2e-5, what="8 devices vs 1")
    trained_b = got["model"]["layers"][0]["mlp"]["up_proj"]["lora_b"]
    assert trained_b.sharding.spec == P(None, "model")
    assert len({s.device for s in trained_b.addressable_shards}) == 8


# ---------------------------------------------------------------------------- checkpoints
@LLAMA_DTYPES
def test_checkpoint_round_trip_and_resume(tokens, tmp_path):
    def opt_dict(opt):
        return nnx.to_pure_dict(nnx.state(opt, nnx.OptState))

    model, opt = _fresh(jax.random.key(1))
    for _ in range(2):
        _nnx_step(model, opt, tokens)
    with rl.CheckpointManager(tmp_path / "run", config=CFG) as mngr:
        mngr.save(2, rln.to_params(model), opt_dict(opt), extra={"seed": 1})
    rl.save_adapters(tmp_path / "adapters", rln.to_params(model), CFG)
    trained = model(tokens)
    straight = [float(_nnx_step(model, opt, tokens)[0]) for _ in range(2)]

    # A new run: different adapter init, restored from the checkpoint, continues identically.
    model2, opt2 = _fresh(jax.random.key(99))
    with rl.CheckpointManager(tmp_path / "run", config=CFG) as mngr:
        params, opt_state, t, extra = mngr.restore(rln.to_params(model2), opt_dict(opt2))
    assert (t, extra) == (2, {"seed": 1})
    rln.update_from_dict(model2, params)
    rln.update_from_dict(opt2, opt_state)
    resumed = [float(_nnx_step(model2, opt2, tokens)[0]) for _ in range(2)]
    assert resumed == straight
    _assert_trees_equal(rln.to_params(model2), rln.to_params(model))
    _assert_trees_equal(nnx.state(opt2, nnx.OptState), nnx.state(opt, nnx.OptState))

    # Adapters alone, into a model without adapters yet (the serving side).
    plain = _llama()
    restored, cfg = rl.load_adapters(tmp_path / "adapters", rln.to_params(plain))
    assert cfg == CFG
    served = rln.add_adapters(plain, cfg, jax.random.key(5))
    rln.update_from_dict(served, restored)
    np.testing.assert_array_equal(served(tokens), trained)


# ---------------------------------------------------------------------------- stacked layers
class ScanBlock(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(6, 6, rngs=rngs)
        self.heads = nnx.LinearGeneral(6, (2, 3), use_bias=False, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.heads(jnp.tanh(self.q_proj(x)))).reshape(x.shape)


class Scanned(nnx.Module):
    def __init__(self, rngs, n=3):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return ScanBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block, x):
            return block(x)

        return run(self.blocks, x)


def test_stacked_layers_under_nnx_scan():
    model = Scanned(nnx.Rngs(0))
    assert rln.kernel_axes(model) == {"blocks/heads": "lioo", "blocks/q_proj": "lio"}
    base = rln.to_params(model)
    cfg = rl.LoraConfig(rank=2, alpha=4.0, kernel_axes=rln.kernel_axes(model))
    rln.add_adapters(model, cfg, jax.random.key(0))
    params = rln.to_params(model)
    # One stacked adapter per layer axis, as the core makes for nn.scan'd linen layers.
    _assert_trees_equal(params, rl.init(base, cfg, jax.random.key(0)))
    assert params["blocks"]["q_proj"]["lora_a"].shape == (3, 6, 2)
    assert params["blocks"]["heads"]["lora_b"].shape == (3, 2, 6)
    _randomize_b(model, seed=1)
    x = jax.random.normal(jax.random.key(1), (4, 6))
    want_params = R.merge_reference(
        rln.to_params(model), cfg.scale_for, lambda p: rln.kernel_axes(model)[p]
    )
    # Reference forward in numpy, layer by layer, on the merged kernels.
    h = _np(x)
    q, heads = want_params["blocks"]["q_proj"], want_params["blocks"]["heads"]
    for i in range(3):
        t = np.tanh(h @ q["kernel"][i] + q["bias"][i])
        h = h + np.tanh(np.einsum("bi,ino->bno", t, heads["kernel"][i])).reshape(h.shape)
    assert_close(model(x), h, rel=1e-5, what="factored")
    assert_close(rln.merge(model)(x), h, rel=1e-5, what="merged")


# ---------------------------------------------------------------------------- dropout
def test_adapter_dropout_follows_train_and_eval():
    cfg = rl.LoraConfig(rank=8, alpha=2.0, dropout=0.5)
    with pytest.raises(ValueError, match="dropout=0.5 needs dropout_rngs"):
        rln.add_adapters(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), cfg, jax.random.key(0))
    layer = rln.add_adapters(
        nnx.Linear(8, 8, rngs=nnx.Rngs(0)), cfg, jax.random.key(0), dropout_rngs=nnx.Rngs(3)
    )
    x = jax.random.normal(jax.random.key(1), (4, 8))
    base = _np(x) @ _np(layer.kernel[...]) + _np(layer.bias[...])
    assert_close(layer(x), base, rel=1e-6)  # B = 0: no effect (float32 vs the float64 formula)
    _randomize_b(layer)
    a, b = _np(layer.lora_a[...]), _np(layer.lora_b[...])  # square, invertible
    scale = R.gamma(2.0, 8, "rslora")
    train1, train2 = _np(layer(x)), _np(layer(x))
    assert not np.allclose(train1, train2)  # a fresh mask per call
    # Recover the adapter's input: x with entries dropped and the rest scaled by 1 / (1 - p).
    for out in (train1, train2):
        x_seen = ((out - base) / scale) @ np.linalg.inv(b) @ np.linalg.inv(a)
        kept = np.isclose(x_seen, 2 * _np(x), rtol=1e-3, atol=1e-3)
        dropped = np.isclose(x_seen, 0.0, atol=1e-3)
        assert np.all(kept | dropped) and 0.2 < kept.mean() < 0.8
    layer.eval()
    full = base + scale * (_np(x) @ a) @ b
    assert_close(layer(x), full, rel=1e-5)
    # Merging drops the dropout (and its RNG state) with the factors.
    merged = rln.merge(layer)
    assert nnx.graphdef(merged) == nnx.graphdef(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    assert_close(merged(x), full, rel=1e-5)


# ---------------------------------------------------------------------------- every method
# A tiny net with the three adaptable layer kinds (all with a bias, all fusable) in a list of
# two blocks, so that RaSA groups each projection's two layers ('layers/<i>/...').
DM = 8


class MethodBlock(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(DM, DM, rngs=rngs)
        self.up_proj = nnx.LinearGeneral(DM, (2, 6), rngs=rngs)  # 'ioo'
        self.down_proj = nnx.Einsum("btnh,nhd->btd", (2, 6, DM), (DM,), rngs=rngs)  # 'iio'

    def __call__(self, x):
        return x + self.q_proj(x) + self.down_proj(jnp.tanh(self.up_proj(x)))


class MethodNet(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([MethodBlock(rngs) for _ in range(2)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


METHODS = {
    "lora": {"method": "lora"},
    "rasa": {"method": "rasa"},
    "dora": {"method": "dora"},
    "pissa": {"init": "pissa"},
}


def _method_config(name, model, **kw):
    return rl.LoraConfig(
        rank=4, alpha=6.0, kernel_axes=rln.kernel_axes(model), **METHODS[name], **kw
    )


def _method_input():
    return jax.random.normal(jax.random.key(7), (2, 3, DM))


def _rel(a, b):
    return float(np.linalg.norm(_np(a) - _np(b)) / np.linalg.norm(_np(b)))


def _adapted_method_net(name, mode="auto"):
    """(model with random adapters, plain graphdef, config, base output, core-layout params)."""
    model = MethodNet(nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    x = _method_input()
    y0 = model(x)
    base = rln.to_params(model)
    cfg = _method_config(name, model)
    rln.add_adapters(model, cfg, jax.random.key(1), mode=mode)
    # The core layout and values: rslora_jax.init on the pure dict, same key (RaSA's pools
    # at the top level; PiSSA's residual kernels).
    _assert_trees_equal(rln.to_params(model), rl.init(base, cfg, jax.random.key(1)))
    assert_close(model(x), y0, rel=1e-5, what="output unchanged at init")
    # Random B everywhere (RaSA's pools too), written back in the core layout.
    params = R.randomize_b(rln.to_params(model), 3, 0.3)
    rln.update_from_dict(model, params)
    _assert_trees_equal(rln.to_params(model), params)
    return model, graphdef, cfg, y0, params


@pytest.mark.parametrize("mode", ["factored", "fused"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_forward_and_gradients_equal_the_core(name, mode):
    model, graphdef, cfg, y0, params = _adapted_method_net(name, mode)
    x = _method_input()
    block = model.layers[1]
    for layer in (block.q_proj, block.up_proj, block.down_proj):
        assert isinstance(layer.lora_a, nnx.LoRAParam)
        assert sorted(k for k in vars(layer) if k.startswith("lora_") and k != "lora_config") == (
            sorted([*cfg.method.leaves, "lora_mode", "lora_path", "lora_roles"])
            + (["lora_shared"] if name == "rasa" else [])
        )
        assert layer._fuses(x) is (mode == "fused")

    # Forward: the plain NNX model on the core merge of the same pure dict.
    want = nnx.merge(graphdef, rl.merge(params, cfg))(x)
    assert_close(model(x), want, rel=1e-5, what="forward")
    assert _rel(want, y0) > 1e-2  # the adapters change the output

    # Gradients w.r.t. the LoRAParams == jax.grad of the core recipe w.r.t. the adapters.
    def loss(out):
        return jnp.mean(jnp.tanh(out) ** 2)

    grads = nnx.grad(lambda m: loss(m(x)), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    adapters, base = rl.split(params)
    want_grads = jax.grad(
        lambda ad: loss(nnx.merge(graphdef, rl.merge(rl.combine(ad, base), cfg))(x))
    )(adapters)
    got = rln.to_params(grads)
    assert jax.tree.structure(got) == jax.tree.structure(want_grads)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want_grads)):
        assert_close(g, w, rel=1e-4, what="gradient")
        assert np.abs(_np(w)).max() > 0

    # An optimizer step over nnx.LoRAParam moves every adapter leaf and nothing else.
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    opt.update(model, grads)
    after_adapters, after_base = rl.split(rln.to_params(model))
    _assert_trees_equal(after_base, base)
    for a, b in zip(jax.tree.leaves(after_adapters), jax.tree.leaves(adapters)):
        assert np.abs(_np(a) - _np(b)).max() > 0


def _method_delta(name, holder, shared, module, roles, scale):
    """The written merge formula for one layer (numpy float64)."""
    w = _np(holder["kernel"])
    a, b = _np(holder["lora_a"]), _np(holder["lora_b"])
    if name == "rasa":
        pool = shared["lora_shared"]["layers"][module]
        d = _np(holder["lora_d"])
        a = np.concatenate([a, _np(pool["lora_a"])], axis=-1)
        b = np.concatenate([b, _np(pool["lora_b"])], axis=-2) * d[:, None]
        scale = 1.0
    v = w + R.delta_kernel(a, b, scale, roles, w.shape)
    if name != "dora":
        return v
    d_in = math.prod(s for s, c in zip(w.shape, roles) if c == "i")
    mat = v.reshape(d_in, -1)  # 'io', 'ioo', 'iio': input axes first
    norm = np.linalg.norm(mat, axis=0)
    return (mat * (_np(holder["lora_magnitude"]).reshape(-1) / norm)).reshape(w.shape)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_merge_is_the_core_merge_and_the_formula(name):
    model, graphdef, cfg, _, params = _adapted_method_net(name)
    x = _method_input()
    merged = rln.merge(model)
    assert nnx.graphdef(merged) == graphdef  # the plain model again
    got = rln.to_params(merged)
    want = rl.merge(params, cfg)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w, rel=1e-6, what="merge")
    roles = rln.kernel_axes(model)
    for i in range(2):
        for module in ("q_proj", "up_proj", "down_proj"):
            path = f"layers/{i}/{module}"
            formula = _method_delta(
                name, params["layers"][i][module], params, module, roles[path], cfg.scale_for(path)
            )
            assert_close(got["layers"][i][module]["kernel"], formula, rel=1e-5, what=path)
    assert_close(merged(x), model(x), rel=1e-5, what="merged forward")
    # merge left the adapted model alone.
    _assert_trees_equal(rln.to_params(model), params)


def test_pissa_writes_the_residual_kernels_into_the_layers():
    model = MethodNet(nnx.Rngs(0))
    before = rln.to_params(model)
    cfg = _method_config("pissa", model)
    rln.add_adapters(model, cfg, jax.random.key(1))
    roles = rln.kernel_axes(model)
    for i in range(2):
        for module in ("q_proj", "up_proj", "down_proj"):
            path, layer = f"layers/{i}/{module}", getattr(model.layers[i], module)
            delta = R.delta_kernel(
                layer.lora_a[...],
                layer.lora_b[...],
                cfg.scale_for(path),
                roles[path],
                layer.kernel.shape,
            )
            # W_res + gamma * A @ B = W, and the principal part is not small.
            w0 = _np(before["layers"][i][module]["kernel"])
            assert_close(_np(layer.kernel[...]) + delta, w0, rel=1e-5, what=path)
            assert _rel(layer.kernel[...], w0) > 0.1


def test_rasa_pools_are_held_once_and_shared_by_the_layers(tmp_path):
    model, _, cfg, _, params = _adapted_method_net("rasa")
    x = _method_input()
    q0, q1 = model.layers[0].q_proj, model.layers[1].q_proj
    assert q0.lora_shared is q1.lora_shared is model.layers[1].down_proj.lora_shared
    # NNX keeps the shared variables once, under the first adapted layer in graph order.
    raw = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    holders = [
        (i, m) for i in range(2) for m in raw["layers"][i] if "lora_shared" in raw["layers"][i][m]
    ]
    assert holders == [(0, "down_proj")]
    pools = raw["layers"][0]["down_proj"]["lora_shared"]
    assert jax.tree.map(jnp.shape, pools) == jax.tree.map(jnp.shape, params["lora_shared"])
    # ... and to_params puts them where the core has them.
    assert sorted(params["lora_shared"]["layers"]) == ["down_proj", "q_proj", "up_proj"]
    assert rln.num_adapter_params(model) == rl.num_adapter_params(params)
    # nnx.split / nnx.merge keep the sharing; optimizer state holds each pool once.
    again = nnx.merge(*nnx.split(model))
    assert again.layers[0].q_proj.lora_shared is again.layers[1].up_proj.lora_shared
    np.testing.assert_array_equal(again(x), model(x))
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.LoRAParam)
    moments = jax.tree.leaves(nnx.state(opt, nnx.OptState))
    assert sum(m.size for m in moments) == rln.num_adapter_params(model) + 1  # + step
    # A checkpoint round trip: the core's save/load take to_params as it is (pools at the top
    # level), update_from_dict takes the restored tree back.
    rl.save_adapters(tmp_path / "rasa", params, cfg)
    plain = MethodNet(nnx.Rngs(0))
    restored, loaded_cfg = rl.load_adapters(tmp_path / "rasa", rln.to_params(plain))
    fresh = rln.add_adapters(plain, loaded_cfg, jax.random.key(9))
    rln.update_from_dict(fresh, restored)
    _assert_trees_equal(rln.to_params(fresh), params)
    np.testing.assert_array_equal(fresh(x), model(x))
    rln.remove_adapters(fresh)  # pools go with the layers' other leaves
    assert nnx.graphdef(fresh) == nnx.graphdef(MethodNet(nnx.Rngs(0)))


def test_rasa_refusals_are_clear():
    stacked = Scanned(nnx.Rngs(0))
    cfg = rl.LoraConfig(rank=2, method="rasa", kernel_axes=rln.kernel_axes(stacked))
    with pytest.raises(ValueError, match=r"RaSA adapters on stacked NNX layers \('blocks/heads'"):
        rln.add_adapters(stacked, cfg, jax.random.key(0))
    assert rln.num_adapter_params(stacked) == 0  # nothing was changed
    rasa = rln.to_params(_adapted_method_net("rasa")[0])
    lora_model = rln.add_adapters(
        MethodNet(nnx.Rngs(0)), _method_config("lora", MethodNet(nnx.Rngs(0))), jax.random.key(0)
    )
    with pytest.raises(ValueError, match=r"top-level 'lora_shared' entry .* RaSA"):
        rln.update_from_dict(lora_model, {"lora_shared": rasa["lora_shared"]})
    model = rln.add_adapters(
        MethodNet(nnx.Rngs(0)), _method_config("rasa", MethodNet(nnx.Rngs(0))), jax.random.key(0)
    )
    bad = {"lora_shared": {"layers": {"q_proj": {"lora_a": jnp.zeros((3, 3))}}}}
    with pytest.raises(ValueError, match=r"'lora_shared/layers/q_proj/lora_a' holds \(3, 3\)"):
        rln.update_from_dict(model, bad)


def test_dora_dropout_is_factored_and_off_in_eval():
    cfg = rl.LoraConfig(rank=2, alpha=2.0, method="dora", dropout=0.5)
    layer = rln.add_adapters(
        nnx.Linear(6, 6, rngs=nnx.Rngs(0)),
        cfg,
        jax.random.key(0),
        dropout_rngs=nnx.Rngs(3),
        mode="fused",
    )
    _randomize_b(layer)
    x = jax.random.normal(jax.random.key(1), (4, 6))
    assert not layer._fuses(x)  # active dropout: the dispatch computes it factored
    assert not np.allclose(layer(x), layer(x))
    layer.eval()
    assert layer._fuses(x)
    params = rln.to_params(layer)
    plain = nnx.Linear(6, 6, rngs=nnx.Rngs(0))
    rln.update_from_dict(plain, rl.merge(params, cfg))
    assert_close(layer(x), plain(x), rel=1e-5)


@LLAMA_DTYPES
def test_method_leaves_carry_sharding_metadata_and_placement():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    dora = rln.add_adapters(_llama(), rl.LoraConfig(rank=4, method="dora"), jax.random.key(1))
    q, o = dora.model.layers[0].self_attn.q_proj, dora.model.layers[0].self_attn.o_proj
    assert q.lora_magnitude.get_metadata("out_sharding") == ("model",)  # the output axis
    assert o.lora_magnitude.get_metadata("out_sharding") == ("data",)
    model = _llama()
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    rln.add_adapters(model, rl.LoraConfig(rank=4, method="rasa"), jax.random.key(1))
    q, o = model.model.layers[1].self_attn.q_proj, model.model.layers[1].self_attn.o_proj
    assert q.lora_d.get_metadata("out_sharding") == (None,)  # rank axis: replicated
    pools = q.lora_shared["model"]["layers"]["self_attn"]
    assert pools["q_proj"]["lora_a"].get_metadata("out_sharding") == ("data", None)
    assert pools["q_proj"]["lora_b"].get_metadata("out_sharding") == (None, "model")
    assert pools["o_proj"]["lora_a"].get_metadata("out_sharding") == ("model", None)
    # Placed on the mesh like their kernels; nnx.get_partition_spec reads the metadata.
    assert pools["q_proj"]["lora_a"][...].sharding == NamedSharding(mesh, P("data", None))
    assert q.lora_d[...].sharding == NamedSharding(mesh, P(None))
    specs = rln.to_params(nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam)))
    assert specs["lora_shared"]["model"]["layers"]["mlp"]["down_proj"]["lora_b"] == P(None, "data")


# ---------------------------------------------------------------------------- errors
@LLAMA_DTYPES
def test_bad_inputs_fail_clearly():
    model = _llama()
    with pytest.raises(ValueError, match=r"matched no kernel.*'model/layers/0/mlp/down_proj'"):
        rln.add_adapters(model, rl.LoraConfig(targets=["nope"]), jax.random.key(0))
    with pytest.raises(ValueError, match=r"rank 32 at 'model/layers/0/mlp/down_proj' exceeds"):
        rln.add_adapters(model, rl.LoraConfig(rank=32), jax.random.key(0))
    with pytest.raises(ValueError, match=r"gives kernel axes 'oi' for 'lm_head'"):
        rln.add_adapters(
            model, rl.LoraConfig(targets=["lm_head"], fan_in_fan_out=True), jax.random.key(0)
        )
    rln.add_adapters(model, rl.LoraConfig(targets=["q_proj"]), jax.random.key(0))
    with pytest.raises(ValueError, match=r"'model/layers/0/self_attn/q_proj' already has adapters"):
        rln.add_adapters(model, rl.LoraConfig(targets=["v_proj"]), jax.random.key(0))
    rln.remove_adapters(model)
    assert nnx.graphdef(model) == nnx.graphdef(_llama())

    class WithConv(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, kernel_size=(3,), rngs=rngs)
            self.proj = nnx.Linear(4, 4, rngs=rngs)

    conv_model = WithConv(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'conv' is a Conv, which the factored NNX forward"):
        rln.add_adapters(conv_model, rl.LoraConfig(rank=2), jax.random.key(0))
    only_proj = rl.LoraConfig(rank=2, exclude=["conv"])
    assert type(rln.add_adapters(conv_model, only_proj, jax.random.key(0)).proj) is rln.LoraLinear
    with pytest.raises(ValueError, match="the model has no adapters"):
        rln.merge(_llama())
    with pytest.raises(ValueError, match="key in pure_dict not available in state"):
        rln.update_from_dict(_llama(), {"model": {"nope": jnp.zeros(2)}})
