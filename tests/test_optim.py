"""optimizer(): only adapters move, Adam state is exactly 2x the adapters, both gradient routes agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rslora_jax as rl
from tests import _models as M
from tests._asserts import assert_close

# optax's Adam bias correction computes `float ** int32`, which strict promotion rejects.
pytestmark = pytest.mark.loose_dtypes

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def setup():
    model = M.MLP()
    x = jax.random.normal(KEY, (8, 7))
    y = jax.random.normal(jax.random.key(1), (8, 8))
    cfg = rl.LoraConfig(rank=4, alpha=8.0)
    params = rl.init(M.init_model(model, x), cfg, jax.random.key(2))
    apply = rl.lora(model.apply, cfg)

    def loss(p):
        return jnp.mean((apply({"params": p}, x) - y) ** 2)

    return params, loss


def _float_elements(tree):
    return sum(
        int(np.prod(leaf.shape))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    )


def test_adam_state_is_exactly_twice_the_adapters(setup):
    params, _ = setup
    opt = rl.optimizer(optax.adam(1e-2), params)
    state = opt.init(params)
    assert _float_elements(state) == 2 * rl.num_adapter_params(params)
    adapters, _ = rl.split(params)
    assert _float_elements(opt.init(adapters)) == 2 * rl.num_adapter_params(params)


def test_whole_tree_gradients_move_only_adapters(setup):
    params, loss = setup
    opt = rl.optimizer(optax.adam(1e-2), params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss)(p)
        upd, s = opt.update(grads, s, p)
        return optax.apply_updates(p, upd), s, grads

    p, s = params, opt.init(params)
    for _ in range(3):
        p, s, grads = step(p, s)
    adapters0, base0 = rl.split(params)
    adapters1, base1 = rl.split(p)
    for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(base1)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(adapters0), jax.tree.leaves(adapters1)):
        assert not np.allclose(a, b)
    # The base did receive gradient (so zero updates are the optimizer's doing, not the loss's).
    _, base_grads = rl.split(grads)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(base_grads)) > 0
    assert float(loss(p)) < float(loss(params))


def test_adapter_only_route_equals_whole_tree_route(setup):
    params, loss = setup
    adapters, base = rl.split(params)
    opt = rl.optimizer(optax.adamw(1e-2, weight_decay=0.1), params)

    # Both routes step from the same parameters. Adam turns a near-zero gradient's rounding
    # into a whole lr-sized step, so the routes are compared on what they compute from the same
    # point: the adapter gradient, and the update each optimizer state makes of one gradient.
    @jax.jit
    def step(p, sp, sa):
        g = jax.grad(loss)(p)
        a = rl.split(p)[0]
        g_adapters = jax.grad(lambda a: loss(rl.combine(a, base)))(a)
        upd, sp = opt.update(g, sp, p)
        upd_adapters, sa = opt.update(rl.split(g)[0], sa, a)
        return optax.apply_updates(p, upd), sp, sa, (g, g_adapters), (upd, upd_adapters)

    p, sp, sa = params, opt.init(params), opt.init(adapters)
    for t in range(3):
        p, sp, sa, (g, g_adapters), (upd, upd_adapters) = step(p, sp, sa)
        assert_close(g_adapters, rl.split(g)[0], rel=1e-5, what=f"gradient, step {t}")
        assert_close(upd_adapters, rl.split(upd)[0], rel=1e-6, what=f"update, step {t}")


def test_optimizer_without_adapters_is_an_error():
    with pytest.raises(ValueError, match="params hold no adapter leaves"):
        rl.optimizer(optax.adam(1e-3), {"d": {"kernel": jnp.ones((2, 2))}})
