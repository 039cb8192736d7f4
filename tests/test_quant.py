"""A quantized frozen base (QLoRA): formats against reference quantizers written here, forwards
on a quantized base against the same forwards on its dequantized copy (linen, NNX, the built-in
Llama with claimed projections; fused and factored), gradients, merge, export, loading and bad
input.

The references: the NF4 codebook is the QLoRA paper's table (bitsandbytes' values, typed in
below, not computed); the NF4 and int8 quantizers are a few lines of numpy (nearest codebook
value of each block-absmax-scaled element; round-to-nearest per output column).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import rslora_jax as rl
from rslora_jax.execution.quant import QuantizedArray, nf4_codebook, quantize_array
from rslora_jax.frontends import nnx as rnnx
from rslora_jax.frontends.nnx_quant import quantize_model
from rslora_jax.models import LlamaConfig, LlamaForCausalLM, init_params
from rslora_jax.ops.quantize import check_plain, loader_transform, quantized_spec
from tests._asserts import assert_close

# The QLoRA paper's NF4 values (Dettmers et al. 2023, appendix; bitsandbytes' table).
PAPER_NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip


def _ref_nf4(w: np.ndarray, block: int) -> np.ndarray:
    """Blocks of `block` rows per column of a (d_in, d_out) kernel: absmax, nearest NF4 value."""
    d_in, d_out = w.shape
    blocks = w.astype(np.float64).reshape(d_in // block, block, d_out)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    unit = blocks / absmax
    idx = np.abs(unit[..., None] - PAPER_NF4.astype(np.float64)).argmin(-1)
    return (PAPER_NF4[idx] * absmax).reshape(d_in, d_out)


def _ref_int8(w: np.ndarray) -> np.ndarray:
    scale = np.abs(w.astype(np.float64)).max(axis=0, keepdims=True) / 127.0
    return np.clip(np.round(w / scale), -127, 127) * scale


@pytest.fixture(scope="module")
def kernel():
    return np.asarray(jax.random.normal(jax.random.key(0), (256, 48), jnp.float32))


# ------------------------------------------------------------------------------ formats
def test_nf4_codebook_is_the_papers():
    assert_close(nf4_codebook(), PAPER_NF4, rel=1e-6, norm="max")


def test_nf4_round_trip_matches_the_reference_quantizer(kernel):
    q = quantize_array(jnp.asarray(kernel), "nf4", block=64)
    ref = _ref_nf4(kernel, 64)
    assert_close(rl.dequantize(q), ref, rel=1e-6)
    # NF4's error on Gaussian weights: about 9-10% of the kernel's norm (both quantizers).
    err = np.linalg.norm(ref - kernel) / np.linalg.norm(kernel)
    assert 0.05 < err < 0.12
    # Double quantisation of the scales adds little on top.
    dq = quantize_array(jnp.asarray(kernel), "nf4", block=64, double_quant=True)
    err_dq = np.linalg.norm(np.asarray(rl.dequantize(dq)) - kernel) / np.linalg.norm(kernel)
    assert err_dq < 1.02 * err


def test_int8_round_trip_matches_the_reference_quantizer(kernel):
    q = quantize_array(jnp.asarray(kernel), "int8")
    assert_close(rl.dequantize(q), _ref_int8(kernel), rel=1e-6)


def test_fp8_round_trip_error(kernel):
    q = quantize_array(jnp.asarray(kernel), "fp8")
    scale = np.abs(kernel).max(axis=0, keepdims=True) / 448.0
    ref = np.asarray(jnp.asarray(kernel / scale).astype(jnp.float8_e4m3fn), np.float64) * scale
    assert_close(rl.dequantize(q, jnp.float32), ref, rel=1e-6)


@pytest.mark.parametrize(
    "scheme, double, nbytes",
    [
        # codes + scales (+ double quantisation's int8 scales, its scale and mean per column)
        ("nf4", False, 256 * 48 // 2 + 4 * 48 * 4),
        ("nf4", True, 256 * 48 // 2 + 4 * 48 + 2 * 48 * 4),
        ("int8", False, 256 * 48 + 48 * 4),
        ("fp8", False, 256 * 48 + 48 * 4),
    ],
)
def test_exact_storage_size(kernel, scheme, double, nbytes):
    q = quantize_array(jnp.asarray(kernel, jnp.bfloat16), scheme, double_quant=double)
    assert q.nbytes == nbytes
    leaves = jax.tree.leaves(q)
    assert sum(x.nbytes for x in leaves) == nbytes  # what the device holds
    assert q.shape == kernel.shape and q.dtype == jnp.bfloat16
    if scheme == "nf4":
        # 4 bits per parameter plus one float32 scale per block of 64: 4.5 bits (4.127 with
        # double quantisation at d_in = 4096; 4.25 here at d_in = 256).
        assert q.codes.dtype == jnp.uint8 and q.codes.shape == (128, 48)


def test_blocks_fall_back_to_the_output_axis():
    w = jax.random.normal(jax.random.key(1), (688 // 8, 64))  # 86 inputs: 64 does not divide
    q = quantize_array(w, "nf4", (0,), out_axes=(1,))
    assert q.axis == -1 and q.scale.shape == (86, 1)
    ref = _ref_nf4(np.asarray(w).T.copy(), 64).T
    assert_close(rl.dequantize(q), ref, rel=1e-6)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_path():
    params = {"a": {"kernel": jnp.ones((96, 40))}, "b": {"kernel": jnp.ones((64, 8))}}
    with pytest.raises(ValueError, match=r"quantize 'a'.*blocks of 64 divide no input axis"):
        rl.quantize(params, "nf4")
    with pytest.raises(ValueError, match=r"unknown scheme 'int4'"):
        rl.quantize(params, "int4")
    q = rl.quantize(params, "int8")
    with pytest.raises(ValueError, match=r"kernel at 'a' is already quantized"):
        rl.quantize(q, "int8")
    with pytest.raises(ValueError, match=r"already quantized"):
        quantize_array(q["a"]["kernel"], "nf4")
    with pytest.raises(ValueError, match=r"save_pretrained needs plain arrays, but 'a/kernel'"):
        check_plain(q, "save_pretrained")
    with pytest.raises(ValueError, match=r"nf4 block=63 must be an even int"):
        rl.quantize(params, "nf4", block=63, targets=["b"])
    with pytest.raises(ValueError, match=r"matched no kernel"):
        rl.quantize(params, "nf4", targets=["nothing"])


def test_pissa_on_a_quantized_base_is_refused():
    q = rl.quantize({"d": {"kernel": jnp.ones((64, 8))}}, "int8")
    with pytest.raises(ValueError, match=r"kernel at 'd' is quantized"):
        rl.init(q, rl.LoraConfig(rank=2, init="pissa"), jax.random.key(0))


# ------------------------------------------------------------------------------ forwards
class _Net(nn.Module):
    """Two adapted Dense layers and one without an adapter (all quantized)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(128, name="up")(x)
        h = nn.Dense(64, name="mid")(jax.nn.gelu(h))
        return nn.Dense(64, use_bias=False, name="down")(h)


