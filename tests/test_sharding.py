"""A sharded train step on a (2, 4) mesh of fake CPU devices equals the one-device step."""

from __future__ import annotations

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

pytestmark = pytest.mark.loose_dtypes  # optax Adam (see test_optim)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(32, name="up")(x))
        h = nn.gelu(nn.Dense(16, name="mid")(h))
        return nn.Dense(8, name="down")(h)


LAYOUTS = {
    # FSDP: every kernel split over both mesh axes on its input dimension.
    "fsdp": {
        "up": P(("data", "model"), None),
        "mid": P(("data", "model"), None),
        "down": P(("data", "model"), None),
    },
    # Tensor parallel (Megatron-style): column- then row-parallel.
    "tensor_parallel": {"up": P(None, "model"), "mid": P("model", None), "down": P(None, "model")},
    # Both at once.
    "2d": {"up": P("data", "model"), "mid": P("model", "data"), "down": P("data", "model")},
}


def _base_specs(params, layout):
    return {
        name: {leaf: (layout[name] if leaf == "kernel" else P()) for leaf in params[name]}
        for name in params
    }


@pytest.fixture(scope="module")
def problem():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (16, 16))
    y = jax.random.normal(jax.random.key(1), (16, 8))
    base = jax.jit(model.init)(jax.random.key(2), x)["params"]
    cfg = rl.LoraConfig(rank=4, alpha=8.0)
    adapters, _ = rl.split(rl.init(base, cfg, jax.random.key(3)))
    # Non-zero B so that the first step moves A as well.
    adapters = jax.tree.map(lambda a: a + 0.05, adapters)
    opt = rl.optimizer(optax.adamw(1e-2, weight_decay=0.01))

    def make_step(mode):
        apply = rl.lora(model.apply, cfg, mode=mode)

        def step(adapters, state, base, x, y):
            def loss(ad):
                out = apply({"params": rl.combine(ad, base)}, x)
                return jnp.mean((out - y) ** 2)

            value, grads = jax.value_and_grad(loss)(adapters)
            upd, state = opt.update(grads, state, adapters)
            return optax.apply_updates(adapters, upd), state, value, grads

        return step

    def run(step_fn, adapters, state, base, x, y, n=3):
        losses = []
        for _ in range(n):
            adapters, state, value, _ = step_fn(adapters, state, base, x, y)
            losses.append(float(value))
        return adapters, state, losses

    # The reference: one device, factored forward.
    single_step = jax.jit(make_step("factored"))
    single = run(single_step, adapters, opt.init(adapters), base, x, y)
    return dict(
        single_step=single_step,
        base=base,
        adapters=adapters,
        opt=opt,
        make_step=make_step,
        run=run,
        x=x,
        y=y,
        cfg=cfg,
        single=single,
    )


