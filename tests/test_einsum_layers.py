"""Weights not named ``kernel``: einsum layers, stacked projections, several weights per dict.

The layer below is written like Google's ``gemma`` library's linen ``Einsum`` (called as
``layer(eqn, x)``, weight named by ``weight_name``; the feed-forward shares one scope between
``gating_einsum`` and ``linear``) and registered through the public registry, so this file runs
without the gemma library (tests/test_gemma_lib.py runs the real one by hand; tests/test_tunix.py
the tunix NNX models). References are written here: merged deltas are ``(alpha/sqrt(r)) A @ B``
laid out by hand, the "own apply" is the unmodified model on the merged tree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax import nnx as rnnx
from rslora_jax.frontends.registry import EinsumLayer, register_einsum_layer
from rslora_jax.hf.peft import export_peft_mapped, gemma_module_map
from tests._asserts import assert_close

RANK, ALPHA = 2, 3.0
SCALE = ALPHA / np.sqrt(RANK)
D, N, K, H, F = 8, 4, 2, 4, 12


class Einsum(nn.Module):
    """gemma's linen Einsum: ``jnp.einsum(eqn, x, w)`` with a weight named by the module."""

    shape: tuple[int, ...]
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = self.param(self.weight_name, nn.initializers.normal(0.3), self.shape)
        return jnp.einsum(eqn, x, w)


register_einsum_layer(
    Einsum, EinsumLayer(weight=lambda m: m.weight_name, equation=("arg", 0), input_arg=1),
    frontend="linen",
)  # fmt: skip


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x):
        gating = Einsum((2, D, F), weight_name="gating_einsum")
        nn.share_scope(self, gating)
        gate = gating("...F,NFH->...NH", x)
        act = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        linear = Einsum((F, D), weight_name="linear")
        nn.share_scope(self, linear)
        return linear("...H,HF->...F", act)


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = Einsum((N, D, H), name="q_einsum")("BTD,NDH->BTNH", x)
        k, v = Einsum((2, K, D, H), name="kv_einsum")("BSD,CKDH->CBSKH", x)
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        probs = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BTNS", q, k) / np.sqrt(H), axis=-1)
        encoded = jnp.einsum("BTNS,BSNH->BTNH", probs, v)
        return Einsum((N, H, D), name="attn_vec_einsum")("BTNH,NHD->BTD", encoded)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + Attention(name="attn")(x)
        return x + FeedForward(name="mlp")(x)


def _forward(module, tokens):
    table = module.param("input_embedding", nn.initializers.normal(1.0), (16, D))
    x = table[tokens]
    for i in range(2):
        x = Block(name=f"layer_{i}")(x)
    return x @ table.T


class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        return _forward(self, tokens)