def _trained(adapters, key):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


@pytest.fixture(scope="module")
def linen_case():
    net = _Net()
    x = jax.random.normal(jax.random.key(0), (4, 8, 64))
    params = net.init(jax.random.key(1), x)["params"]
    config = rl.LoraConfig(rank=4, targets=["up", "down"])
    adapters = _trained(rl.init_adapters(params, config, jax.random.key(2)), jax.random.key(3))
    return net, x, params, config, adapters


@pytest.mark.parametrize("scheme, mode", [("nf4", "factored"), ("nf4", "fused"), ("int8", "fused")])
def test_linen_forward_and_grads_equal_the_dequantized_base(linen_case, scheme, mode):
    net, x, params, config, adapters = linen_case
    base_q = rl.quantize(params, scheme, double_quant=scheme == "nf4")  # mid too: no adapter
    assert isinstance(base_q["mid"]["kernel"], QuantizedArray)
    base_d = rl.dequantize(base_q)
    apply = rl.lora(net.apply, config, mode=mode)

    def loss(ad, base):
        return jnp.mean(apply({"params": rl.combine(ad, base)}, x) ** 2)

    yq = jax.jit(lambda a, b: apply({"params": rl.combine(a, b)}, x))(adapters, base_q)
    yd = apply({"params": rl.combine(adapters, base_d)}, x)
    assert_close(yq, yd, rel=1e-5)
    gq = jax.jit(jax.grad(loss))(adapters, base_q)
    gd = jax.grad(loss)(adapters, base_d)
    assert jax.tree.structure(gq) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gd)):
        assert_close(a, b, rel=1e-5)
    # Differentiating w.r.t. the whole tree: the quantized kernels get nothing.
    whole = jax.grad(lambda p: jnp.mean(apply({"params": p}, x) ** 2), allow_int=True)
    full = whole(rl.combine(adapters, base_q))
    for path in ("up", "mid", "down"):
        g = full[path]["kernel"]
        assert all(not np.any(np.asarray(leaf, np.float32)) for leaf in jax.tree.leaves(g)
                   if leaf.dtype != jax.dtypes.float0)  # fmt: skip