@pytest.mark.parametrize("mode", ["factored", "fused"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_step_equals_single_device(problem, layout, mode):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    p = problem
    base_specs = _base_specs(p["base"], LAYOUTS[layout])
    specs = rl.partition_specs(rl.combine(p["adapters"], p["base"]), base_specs, p["cfg"])
    ad_specs, base_specs = rl.split(specs)
    state_specs = rl.opt_state_specs(p["opt"], p["adapters"], ad_specs)

    def named(tree):
        return jax.tree.map(
            lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda s: isinstance(s, P)
        )

    ad_sh, base_sh, st_sh = named(ad_specs), named(base_specs), named(state_specs)
    batch_sh = NamedSharding(mesh, P("data"))
    step = jax.jit(
        p["make_step"](mode),
        in_shardings=(ad_sh, st_sh, base_sh, batch_sh, batch_sh),
        out_shardings=(ad_sh, st_sh, NamedSharding(mesh, P()), ad_sh),
    )
    adapters = jax.device_put(p["adapters"], ad_sh)
    base = jax.device_put(p["base"], base_sh)
    state = jax.jit(p["opt"].init, out_shardings=st_sh)(adapters)
    out, state, losses = p["run"](step, adapters, state, base, p["x"], p["y"])

    want, _, want_losses = p["single"]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert jax.tree.structure(out) == jax.tree.structure(want)
    # The trained adapters are not compared entry by entry (Adam turns a near-zero gradient's
    # rounding into a whole lr-sized step): the gradients at the trained adapters are, sharded
    # against one device.
    grads = step(out, state, base, p["x"], p["y"])[3]
    host = jax.device_get((out, state))
    want_grads = p["single_step"](*host, p["base"], p["x"], p["y"])[3]
    assert_close(grads, want_grads, rel=2e-5, what=f"{layout}/{mode}")
    # Adapters really are sharded as derived: A takes the kernel's input spec, B its output spec.
    up = LAYOUTS[layout]["up"]
    assert out["up"]["lora_a"].sharding.spec == P(up[0], None)
    assert out["up"]["lora_b"].sharding.spec == P(None, up[1] if len(up) > 1 else None)
    shard_shapes = {s.data.shape for s in out["up"]["lora_a"].addressable_shards}
    if up[0] is not None:
        assert all(s[0] < out["up"]["lora_a"].shape[0] for s in shard_shapes)


def test_stacked_and_flattened_axes_specs():
    cfg = rl.LoraConfig(rank=2, kernel_axes={"stack": "lio", "heads": "ioo"})
    params = {
        "stack": {"kernel": jnp.ones((4, 16, 8))},
        "heads": {"kernel": jnp.ones((16, 4, 2))},
    }
    full = rl.init(params, cfg, jax.random.key(0))
    specs = rl.partition_specs(
        full,
        {"stack": {"kernel": P("pp", "fsdp", "tp")}, "heads": {"kernel": P("fsdp", "tp", None)}},
        cfg,
    )
    assert specs["stack"]["lora_a"] == P("pp", "fsdp", None)
    assert specs["stack"]["lora_b"] == P("pp", None, "tp")
    # (heads, head_dim) flattened: sharding the leading axis is exact on the flattened axis.
    assert specs["heads"]["lora_b"] == P(None, "tp")
    # Not expressible on a flattened axis (only a later axis sharded): replicated.
    specs = rl.partition_specs(
        full, {"stack": {"kernel": P()}, "heads": {"kernel": P(None, None, "tp")}}, cfg
    )
    assert specs["heads"]["lora_b"] == P(None, None)


def test_opt_state_specs_over_the_whole_tree():
    """rl.optimizer over base + adapters keeps no state for the base (optax.MaskedNode there):
    the state's specs put each moment on its adapter's spec and keep the masked nodes."""
    cfg = rl.LoraConfig(rank=2)
    base = {"d": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}
    full = rl.init(base, cfg, jax.random.key(0))
    specs = rl.partition_specs(full, {"d": {"kernel": P("x", "y"), "bias": P()}}, cfg)
    opt = rl.optimizer(optax.adam(1e-3), full)
    state = rl.opt_state_specs(opt, full, specs)
    adam = state.inner_states["adapter"].inner_state[0]
    assert adam.count == P()
    for moment in (adam.mu, adam.nu):
        assert moment["d"]["lora_a"] == P("x", None) and moment["d"]["lora_b"] == P(None, "y")
        assert isinstance(moment["d"]["kernel"], optax.MaskedNode)
    assert jax.tree.structure(state, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        jax.eval_shape(opt.init, full)
    )


def test_missing_base_spec_is_an_error():
    full = rl.init({"d": {"kernel": jnp.ones((4, 4))}}, rl.LoraConfig(rank=2), jax.random.key(0))
    with pytest.raises(ValueError, match="base_specs has no entry for 'd'"):
        rl.partition_specs(full, {"e": {"kernel": P()}})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_merge_of_sharded_params_stays_sharded(problem, layout):
    """merge under jit on sharded inputs: same values, each kernel keeps its own sharding."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    p = problem
    full = rl.combine(p["adapters"], p["base"])
    specs = rl.partition_specs(full, _base_specs(p["base"], LAYOUTS[layout]), p["cfg"])
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)
    )
    sharded = jax.device_put(full, shardings)
    merged = jax.jit(rl.merge, static_argnums=1)(sharded, p["cfg"])
    want = rl.merge(full, p["cfg"])
    _, base_shardings = rl.split(shardings)
    for (path, got), ref, sh in zip(
        jax.tree_util.tree_leaves_with_path(merged),
        jax.tree.leaves(want),
        jax.tree.leaves(base_shardings),
    ):
        assert_close(got, ref, rel=1e-6, what=jax.tree_util.keystr(path))
        assert got.sharding.is_equivalent_to(sh, got.ndim), (
            jax.tree_util.keystr(path),
            got.sharding,
        )
