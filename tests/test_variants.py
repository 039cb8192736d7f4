"""PiSSA / OLoRA initialisation, LoRA+ and DoRA: against PEFT on PyTorch and written formulas."""

from __future__ import annotations

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax.variants import MAGNITUDE
from tests import _models as M
from tests._asserts import assert_close, rel_error

KEY = jax.random.key(0)


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _params(model, x, seed=0, std=0.4):
    """Random parameters with the model's shapes (cheaper than compiling its init)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(model.init, KEY, x)["params"]
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * std, s.dtype), abstract
    )


def _sign_fixed(a, b):
    """(A, B) with each rank component's sign fixed (SVD/QR factors are unique up to it)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    signs = np.sign(a[np.argmax(np.abs(a), axis=0), np.arange(a.shape[1])])
    return a * signs, b * signs[:, None]


class TorchNet:
    """Two torch Linear layers q (12 -> 7) and v (7 -> 10) with PEFT adapters."""

    def __init__(self, seed, **lora_kwargs):
        import peft
        import torch

        torch.manual_seed(seed)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.q = torch.nn.Linear(12, 7, bias=True)
                self.v = torch.nn.Linear(7, 10, bias=False)

            def forward(self, x):
                return self.v(torch.tanh(self.q(x)))

        net = Net()
        self.weights = {n: net.get_submodule(n).weight.detach().numpy().copy() for n in ("q", "v")}
        self.bias = net.q.bias.detach().numpy().copy()
        cfg = peft.LoraConfig(target_modules=["q", "v"], **lora_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = peft.get_peft_model(net, cfg)
        self.torch = torch

    def layer(self, name):
        return self.model.base_model.model.get_submodule(name)

    def flax_base(self):
        """The original weights in Flax layout: kernel = weight.T."""
        return {
            "q": {"kernel": jnp.asarray(self.weights["q"].T), "bias": jnp.asarray(self.bias)},
            "v": {"kernel": jnp.asarray(self.weights["v"].T)},
        }


# ---------------------------------------------------------------------------- PiSSA / OLoRA
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [True, False])
def test_principal_init_matches_peft(init, rslora):
    r, alpha = 4, 6.0
    net = TorchNet(0, r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=init)
    cfg = rl.LoraConfig(
        rank=r, alpha=alpha, scaling="rslora" if rslora else "lora", init=init, targets=["q", "v"]
    )
    ours = rl.init(net.flax_base(), cfg, KEY)
    for name in ("q", "v"):
        layer = net.layer(name)
        a_t = layer.lora_A["default"].weight.detach().numpy()  # (r, in)
        b_t = layer.lora_B["default"].weight.detach().numpy()  # (out, r)
        w_t = layer.base_layer.weight.detach().numpy()  # residual (out, in)
        got_a, got_b = _sign_fixed(ours[name]["lora_a"], ours[name]["lora_b"])
        want_a, want_b = _sign_fixed(a_t.T, b_t.T)
        # float32 SVDs (torch and ours): singular vectors to eps / gap (measured: 2e-6).
        assert_close(got_a, want_a, rel=1e-4, what=f"{name}/lora_a")
        assert_close(got_b, want_b, rel=1e-4, what=f"{name}/lora_b")
        assert_close(ours[name]["kernel"], w_t.T, rel=1e-4, what=f"{name}/kernel")
    assert ours["q"]["bias"] is not None


@pytest.mark.parametrize(("init", "use_dora"), [("pissa", True), ("olora", False)])
def test_principal_init_keeps_the_output(init, use_dora):
    """The base becomes W - gamma*A@B, so the output is unchanged; with DoRA, PEFT initialises
    the magnitude after PiSSA: ||W_res + gamma*A@B|| = ||W||."""
    model = M.MLP()
    x = jax.random.normal(KEY, (4, 7))
    params = _params(model, x)
    cfg = rl.LoraConfig(rank=3, alpha=2.0, init=init, use_dora=use_dora)
    tree = rl.init(params, cfg, KEY)
    for name in ("up", "mid", "out"):
        assert not np.allclose(tree[name]["kernel"], params[name]["kernel"], atol=1e-3)
        if use_dora:
            norm = np.linalg.norm(np.asarray(params[name]["kernel"], np.float64), axis=0)
            np.testing.assert_allclose(tree[name][MAGNITUDE], norm, rtol=1e-5)
    got = jax.jit(rl.lora(model.apply, cfg, mode="factored"))({"params": tree}, x)
    assert_close(got, model.apply({"params": params}, x), rel=1e-5)