def test_optimizer_state_is_twice_the_adapters(linen_case):
    import optax

    _, _, params, _, adapters = linen_case
    tx = rl.optimizer(optax.adam(1e-3))
    state = tx.init(rl.combine(adapters, rl.quantize(params, "nf4")))
    n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert n_state == 2 * rl.num_adapter_params(rl.combine(adapters, params))


def test_factored_backward_keeps_no_dequantized_kernel(linen_case):
    net, x, params, config, adapters = linen_case
    base_q = rl.quantize(params, "int8")
    apply = rl.lora(net.apply, config, mode="factored")
    _, vjp = jax.vjp(lambda a: apply({"params": rl.combine(a, base_q)}, x), adapters)
    kernel_shapes = {tuple(h["kernel"].shape) for h in params.values()}
    float_residuals = [
        tuple(r.shape)
        for r in jax.tree.leaves(vjp)
        if hasattr(r, "dtype") and jnp.issubdtype(r.dtype, jnp.floating)
    ]
    assert not kernel_shapes & set(float_residuals), float_residuals


def test_merge_returns_a_plain_tree(linen_case):
    net, x, params, config, adapters = linen_case
    base_q = rl.quantize(params, "nf4")
    merged = rl.merge(rl.combine(adapters, base_q), config)
    assert not any(rl.is_quantized(v) for v in jax.tree.leaves(merged, is_leaf=rl.is_quantized))
    expected = rl.merge(rl.combine(adapters, rl.dequantize(base_q)), config)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
        assert a.dtype == b.dtype
        assert_close(a, b, rel=1e-6)
    y = rl.lora(net.apply, config, mode="merged")({"params": rl.combine(adapters, base_q)}, x)
    assert_close(y, net.apply({"params": expected}, x), rel=1e-5)


@pytest.mark.parametrize("mode", ["factored", "fused"])
def test_nnx_forward_and_grads_equal_the_dequantized_base(mode):
    def make():
        model = nnx.Sequential(
            nnx.Linear(64, 128, rngs=nnx.Rngs(0)),
            nnx.Linear(128, 64, rngs=nnx.Rngs(1)),
            nnx.Linear(64, 64, rngs=nnx.Rngs(2)),
        )
        config = rl.LoraConfig(rank=4, targets=["layers/0", "layers/2"])
        rnnx.add_adapters(model, config, jax.random.key(0), mode=mode)
        for layer in (model.layers[0], model.layers[2]):
            layer.lora_b[...] = 0.1 * jnp.ones_like(layer.lora_b[...])
        return model

    x = jax.random.normal(jax.random.key(5), (3, 16, 64))
    quant = quantize_model(make(), "nf4")  # layers/1 has no adapter
    assert type(quant.layers[1]).__name__ == "QuantLinear"
    plain = make()
    for a, b in zip(plain.layers, quant.layers):
        a.kernel.set_value(rl.dequantize(b.kernel.get_raw_value()))
    assert_close(quant(x), plain(x), rel=1e-5)

    def loss(model):
        return jnp.mean(model(x) ** 2)

    gq = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(quant)
    gp = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(plain)
    for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gp)):
        assert_close(a, b, rel=1e-5)
    merged = rnnx.merge(quant)
    assert not rl.is_quantized(merged.layers[0].kernel.get_raw_value())
    assert_close(merged(x), quant(x), rel=1e-5)