class _Layers(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = Block(name=str(i))(x)
        return x


class LayeredModel(nn.Module):
    """The same blocks at ``layers/<i>/...`` (the layout RaSA's default layer pattern reads; the
    property suite's einsum frontend)."""

    @nn.compact
    def __call__(self, tokens):
        table = self.param("input_embedding", nn.initializers.normal(1.0), (16, D))
        return _Layers(name="layers")(table[tokens]) @ table.T


class JitModel(nn.Module):
    """As gemma's Transformer: ``__call__`` wrapped by ``nn.jit`` (cached by shapes alone)."""

    @nn.jit
    @nn.compact
    def __call__(self, tokens):
        return _forward(self, tokens)


TOKENS = (jnp.arange(10, dtype=jnp.int32).reshape(2, 5) * 3) % 16
MODEL = Model()
PARAMS = MODEL.init(jax.random.key(0), TOKENS)["params"]
PROJ = (
    "attn/q_einsum",
    "attn/kv_einsum",
    "attn/attn_vec_einsum",
    "mlp/gating_einsum",
    "mlp/linear",
)
AXES = {"q_einsum": "oio", "kv_einsum": "loio", "attn_vec_einsum": "iio", "gating_einsum": "lio",
        "linear": "io"}  # fmt: skip


def _config(**kw):
    axes = rl.infer_kernel_axes(MODEL.apply, {"params": PARAMS}, TOKENS)
    return rl.LoraConfig(rank=RANK, alpha=ALPHA, kernel_axes=axes, **kw)


def _random(params, key=1):
    adapters, base = rl.split(params)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return rl.combine(jax.tree.unflatten(treedef, new), base)


def _weight(tree, path):
    layer, block, name = path.split("/")
    holder = tree[layer][block][name]
    return holder["w"] if isinstance(holder, dict) else holder


def _delta_by_hand(name, w, a, b):
    if name == "q_einsum":  # (N, D, H), input D
        return (a @ b).reshape(D, N, H).transpose(1, 0, 2)
    if name == "kv_einsum":  # (C, K, D, H): one adapter per member
        return np.stack([(a[c] @ b[c]).reshape(D, K, H).transpose(1, 0, 2) for c in range(2)])
    if name == "gating_einsum":  # (C, D, F)
        return np.stack([a[c] @ b[c] for c in range(2)])
    return (a @ b).reshape(w.shape)  # attn_vec (N, H, D), linear (F, D): inputs first


def _leaves(tree, path):
    layer, block, name = path.split("/")
    holder = tree[layer][block]
    holder = holder[name] if isinstance(holder[name], dict) else holder[f"lora_{name}"]
    return np.asarray(holder["lora_a"], np.float64), np.asarray(holder["lora_b"], np.float64)


def test_infer_kernel_axes_reads_roles_and_members_off_the_calls():
    axes = rl.infer_kernel_axes(MODEL.apply, {"params": PARAMS}, TOKENS)
    assert axes == {f"layer_{i}/{p}": AXES[p.split("/")[1]] for i in range(2) for p in PROJ}


def test_init_layout_all_linear_and_zero_b_exact():
    cfg = _config()
    params = rl.init(PARAMS, cfg, jax.random.key(1))
    assert set(rl.adapter_paths(params)) == {f"layer_{i}/{p}" for i in range(2) for p in PROJ}
    mlp = params["layer_0"]["mlp"]  # two weights in one scope: a sub-dict per weight
    assert sorted(mlp) == ["gating_einsum", "linear", "lora_gating_einsum", "lora_linear"]
    assert mlp["lora_gating_einsum"]["lora_a"].shape == (2, D, RANK)  # one adapter per member
    assert params["layer_0"]["attn"]["kv_einsum"]["lora_b"].shape == (2, RANK, K * H)
    adapters, base = rl.split(params)
    jax.tree.map(np.testing.assert_array_equal, base, PARAMS)
    assert jax.tree.structure(rl.combine(adapters, base)) == jax.tree.structure(params)
    y0 = MODEL.apply({"params": PARAMS}, TOKENS)
    # Factored: the layer's own call plus an exact zero (eager, op by op).
    y = rl.lora(MODEL.apply, cfg, "factored")({"params": params}, TOKENS)
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("model", [MODEL, JitModel()], ids=["plain", "nn_jit"])
def test_modes_agree_with_the_model_on_the_merged_tree(model):
    cfg = _config()
    params = _random(rl.init(PARAMS, cfg, jax.random.key(1)))
    merged = rl.merge(params, cfg)
    own = jax.jit(model.apply)({"params": merged}, TOKENS)
    for mode in ("factored", "fused", "merged", "auto", "factored"):  # nn.jit: no stale trace
        y = jax.jit(rl.lora(model.apply, cfg, mode))({"params": params}, TOKENS)
        assert_close(y, own, rel=1e-5)
    # Each merged weight is W + (alpha/sqrt(r)) A @ B laid out by hand.
    for i in range(2):
        for p in PROJ:
            path = f"layer_{i}/{p}"
            w0 = np.asarray(_weight(PARAMS, path), np.float64)
            a, b = _leaves(params, path)
            expected = SCALE * _delta_by_hand(p.split("/")[1], w0, a, b)
            assert_close(np.asarray(_weight(merged, path), np.float64) - w0, expected, rel=1e-5)
    # unmerge recovers the base.
    assert_close(rl.unmerge(merged, params, cfg), PARAMS, rel=1e-5)


@pytest.mark.loose_dtypes  # optax's Adam bias correction
def test_jitted_step_trains_only_the_adapters_and_adam_state_is_twice_them():
    cfg = _config()
    params = rl.init(PARAMS, cfg, jax.random.key(1))
    adapters, base = rl.split(params)
    tx = rl.optimizer(optax.adam(1e-2), params)
    apply = rl.lora(MODEL.apply, cfg)

    @jax.jit
    def step(adapters, opt_state, base):
        def loss(ad):
            return jnp.mean(jnp.square(apply({"params": rl.combine(ad, base)}, TOKENS)))

        grads = jax.grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    opt_state = tx.init(adapters)
    for _ in range(2):
        adapters, opt_state = step(adapters, opt_state, base)
    moved, _ = rl.split(params)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.any(x != y)), adapters, moved)))
    n = sum(x.size for x in jax.tree.leaves(adapters))
    state = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert sum(x.size for x in state) == 2 * n