def test_pissa_is_the_principal_svd_part_per_layer_and_orientation():
    """gamma*A@B is the top-r SVD part of each kernel (numpy), per layer of a stack ('lio'), and
    for a (out, in) fan_in_fan_out kernel in the (in, out) orientation of the factors."""
    rng = np.random.default_rng(0)
    params = {
        "stack": {"kernel": jnp.asarray(rng.standard_normal((3, 12, 8)), jnp.float32)},
        "conv1d": {"kernel": jnp.asarray(rng.standard_normal((9, 16)), jnp.float32)},  # (out, in)
    }
    cfg = rl.LoraConfig(
        rank=3, alpha=2.0, init="pissa", kernel_axes={"stack": "lio"}, fan_in_fan_out="conv1d"
    )
    tree = rl.init(params, cfg, KEY)
    scale = 2.0 / math.sqrt(3)

    def principal(w):
        u, s, vt = np.linalg.svd(w)
        return u[:, :3] * s[:3] @ vt[:3]

    def product(a, b):
        return scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)

    stack = tree["stack"]
    for i in range(3):
        w = np.asarray(params["stack"]["kernel"][i], np.float64)
        # A float32 SVD against numpy's float64 one (measured: up to 9e-6).
        assert_close(product(stack["lora_a"][i], stack["lora_b"][i]), principal(w), rel=1e-4)
        assert_close(stack["kernel"][i], w - principal(w), rel=1e-4, what="residual")
    conv = tree["conv1d"]
    assert conv["lora_a"].shape == (16, 3) and conv["lora_b"].shape == (3, 9)
    w = np.asarray(params["conv1d"]["kernel"], np.float64).T  # (in, out)
    assert_close(product(conv["lora_a"], conv["lora_b"]), principal(w), rel=1e-4)
    assert_close(conv["kernel"], (w - principal(w)).T, rel=1e-4, what="residual")


def test_pissa_niter_approximates_exact_pissa():
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    v = np.linalg.qr(rng.standard_normal((24, 24)))[0]
    s = 4.0 ** -np.arange(24)
    w = (u[:, :24] * s) @ v.T
    params = {"d": {"kernel": jnp.asarray(w, jnp.float32)}}
    exact = rl.init(params, rl.LoraConfig(rank=4, init="pissa"), KEY)["d"]
    approx = rl.init(params, rl.LoraConfig(rank=4, init="pissa_niter_2"), KEY)["d"]
    assert_close(approx["kernel"], exact["kernel"], rel=1e-2)
    assert np.abs(np.asarray(approx["kernel"]) - w).max() > 0.1  # the principal part was removed
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 40)), jnp.float32)
    apply = rl.lora(nn.Dense(24, use_bias=False).apply, rl.LoraConfig(rank=4, init="pissa_niter_2"))
    assert_close(apply({"params": approx}, x), np.asarray(x, np.float64) @ w, rel=1e-5)


def test_principal_init_dtype_and_errors():
    w = np.random.default_rng(0).standard_normal((16, 8))
    params = {"d": {"kernel": jnp.asarray(w, jnp.bfloat16)}}
    out = rl.init(params, rl.LoraConfig(rank=2, init="olora"), KEY)["d"]
    assert out["kernel"].dtype == jnp.bfloat16 and out["lora_a"].dtype == jnp.float32
    with pytest.raises(
        ValueError, match=r"init='pissa' changes the base kernels .* use rslora_jax.init"
    ):
        rl.init_adapters(params, rl.LoraConfig(rank=2, init="pissa"), KEY)
    abstract = jax.eval_shape(lambda: params)
    with pytest.raises(
        ValueError, match=r"init='olora' reads the kernel at 'd', which is abstract"
    ):
        rl.init(abstract, rl.LoraConfig(rank=2, init="olora"), KEY)
    with pytest.raises(ValueError, match=r"LoraConfig.init must be one of .*got 'pissa_niter_x'"):
        rl.LoraConfig(init="pissa_niter_x")
    with pytest.raises(ValueError, match=r"LoraConfig.init must be one of .*got 'pissa_niter_<n>'"):
        rl.LoraConfig(init="pissa_niter_<n>")
    assert rl.LoraConfig(init="pissa_niter_16").pissa_niter() == 16