@pytest.fixture(scope="module")
def llama():
    config = LlamaConfig.tiny(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16,
    )  # fmt: skip
    params = init_params(config, jax.random.key(0))
    lora = rl.LoraConfig(
        rank=4, targets=["q_proj", "v_proj", "down_proj"], kernel_axes={"model/layers/.*": "lio"}
    )
    adapters = _trained(rl.init_adapters(params, lora, jax.random.key(1)), jax.random.key(2))
    return LlamaForCausalLM(config), params, lora, adapters


@pytest.mark.parametrize("mode", ["factored", "fused"])
def test_builtin_llama_with_claimed_projections(llama, mode):
    model, params, lora, adapters = llama
    base_q = rl.quantize(params, "nf4", config=lora)  # k, o, gate, up: quantized, no adapter
    assert rl.is_quantized(base_q["model"]["layers"]["mlp"]["up_proj"]["kernel"])
    assert not rl.is_quantized(base_q["model"]["embed_tokens"]["embedding"])
    ids = jax.random.randint(jax.random.key(3), (2, 16), 0, model.config.vocab_size)
    apply = rl.lora(model.apply, lora, mode=mode)
    yq = jax.jit(lambda a, b: apply({"params": rl.combine(a, b)}, ids))(adapters, base_q)
    yd = apply({"params": rl.combine(adapters, rl.dequantize(base_q))}, ids)
    assert_close(yq, yd, rel=1e-5)
    assert rl.base_bytes(base_q) < 0.45 * rl.base_bytes(params)


# ------------------------------------------------------------------------------ sharding, loading
def test_codes_and_scales_shard_like_the_kernel():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "model"))
    w = jax.device_put(
        jax.random.normal(jax.random.key(0), (256, 32)),
        NamedSharding(mesh, PartitionSpec("fsdp", "model")),
    )
    q = rl.quantize({"q_proj": {"kernel": w}}, "nf4", double_quant=True)["q_proj"]["kernel"]
    assert q.codes.sharding.spec == PartitionSpec("fsdp", "model")
    assert q.scale.sharding.spec == PartitionSpec("fsdp", "model")  # 4 blocks over 2
    assert q.scale_scale.sharding.spec == PartitionSpec(None, "model")
    spec = quantized_spec(q, PartitionSpec("fsdp", "model"), {"fsdp": 8, "model": 4})
    assert spec.scale == PartitionSpec(None, "model")  # 4 blocks do not split 8 ways
    assert_close(rl.dequantize(q), _ref_nf4(np.asarray(w), 64), rel=1e-3)


def test_hf_loader_quantizes_while_streaming(tmp_path, llama):
    from rslora_jax.hf import load_pretrained, save_pretrained

    model, params, lora, _ = llama
    save_pretrained(tmp_path / "m", params, model.config)
    seen = []
    transform = loader_transform("nf4", config=lora)

    def spy(path, x):
        seen.append(path)
        return transform(path, x)

    _, loaded = load_pretrained(tmp_path / "m", transform=spy)
    assert "model/layers/self_attn/q_proj/kernel" in seen
    expected = rl.quantize(params, "nf4", config=lora)
    for a, b in zip(
        jax.tree.leaves(loaded, is_leaf=rl.is_quantized),
        jax.tree.leaves(expected, is_leaf=rl.is_quantized),
    ):
        assert type(a) is type(b)
        if rl.is_quantized(a):
            np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    with pytest.raises(ValueError, match="save_pretrained needs plain arrays"):
        save_pretrained(tmp_path / "x", loaded, model.config)
