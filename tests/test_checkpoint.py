"""Checkpoints: round trips, bit-identical resume, mismatch errors, interrupted saves."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rslora_jax as rl
from rslora_jax.checkpoint import CheckpointError
from tests import _models as M
from tests._faults import die_between_renames

pytestmark = pytest.mark.loose_dtypes  # optax Adam (see test_optim)

CFG = rl.LoraConfig(rank=4, alpha=8.0, rank_pattern={"out": 2})


@pytest.fixture(scope="module")
def setup():
    model = M.MLP()
    x = jax.random.normal(jax.random.key(0), (8, 7))
    y = jax.random.normal(jax.random.key(1), (8, 8))
    base = M.init_model(model, x)
    params = rl.init(base, CFG, jax.random.key(2))
    opt = rl.optimizer(optax.adamw(3e-2))
    apply = rl.lora(model.apply, CFG)

    @jax.jit
    def step(adapters, state, base, key):
        xb = x + 0.1 * jax.random.normal(key, x.shape)  # step-dependent data

        def loss(ad):
            return jnp.mean((apply({"params": rl.combine(ad, base)}, xb) - y) ** 2)

        g = jax.grad(loss)(adapters)
        upd, state = opt.update(g, state, adapters)
        return optax.apply_updates(adapters, upd), state

    return base, params, opt, step


def _train(step, adapters, state, base, start, stop):
    for t in range(start, stop):
        adapters, state = step(adapters, state, base, jax.random.fold_in(jax.random.key(9), t))
    return adapters, state


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_adapter_round_trip(setup, tmp_path):
    base, params, *_ = setup
    adapters, _ = rl.split(params)
    params = rl.combine(jax.tree.map(lambda v: v + 0.25, adapters), base)  # non-zero B
    rl.save_adapters(tmp_path / "ad", params, CFG)
    restored, cfg = rl.load_adapters(tmp_path / "ad", base)
    _assert_trees_equal(restored, params)
    assert cfg == CFG
    # Only adapters are on disk: far smaller than the base.
    size = sum(f.stat().st_size for f in (tmp_path / "ad").rglob("*") if f.is_file())
    base_bytes = sum(v.nbytes for v in jax.tree.leaves(base))
    adapter_bytes = sum(v.nbytes for v in jax.tree.leaves(rl.split(params)[0]))
    assert adapter_bytes < base_bytes and size < base_bytes + 64 * 1024


def test_restore_onto_sharding(setup, tmp_path):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    base, params, *_ = setup
    rl.save_adapters(tmp_path / "ad", params, CFG)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    adapters, _ = rl.split(params)
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), adapters)
    shardings["mid"]["lora_a"] = NamedSharding(mesh, P("data"))
    shardings["out"]["lora_b"] = NamedSharding(mesh, P(None, "model"))
    restored, _ = rl.load_adapters(tmp_path / "ad", base, shardings=shardings)
    assert restored["mid"]["lora_a"].sharding.spec == P("data")
    assert restored["out"]["lora_b"].sharding.spec == P(None, "model")
    _assert_trees_equal(rl.split(restored)[0], adapters)


def test_resume_is_bit_identical(setup, tmp_path):
    base, params, opt, step = setup
    adapters, _ = rl.split(params)
    straight, straight_state = _train(step, adapters, opt.init(adapters), base, 0, 6)

    first, state = _train(step, adapters, opt.init(adapters), base, 0, 3)
    with rl.CheckpointManager(tmp_path / "run", config=CFG) as mngr:
        mngr.save(3, rl.combine(first, base), state, extra={"data_seed": 9})
    # A fresh process would only have the base and a template of the optimizer state.
    with rl.CheckpointManager(tmp_path / "run", config=CFG) as mngr:
        template = jax.eval_shape(opt.init, adapters)
        restored, rstate, t, extra = mngr.restore(base, template)
    assert t == 3 and extra == {"data_seed": 9}
    resumed, resumed_state = _train(step, rl.split(restored)[0], rstate, base, t, 6)
    _assert_trees_equal(resumed, straight)
    _assert_trees_equal(resumed_state, straight_state)


def test_manager_keeps_last_steps(setup, tmp_path):
    _base, params, opt, _ = setup
    state = opt.init(rl.split(params)[0])
    with rl.CheckpointManager(tmp_path / "run", max_to_keep=2) as mngr:
        for t in (1, 2, 3):
            mngr.save(t, params, state)
        assert mngr.all_steps() == [2, 3] and mngr.latest_step() == 3


def test_restore_into_wrong_base_fails_clearly(setup, tmp_path):
    base, params, opt, _ = setup
    rl.save_adapters(tmp_path / "ad", params, CFG)
    wrong_shape = jax.tree.map(lambda v: v, base)
    wrong_shape["up"] = {"kernel": jnp.ones((9, 16)), "bias": jnp.zeros(16)}
    with pytest.raises(
        CheckpointError,
        match=r"'up': checkpoint was made for a kernel of shape \(7, 16\), the base has \(9, 16\)",
    ):
        rl.load_adapters(tmp_path / "ad", wrong_shape)
    renamed = {("upper" if k == "up" else k): v for k, v in base.items()}
    with pytest.raises(CheckpointError, match=r"'up': no such kernel in the base parameters"):
        rl.load_adapters(tmp_path / "ad", renamed)
    state = opt.init(rl.split(params)[0])
    with rl.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, params, state)
        with pytest.raises(CheckpointError, match="checkpoint step 1 .* does not fit"):
            mngr.restore(wrong_shape, state)
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint"):
        rl.load_adapters(tmp_path / "missing", base)
    with rl.CheckpointManager(tmp_path / "empty") as mngr, pytest.raises(FileNotFoundError):
        mngr.restore(base, state)


def test_failed_save_keeps_last_good_checkpoint(setup, tmp_path):
    base, params, opt, _ = setup
    rl.save_adapters(tmp_path / "ad", params, CFG)
    good = rl.load_adapters(tmp_path / "ad", base)[0]
    # A leaf orbax cannot serialise makes the save fail part-way through.
    broken = rl.combine(
        {"up": {"lora_a": object(), "lora_b": params["up"]["lora_b"]}}, rl.split(params)[1]
    )
    with pytest.raises(Exception):  # noqa: B017 - whatever orbax raises
        rl.save_adapters(tmp_path / "ad", broken, CFG)
    _assert_trees_equal(rl.load_adapters(tmp_path / "ad", base)[0], good)
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temporary directories left behind

    state = opt.init(rl.split(params)[0])
    with rl.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, params, state)
        with pytest.raises(Exception):  # noqa: B017
            mngr.save(2, broken, state)
        assert mngr.latest_step() == 1
        restored, *_ = mngr.restore(base, state)
    _assert_trees_equal(restored, params)


def test_crash_between_renames_keeps_a_complete_checkpoint(setup, tmp_path, monkeypatch):
    """A save killed between its two renames: the next load finds the old checkpoint whole."""
    base, params, *_ = setup
    rl.save_adapters(tmp_path / "ad", params, CFG)
    newer = rl.combine(jax.tree.map(lambda x: x + 1, rl.split(params)[0]), base)

    Killed = die_between_renames(monkeypatch)
    with pytest.raises(Killed):
        rl.save_adapters(tmp_path / "ad", newer, CFG)
    monkeypatch.undo()
    assert not (tmp_path / "ad").exists()
    _assert_trees_equal(rl.load_adapters(tmp_path / "ad", base)[0], params)
    rl.save_adapters(tmp_path / "ad", newer, CFG)  # the next save replaces it whole
    _assert_trees_equal(rl.load_adapters(tmp_path / "ad", base)[0], newer)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_save_without_adapters_is_an_error(setup, tmp_path):
    base, *_ = setup
    with pytest.raises(ValueError, match="params hold no adapter leaves"):
        rl.save_adapters(tmp_path / "ad", base)