# ---------------------------------------------------------------------------- LoRA+
def _adamw_updates(params, grads, lr_for, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """AdamW written out in numpy (float64), one learning rate per leaf (two parameter groups):
    the update of each step t from that step's parameters params[t] and gradient grads[t]."""
    flat = jax.tree_util.tree_flatten_with_path(params[0])[0]
    lrs = [lr_for(path) for path, _ in flat]
    m = [np.zeros(v.shape) for _, v in flat]
    v2 = [np.zeros(v.shape) for _, v in flat]
    out = []
    for t, (tree, grad) in enumerate(zip(params, grads), start=1):
        p = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad)]
        updates = []
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v2[i] = b2 * v2[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1**t), v2[i] / (1 - b2**t)
            updates.append(-lrs[i] * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[i]))
        out.append(updates)
    return out


@pytest.mark.loose_dtypes  # optax Adam
def test_lora_plus_equals_adamw_with_two_learning_rates():
    model = nn.Dense(8)
    x = jax.random.normal(KEY, (8, 7))
    y = jax.random.normal(jax.random.key(1), (8, 8))
    cfg = rl.LoraConfig(rank=4, alpha=8.0)
    adapters, base = rl.split(rl.init(_params(model, x), cfg, jax.random.key(2)))
    apply = rl.lora(model.apply, cfg)
    grad = jax.jit(
        jax.grad(lambda a: jnp.mean((apply({"params": rl.combine(a, base)}, x) - y) ** 2))
    )
    lr, ratio, wd = 1e-2, 16.0, 0.1
    opt = rl.optimizer(optax.adamw(lr, weight_decay=wd), lora_plus_ratio=ratio)
    state, a = opt.init(adapters), adapters
    update = jax.jit(opt.update)
    params, grads, updates = [], [], []
    for _ in range(3):
        g = grad(a)
        upd, state = update(g, state, a)
        params, grads, updates = [*params, a], [*grads, g], [*updates, upd]
        a = optax.apply_updates(a, upd)

    def lr_for(path):
        return lr * ratio if path[-1].key == "lora_b" else lr

    # Step by step from the same parameters and gradient: Adam's normalisation turns a
    # near-zero gradient's rounding into a whole lr-sized step, so two trajectories (float32
    # here, float64 there) are not compared entry by entry.
    # float32 Adam: the bias correction 1 - b2**t cancels (eps / 1e-3 relative), measured 1e-5.
    want = _adamw_updates(params, grads, lr_for, wd=wd)
    for t, (got, ref) in enumerate(zip(updates, want)):
        assert_close(jax.tree.leaves(got), ref, rel=2e-4, what=f"step {t}")
    # And it is not plain AdamW: B moved further.
    plain = _adamw_updates(params, grads, lambda p: lr, wd=wd)
    plain_b = np.asarray(adapters["lora_b"], np.float64) + sum(u[1] for u in plain)
    assert np.abs(np.asarray(a["lora_b"]) - plain_b).max() > 0.05


def test_lora_plus_groups_follow_peft():
    from rslora_jax.ops.optim import lora_plus_labels

    tree = {
        "d": {"kernel": 0, "lora_a": 0, "lora_b": 0, "lora_magnitude": 0, "lora_d": 0},
        "lora_shared": {"layers": {"d": {"lora_a": 0, "lora_b": 0}}},
    }
    assert lora_plus_labels(tree) == {
        "d": {
            "kernel": "other",
            "lora_a": "other",
            "lora_b": "fast",
            "lora_magnitude": "fast",
            "lora_d": "fast",
        },
        "lora_shared": {"layers": {"d": {"lora_a": "other", "lora_b": "fast"}}},
    }
    for bad in (0, -2.0, float("inf"), "16", True):
        with pytest.raises(ValueError, match=r"lora_plus_ratio=...\) must be a positive finite"):
            rl.optimizer(optax.sgd(1.0), lora_plus_ratio=bad)