def test_partition_specs_and_checkpoint_round_trip(tmp_path):
    cfg = _config()
    params = _random(rl.init(PARAMS, cfg, jax.random.key(1)))
    base_specs = jax.tree.map(lambda x: P(*([None] * (x.ndim - 1)), "m"), PARAMS)
    specs = rl.partition_specs(params, base_specs, cfg)
    mlp = specs["layer_0"]["mlp"]
    assert mlp["lora_linear"]["lora_b"] == P(None, "m")  # B takes the output axes' spec
    assert mlp["lora_gating_einsum"]["lora_a"] == P(None, None, None)
    assert mlp["lora_gating_einsum"]["lora_b"] == P(None, None, "m")  # member axis, r, F
    rl.save_adapters(tmp_path / "ck", params, cfg)
    restored, saved_cfg = rl.load_adapters(tmp_path / "ck", PARAMS)
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    assert saved_cfg == cfg
    # The manifest checks each weight's shape, whatever it is called.
    other = jax.tree.map(lambda x: x, PARAMS)
    other["layer_0"]["mlp"] = {**other["layer_0"]["mlp"], "linear": jnp.zeros((F + 1, D))}
    with pytest.raises(rl.CheckpointError, match="layer_0/mlp/lora_linear"):
        rl.load_adapters(tmp_path / "ck", other)


def test_peft_export_names_members(tmp_path):
    import json

    import safetensors.numpy

    cfg = _config()
    params = _random(rl.init(PARAMS, cfg, jax.random.key(1)))
    export_peft_mapped(tmp_path, params, cfg, gemma_module_map(params))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    a, b = _leaves(params, "layer_1/mlp/gating_einsum")
    for c, proj in enumerate(("gate_proj", "up_proj")):
        name = f"base_model.model.model.layers.1.mlp.{proj}"
        np.testing.assert_array_equal(tensors[f"{name}.lora_A.weight"], a[c].T.astype(np.float32))
        np.testing.assert_array_equal(tensors[f"{name}.lora_B.weight"], b[c].T.astype(np.float32))


def test_weights_of_unknown_use_are_refused_by_name_and_warned_by_all_linear():
    with pytest.raises(ValueError, match=r"'layer_0/attn/q_einsum' \(w \(4, 8, 4\)\)"):
        rl.init(PARAMS, rl.LoraConfig(rank=RANK, targets=["q_einsum"]), jax.random.key(0))
    with pytest.raises(ValueError, match="matched no kernel.*whose use is unknown"):
        rl.init(PARAMS, rl.LoraConfig(rank=RANK), jax.random.key(0))
    with pytest.raises(ValueError, match=r"'input_embedding' \(input_embedding \(16, 8\)\)"):
        rl.init(PARAMS, rl.LoraConfig(rank=RANK, targets="input_embedding"), jax.random.key(0))
    # all-linear with only some uses known: the others are listed in a warning, never silently.
    partial = {k: v for k, v in _config().kernel_axes if "mlp" not in k}
    with pytest.warns(UserWarning, match="layer_0/mlp/gating_einsum"):
        params = rl.init(PARAMS, rl.LoraConfig(rank=RANK, kernel_axes=partial), jax.random.key(0))
    assert not any("mlp" in p for p in rl.adapter_paths(params))


class _RawProj(nnx.Module):
    """A projection NNX cannot adapt: a raw 2-D Param in ``jnp.dot``."""

    def __init__(self, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (4, 4)))
        self.out = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.dot(x, self.table[...]))


def test_nnx_all_linear_warns_and_targets_refuse_unadaptable_weights():
    with pytest.warns(UserWarning, match="'table' \\(4, 4\\)"):
        model = rnnx.add_adapters(_RawProj(nnx.Rngs(0)), rl.LoraConfig(rank=2), jax.random.key(0))
    assert isinstance(model.out, rnnx.LoraLinear)
    with pytest.raises(ValueError, match="cannot adapt: 'table' \\(4, 4\\)"):
        rnnx.add_adapters(_RawProj(nnx.Rngs(0)), rl.LoraConfig(rank=2, targets=["table", "out"]),
                          jax.random.key(0))  # fmt: skip


def test_rasa_refuses_stacked_members_in_unscanned_layers():
    cfg = _config(method="rasa")
    with pytest.raises(ValueError, match="layer index .* and its kernel has layer axes"):
        rl.init(PARAMS, cfg.replace(method=rl.RaSA(k=1, layer_pattern=r"layer_(\d+)/")),
                jax.random.key(0))  # fmt: skip
