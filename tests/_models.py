"""Small linen models shared by the tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="up", dtype=self.dtype)(x)
        x = nn.gelu(x)
        x = nn.Dense(12, name="mid", dtype=self.dtype)(x)
        return nn.Dense(8, name="out", dtype=self.dtype)(x)


class GeneralAttn(nn.Module):
    """DenseGeneral with split output features, then merged input features."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral(features=(2, 3), axis=-1, name="qkv")(x)  # kernel (d, 2, 3): ioo
        h = jnp.tanh(h)
        return nn.DenseGeneral(features=5, axis=(-2, -1), name="o")(h)  # kernel (2, 3, 5): iio


class EinsumAttn(nn.Module):
    """Einsum kernels with interleaved and batch (per-head) axes, as in Gemma."""

    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((2, 6, 3), "btd,ndh->btnh", name="q")(x)  # kernel (n, d, h): oio
        q = jnp.tanh(q)
        q = nn.Einsum((2, 3, 4), "btnh,nhk->btnk", name="per_head")(q)  # (n, h, k): lio
        return nn.Einsum((2, 4, 6), "btnk,nkd->btd", name="o")(q)  # (n, k, d): iio


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(8, name="q")(x)
        h = nn.tanh(h)
        return x + nn.Dense(x.shape[-1], name="o")(h), None


class Scanned(nn.Module):
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True, "lora_dropout": True},
            length=self.layers,
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(4, name="head")(x)


class WithConv(nn.Module):
    """A Conv layer (not factorable) next to a Dense (factorable)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(6, kernel_size=(3,), name="conv")(x)  # kernel (3, c_in, 6): iio
        return nn.Dense(5, name="proj")(jnp.tanh(h))


def init_model(model: nn.Module, x: jax.Array, seed: int = 0):
    return jax.jit(model.init)(jax.random.key(seed), x)["params"]