# ---------------------------------------------------------------------------- DoRA
def _dora_kernel(w, a, b, scale, m):
    """m * (W + s A B) / ||W + s A B||, norms over the input axis (axis 0), numpy float64."""
    v = np.asarray(w, np.float64) + scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    return v * (np.asarray(m, np.float64) / np.linalg.norm(v, axis=0))


def _dora_tree(params, cfg, seed=0):
    """DoRA adapters with random B and magnitudes (init's zero B and ||W|| hide bugs)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", None)
        if name == "lora_b":
            return jnp.asarray(rng.standard_normal(leaf.shape) * 0.3, leaf.dtype)
        if name == MAGNITUDE:
            return leaf * jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fill, rl.init(params, cfg, KEY))


def test_magnitude_init_is_the_column_norm():
    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)},
        "conv1d": {"kernel": jnp.asarray(rng.standard_normal((9, 12)), jnp.float32)},  # (out, in)
        "stack": {"kernel": jnp.asarray(rng.standard_normal((3, 12, 5)), jnp.float32)},
    }
    cfg = rl.LoraConfig(
        rank=2, use_dora=True, fan_in_fan_out="conv1d", kernel_axes={"stack": "lio"}
    )
    out = rl.init(params, cfg, KEY)
    w = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
    np.testing.assert_allclose(
        out["dense"][MAGNITUDE], np.linalg.norm(w["dense"], axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(
        out["conv1d"][MAGNITUDE], np.linalg.norm(w["conv1d"], axis=1), rtol=1e-6
    )
    np.testing.assert_allclose(
        out["stack"][MAGNITUDE], np.linalg.norm(w["stack"], axis=1), rtol=1e-6
    )
    assert out["stack"][MAGNITUDE].shape == (3, 5)
    with pytest.raises(ValueError, match=r"DoRA .* reads the kernel at 'conv1d' .* abstract"):
        rl.init_adapters(jax.eval_shape(lambda: params), cfg, KEY)


# (Plain Dense layers with DoRA: the PEFT parity and gradient tests below.)
DORA_CASES = {
    "dense_general": (M.GeneralAttn(), (2, 4, 6), {"qkv": "ioo", "o": "iio"}),
    "scan_remat": (M.Scanned(), (2, 3, 6), {"layers/q": "lio", "layers/o": "lio"}),
}


@pytest.mark.parametrize("name", sorted(DORA_CASES))
def test_dora_forward_equals_merge_equals_formula(name):
    model, shape, axes = DORA_CASES[name]
    x = jax.random.normal(jax.random.key(3), shape)
    params = _params(model, x)
    cfg = rl.LoraConfig(rank=2, alpha=3.0, use_dora=True, kernel_axes=axes)
    tree = _dora_tree(params, cfg)
    scale = 3.0 / math.sqrt(2)
    ref = jax.tree.map(np.asarray, rl.split(tree)[1])
    for path in rl.adapter_paths(tree):
        h = _get(tree, path)
        kernel = np.asarray(h["kernel"])
        roles = dict(axes or {}).get(path, "io")
        lead = kernel.shape[: roles.count("l")]
        d_in = math.prod(s for s, r in zip(kernel.shape, roles) if r == "i")
        w = kernel.reshape(*lead, d_in, -1)  # these kernels are laid out l..., i..., o...
        if lead:
            new = np.stack(
                [
                    _dora_kernel(w[i], h["lora_a"][i], h["lora_b"][i], scale, h[MAGNITUDE][i])
                    for i in range(lead[0])
                ]
            )
        else:
            new = _dora_kernel(w, h["lora_a"], h["lora_b"], scale, h[MAGNITUDE])
        _get(ref, path)["kernel"] = new.reshape(kernel.shape).astype(np.float32)
    plain = jax.jit(model.apply)
    factored = jax.jit(rl.lora(model.apply, cfg, mode="factored"))
    want = np.asarray(plain({"params": jax.tree.map(jnp.asarray, ref)}, x))
    assert np.abs(want - np.asarray(plain({"params": params}, x))).max() > 1e-2
    assert_close(factored({"params": tree}, x), want, rel=1e-5, what="factored")
    fused = jax.jit(rl.lora(model.apply, cfg, mode="fused"))  # DenseGeneral and Dense: fused
    assert_close(fused({"params": tree}, x), want, rel=1e-5, what="fused")
    # mode="merged" is the model on merge(...): the merge must give the same kernels.
    merged = rl.merge(tree, cfg)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert_close(plain({"params": merged}, x), want, rel=1e-5, what="merged")
    # At init (B = 0, m = ||W||) the output is unchanged (up to m / ||W|| rounding).
    zero = rl.init(params, cfg, KEY)
    assert_close(factored({"params": zero}, x), plain({"params": params}, x), rel=1e-5)


@pytest.mark.parametrize("mode", ["factored", "fused"])
def test_dora_gradient_treats_the_norm_as_a_constant(mode):
    """Gradients equal a written-out forward with stop_gradient(||W + sAB||), and differ from
    the one that differentiates through the norm (so the check can fail)."""
    model = nn.Dense(6)
    x = jax.random.normal(KEY, (5, 9))
    params = _params(model, x)
    cfg = rl.LoraConfig(rank=3, alpha=4.0, use_dora=True)
    tree = _dora_tree(params, cfg, seed=1)
    adapters, base = rl.split(tree)
    s = 4.0 / math.sqrt(3)

    def ours(ad):
        return jnp.sum(
            jnp.sin(rl.lora(model.apply, cfg, mode=mode)({"params": rl.combine(ad, base)}, x))
        )

    def written(ad, detach):
        w, b = base["kernel"], base["bias"]
        v = w + s * ad["lora_a"] @ ad["lora_b"]
        n = jnp.linalg.norm(v, axis=0)
        n = jax.lax.stop_gradient(n) if detach else n
        return jnp.sum(jnp.sin(x @ (v * (ad[MAGNITUDE] / n)) + b))

    g = jax.jit(jax.grad(ours))(adapters)
    want = jax.jit(jax.grad(written), static_argnums=1)(adapters, True)
    through = jax.jit(jax.grad(written), static_argnums=1)(adapters, False)
    assert_close(g, want, rel=2e-5, what=mode)
    assert rel_error(g["lora_b"], through["lora_b"]) > 1e-3, rel_error(
        g["lora_b"], through["lora_b"]
    )


def test_dora_matches_peft_forward_and_gradients():
    torch_net = TorchNet(1, r=4, lora_alpha=8.0, use_rslora=True, use_dora=True)
    torch = torch_net.torch
    rng = np.random.default_rng(2)
    cfg = rl.LoraConfig(rank=4, alpha=8.0, use_dora=True, targets=["q", "v"])
    zero = rl.init(torch_net.flax_base(), cfg, KEY)
    tree = jax.tree.map(lambda v: v, zero)
    for name in ("q", "v"):
        layer = torch_net.layer(name)
        mag = layer.lora_magnitude_vector["default"].weight
        # PEFT initialised its magnitude as ||W|| too.
        np.testing.assert_allclose(zero[name][MAGNITUDE], mag.detach().numpy(), rtol=1e-5)
        a = rng.standard_normal(zero[name]["lora_a"].shape) * 0.3
        b = rng.standard_normal(zero[name]["lora_b"].shape) * 0.3
        m = np.asarray(zero[name][MAGNITUDE]) * rng.uniform(0.5, 1.5, mag.shape)
        tree[name] = {
            **tree[name],
            "lora_a": jnp.asarray(a, jnp.float32),
            "lora_b": jnp.asarray(b, jnp.float32),
            MAGNITUDE: jnp.asarray(m, jnp.float32),
        }
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.tensor(a.T, dtype=torch.float32))
            layer.lora_B["default"].weight.copy_(torch.tensor(b.T, dtype=torch.float32))
            mag.copy_(torch.tensor(m, dtype=torch.float32))
    x = rng.standard_normal((5, 12)).astype(np.float32)
    xt = torch.tensor(x)
    out_t = torch_net.model(xt)
    torch.sin(out_t).sum().backward()

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10, use_bias=False, name="v")(jnp.tanh(nn.Dense(7, name="q")(x)))

    adapters, base = rl.split(tree)
    for mode in ("factored", "fused"):
        apply = rl.lora(Net().apply, cfg, mode=mode)
        out = apply({"params": tree}, x)
        assert_close(out, out_t.detach().numpy(), rel=1e-5, what=mode)

        def loss(a, apply=apply):
            return jnp.sum(jnp.sin(apply({"params": rl.combine(a, base)}, x)))

        g = jax.grad(loss)(adapters)
        _dora_grads_match(g, torch_net)


def _dora_grads_match(g, torch_net):
    for name in ("q", "v"):
        layer = torch_net.layer(name)
        want = {
            "lora_a": layer.lora_A["default"].weight.grad.numpy().T,
            "lora_b": layer.lora_B["default"].weight.grad.numpy().T,
            MAGNITUDE: layer.lora_magnitude_vector["default"].weight.grad.numpy(),
        }
        assert_close({k: g[name][k] for k in want}, want, rel=2e-5, what=name)


def test_dora_dropout_recomputes_the_base_on_the_dropped_input():
    """PEFT: with dropout active, y = x@W + b + (m/n - 1)*(dropout(x) @ W) + (m/n)*lora(dropout(x)).
    With W = I and zero factors, (y - x - b) / (m/n - 1) must be dropout(x): each entry 0 or
    x / (1 - p)."""
    d, p = 6, 0.5
    model = nn.Dense(d)
    x = jax.random.normal(KEY, (4, d))
    params = {"kernel": jnp.eye(d), "bias": jnp.arange(d, dtype=jnp.float32)}
    cfg = rl.LoraConfig(rank=2, use_dora=True, dropout=p)
    tree = rl.init(params, cfg, KEY)
    tree["lora_a"] = jnp.zeros_like(tree["lora_a"])
    tree[MAGNITUDE] = jnp.full((d,), 2.0)  # ||I||_col = 1, so m/n = 2
    y = rl.lora(model.apply, cfg, mode="factored")({"params": tree}, x, rngs={"lora_dropout": KEY})
    dropped = np.asarray(y - x - params["bias"]) / (2.0 - 1.0)
    xn = np.asarray(x)
    tol = 1e-6 * float(np.abs(np.asarray(y)).max())  # float32 rounding at y's scale (b sets it)
    kept = np.isclose(dropped, xn / (1 - p), rtol=0, atol=tol)
    zeroed = np.isclose(dropped, 0.0, rtol=0, atol=tol)
    assert np.all(kept | zeroed) and kept.any() and zeroed.any()
    # Without the dropout stream: y = x@(2I) + b.
    y0 = rl.lora(model.apply, cfg, mode="factored")({"params": tree}, x)
    assert_close(y0, 2 * xn + np.asarray(params["bias"]), rel=1e-6)


def test_dora_einsum_every_mode_unmerge_and_specs():
    model = M.EinsumAttn()
    x = jax.random.normal(KEY, (2, 4, 6))
    axes = {"q": "oio", "per_head": "lio", "o": "iio"}
    params = _params(model, x)
    cfg = rl.LoraConfig(rank=2, use_dora=True, kernel_axes=axes)
    tree = _dora_tree(params, cfg)
    want = model.apply({"params": rl.merge(tree, cfg)}, x)
    for mode in ("auto", "factored", "fused"):
        assert_close(rl.lora(model.apply, cfg, mode=mode)({"params": tree}, x), want, rel=1e-5)
    # The merged kernel keeps only each column's direction: unmerging needs the merge's scales.
    with pytest.raises(ValueError, match="needs the column scales of the merge"):
        rl.unmerge(rl.merge(tree, cfg), rl.split(tree)[0], cfg)
    merged, scales = rl.merge(tree, cfg, return_column_scales=True)
    back = rl.unmerge(merged, rl.split(tree)[0], cfg, column_scales=scales)
    assert_close(back, params, rel=1e-5, what="DoRA unmerge")
    with pytest.raises(ValueError, match=r"has a DoRA leaf .* config's method is LoRA"):
        rl.merge(tree, rl.LoraConfig(rank=2, kernel_axes=axes))
    kernel_specs = {
        "q": P("tp", "fsdp", None),
        "per_head": P("tp", None, None),
        "o": P("tp", None, "fsdp"),
    }
    base_specs = {
        name: {leaf: kernel_specs[name] if leaf == "kernel" else P() for leaf in params[name]}
        for name in params
    }
    specs = rl.partition_specs(tree, base_specs, cfg)
    assert specs["q"][MAGNITUDE] == P("tp")  # outputs (n, h) flattened: n's spec
    assert specs["per_head"][MAGNITUDE] == P("tp", None)  # layer axis kept
    assert specs["o"][MAGNITUDE] == P("fsdp")
