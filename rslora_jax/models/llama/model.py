"""A compact Llama-family causal language model in Flax linen (Llama, Mistral, Qwen2).

The parameter tree uses Hugging Face-like module names, so that a path such as
``model/layers/self_attn/q_proj`` maps one to one onto ``model.layers.{i}.self_attn.q_proj``::

    {"model": {"embed_tokens": {"embedding": (V, D)},
               "layers": {"self_attn": {"q_proj": {"kernel": (L, D, H*hd)}, ...},
                          "mlp": {"gate_proj": {"kernel": (L, D, I)}, ...},
                          "input_layernorm": {"scale": (L, D)},
                          "post_attention_layernorm": {"scale": (L, D)}},
               "norm": {"scale": (D,)}},
     "lm_head": {"kernel": (D, V)}}                  # absent when embeddings are tied

With ``scan_layers=False`` the layers live under string keys ``"0" .. "L-1"`` and have no
leading layer axis: ``model/layers/3/self_attn/q_proj/kernel`` has shape (D, H*hd).

Every projection is a plain :class:`flax.linen.Dense`, so :func:`flax.linen.intercept_methods`
sees it as a ``Dense`` whose params dict holds ``kernel`` (and ``bias``); extra leaves in that
dict (for instance ``lora_a``/``lora_b``) are ignored by the model and can be read by an
interceptor through ``module.get_variable("params", "lora_a")``.

Attention goes through :func:`jax.nn.dot_product_attention` with ``is_causal=True``: no float
(S, S) mask is built, grouped-query attention (fewer K/V heads than query heads) is handled by
that function, and ``attention_impl="cudnn"`` selects the fused flash-attention kernel on GPUs.
RoPE follows Hugging Face's ``rotate_half`` convention, including Llama-3 and linear scaling of
the inverse frequencies exactly as transformers computes them (in float32).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rslora_jax._types import Array, Params, PRNGKey
from rslora_jax.core import claim
from rslora_jax.execution.dispatch import Contraction
from rslora_jax.frontends.site import group_output, linen_dropout
from rslora_jax.models.attention import attention
from rslora_jax.models.cache import KVCache, attend_cached
from rslora_jax.models.llama.config import LlamaConfig

# --------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies (head_dim // 2,), float32, computed as transformers does.

    Args:
        config: the model configuration (``rope_theta``, ``head_dim``, ``rope_scaling``).

    Returns:
        A float32 numpy array.

    Example:
        >>> rope_inv_freq(LlamaConfig.tiny()).shape
        (4,)
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    if rs.rope_type == "linear":
        return (inv_freq / np.float32(rs.factor)).astype(np.float32)
    factor = np.float32(rs.factor)
    low, high = rs.low_freq_factor, rs.high_freq_factor
    old_ctx = rs.original_max_position_embeddings
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * llama / factor + smooth * llama).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, llama).astype(np.float32)


def _rope_cos_sin(config: LlamaConfig, positions: Array) -> tuple[Array, Array]:
    """cos and sin of shape (B, S, 1, head_dim), float32."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, S, N, hd) rotated with HF's rotate_half convention, computed in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    """Root-mean-square normalisation computed in float32, output in the compute dtype."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def _dense(config: LlamaConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


def _projections(module: nn.Module, x: Array, specs: tuple[tuple[str, int, bool], ...]) -> list:
    """Outputs of the child Dense projections `specs` (``(name, features, use_bias)``), which
    all read `x`, with their adapters.

    Inside `rslora_jax.lora`, the adapted projections are claimed (`rslora_jax.core.claim`) and
    computed here together, for every adapter method: factored with a single
    ``x @ [A_1 | A_2 | ...]`` matmul (x is read once for all of them), or fused with one merged
    matmul per projection and low-rank gradients, as the dispatch decides
    (`rslora_jax.execution.dispatch`). Outside it, plain Dense layers.
    """
    c = module.config
    ctx = claim.active()
    params = module.variables.get("params", {})
    dense = {name: _dense(c, features, use_bias, name) for name, features, use_bias in specs}
    claimed = []
    if ctx is not None:
        prefix = "abcdefgh"[: x.ndim - 1]
        for name, _, _ in specs:
            path = "/".join((*module.path, name))
            holder = params.get(name)
            if ctx.claim(path, holder):
                lin = Contraction(
                    eq=(prefix + "y", "yz", prefix + "z"),
                    kernel=holder["kernel"],
                    bias=holder.get("bias"),
                    dtype=c.dtype,
                )
                claimed.append((name, (path, holder, lin, dense[name])))
    outs: dict[str, Array] = {}
    if claimed:
        rate = ctx.config.dropout
        ys = group_output(ctx, x, [e for _, e in claimed], lambda: linen_dropout(module, rate))
        outs = {name: y for (name, _), y in zip(claimed, ys)}
    return [outs[name] if name in outs else dense[name](x) for name, _, _ in specs]


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE. Returns ``(y, cache)``: with a key/value
    cache (one layer's `KVCache`, and the new tokens' ``positions``) the new keys and values
    are written into it and the queries attend over it (`rslora_jax.models.cache`)."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        positions: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        b, s, _ = x.shape
        hd, nq, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        q, k, v = _projections(
            self,
            x,
            (
                ("q_proj", nq * hd, c.qkv_bias),
                ("k_proj", nkv * hd, c.qkv_bias),
                ("v_proj", nkv * hd, c.qkv_bias),
            ),
        )
        q = q.reshape(b, s, nq, hd)
        k = k.reshape(b, s, nkv, hd)
        v = v.reshape(b, s, nkv, hd)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)

        def attend(q: Array, k: Array, v: Array) -> Array:
            return attention(
                q, k, v, window=c.sliding_window, segment_ids=segment_ids, impl=c.attention_impl
            )

        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed rows) and a key/value cache do not mix")
            out, cache = attend_cached(
                q, k, v, cache, positions, window=c.sliding_window, impl=c.attention_impl
            )
        else:
            if c.attention_impl != "cudnn" and not c.remat:
                # The XLA path materialises (B, H, S, S) logits and probabilities: recompute
                # them in the backward pass rather than keep them for every layer (cuDNN's
                # fused kernel keeps only the log-sum-exp; with remat the whole layer is
                # recomputed anyway).
                attend = jax.checkpoint(attend)
            out = attend(q, k, v)
        (y,) = _projections(
            self, out.reshape(b, s, nq * hd), (("o_proj", c.hidden_size, c.o_bias),)
        )
        return y, cache


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        gate, up = _projections(
            self,
            x,
            (
                ("gate_proj", c.intermediate_size, c.mlp_bias),
                ("up_proj", c.intermediate_size, c.mlp_bias),
            ),
        )
        h = nn.silu(gate) * up
        (y,) = _projections(self, h, (("down_proj", c.hidden_size, c.mlp_bias),))
        return y


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder block. Returns ``(x, cache)`` (the layer's updated key/value cache, or
    None without one) so that it can be scanned."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        positions: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        norm = dict(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        h = RMSNorm(**norm, name="input_layernorm")(x)
        h, cache = LlamaAttention(c, name="self_attn")(h, cos, sin, segment_ids, cache, positions)
        x = x + h
        h = RMSNorm(**norm, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(c, name="mlp")(h)
        return x, cache


def _block_class(config: LlamaConfig) -> Any:
    if not config.remat:
        return LlamaDecoderLayer
    policy = getattr(jax.checkpoint_policies, config.remat_policy)
    return nn.remat(LlamaDecoderLayer, policy=policy, prevent_cse=not config.scan_layers)


class _LayerList(nn.Module):
    """Unscanned layers under string keys "0" .. "L-1"."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        positions: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        block = _block_class(self.config)
        layers = []
        for i in range(self.config.num_hidden_layers):
            layer = None if cache is None else cache.layer(i)
            x, layer = block(self.config, name=str(i))(x, cos, sin, segment_ids, layer, positions)
            layers.append(layer)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm; returns hidden states (B, S, D)."""

    config: LlamaConfig

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(c.initializer_range),
        )
        if c.scan_layers:
            self.layers = nn.scan(
                _block_class(c),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=c.num_hidden_layers,
            )(c)
        else:
            self.layers = _LayerList(c)
        self.norm = RMSNorm(c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)

    def __call__(
        self,
        input_ids: Array,
        positions: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Array, KVCache | None]:
        """``(hidden states, updated cache)`` (the cache None without one)."""
        x = self.embed_tokens(input_ids)
        cos, sin = _rope_cos_sin(self.config, positions)
        x, cache = self.layers(x, cos, sin, segment_ids, cache, positions)
        return self.norm(x), cache

    def attend(self, hidden: Array) -> Array:
        """Logits through the (tied) input embedding."""
        return self.embed_tokens.attend(hidden)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM: ``apply({"params": p}, input_ids, positions=None,
    segment_ids=None) -> logits``.

    Args (of ``__call__``):
        input_ids: (B, S) integer token ids.
        positions: optional (B, S) or (S,) integer positions for RoPE (default ``arange(S)``). The
            attention mask is causal in sequence order regardless of ``positions`` (without a
            cache).
        segment_ids: optional (B, S) integer ids of examples packed in a row (0: padding):
            attention never crosses from one id to another (`rslora_jax.models.attention`), so
            with ``positions`` restarting at each example a packed row computes what its
            examples compute one per row (`rslora_jax.data.pack_examples` makes both).
        cache: optional `rslora_jax.models.cache.KVCache`: the new tokens' keys and values are
            written at their positions and attention is causal by position over the cache
            (decoding; see `rslora_jax.models.cache`).
        logits_index: optional (B,) index into the sequence: logits only there (e.g. each
            row's last prompt token after a prefill), shape (B, 1, vocab_size).

    Returns:
        Logits (B, S, vocab_size) in the compute dtype ``config.dtype`` (float32 by default;
        bfloat16 logits keep memory low, :func:`causal_lm_loss` upcasts to float32); with a
        cache, ``(logits, updated cache)``.

    Example:
        >>> cfg = LlamaConfig.tiny()
        >>> params = init_params(cfg, jax.random.key(0))
        >>> ids = jnp.zeros((2, 5), jnp.int32)
        >>> LlamaForCausalLM(cfg).apply({"params": params}, ids).shape
        (2, 5, 64)
    """

    config: LlamaConfig

    def setup(self) -> None:
        c = self.config
        self.model = LlamaModel(c)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c, c.vocab_size, False, "lm_head")

    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        logits_index: Array | None = None,
    ) -> Any:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, seq): got {input_ids.shape}")
        if positions is None:
            positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        positions = jnp.broadcast_to(jnp.asarray(positions), input_ids.shape)
        if segment_ids is not None:
            segment_ids = jnp.broadcast_to(jnp.asarray(segment_ids), input_ids.shape)
        hidden, new_cache = self.model(input_ids, positions, segment_ids, cache)
        if logits_index is not None:
            index = jnp.asarray(logits_index, jnp.int32).reshape(-1, 1, 1)
            hidden = jnp.take_along_axis(hidden, index, axis=1)
        if self.config.tie_word_embeddings:
            logits = self.model.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits if cache is None else (logits, new_cache)


# --------------------------------------------------------------------------------------------
# Helpers


def init_params(config: LlamaConfig, key: PRNGKey) -> Params:
    """Initialises the model's parameters (HF-style: normal(initializer_range), norms at 1).

    Args:
        config: the model configuration.
        key: a PRNG key.

    Returns:
        The params dict (without the ``{"params": ...}`` collection wrapper).

    Example:
        >>> p = init_params(LlamaConfig.tiny(), jax.random.key(0))
        >>> p["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape
        (2, 32, 32)
    """
    variables = _jitted_init(config)(key, jnp.zeros((1, 1), jnp.int32))
    return dict(variables["params"])


@functools.lru_cache(maxsize=16)
def _jitted_init(config: LlamaConfig) -> Any:
    # One compiled initialiser per (hashable) config, reused across calls.
    return jax.jit(LlamaForCausalLM(config).init)


def _is_unscanned(layers: Mapping[str, Any]) -> bool:
    return bool(layers) and all(k.isdigit() for k in layers)


def convert_scan(params: Params, to_scan: bool) -> Params:
    """Stacks per-layer params onto a leading axis (``to_scan=True``) or splits them back.

    Works on any leaves under ``model/layers`` (adapter leaves such as ``lora_a`` included).

    Args:
        params: params dict with ``model/layers`` either scanned or keyed "0" .. "L-1".
        to_scan: True to stack, False to unstack.

    Returns:
        A new params dict; other entries are shared, not copied.

    Raises:
        ValueError: if ``model/layers`` is missing, already in the requested form, or the
            per-layer trees differ in structure.

    Example:
        >>> p = init_params(LlamaConfig.tiny(), jax.random.key(0))
        >>> u = convert_scan(p, to_scan=False)
        >>> u["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"].shape
        (32, 48)
    """
    try:
        layers = params["model"]["layers"]
    except (KeyError, TypeError) as e:
        raise ValueError("convert_scan: params have no 'model/layers' entry") from e
    unscanned = _is_unscanned(layers)
    if to_scan:
        if not unscanned:
            raise ValueError("convert_scan(to_scan=True): 'model/layers' is already scanned")
        keys = sorted(layers, key=int)
        if keys != [str(i) for i in range(len(keys))]:
            raise ValueError(f"convert_scan: layer keys {keys} are not 0 .. {len(keys) - 1}")
        trees = [layers[k] for k in keys]
        first = jax.tree.structure(trees[0])
        for k, t in zip(keys, trees):
            if jax.tree.structure(t) != first:
                raise ValueError(
                    f"convert_scan: model/layers/{k} differs in structure from model/layers/0"
                )

        def stack(*xs: Any) -> Any:
            if all(isinstance(x, np.ndarray) for x in xs):
                return np.stack(xs)
            return jnp.stack(xs)

        new_layers = jax.tree.map(stack, *trees)
    else:
        if unscanned:
            raise ValueError("convert_scan(to_scan=False): 'model/layers' is already unscanned")
        leaves = jax.tree.leaves(layers)
        if not leaves:
            raise ValueError("convert_scan: 'model/layers' holds no arrays")
        n = leaves[0].shape[0]
        new_layers = {str(i): jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}
    model = dict(params["model"])
    model["layers"] = new_layers
    out = dict(params)
    out["model"] = model
    return out


def causal_lm_loss(logits: Array, targets: Array, mask: Array | None = None) -> Array:
    """Mean token cross-entropy, computed in float32.

    ``logits[:, t]`` is scored against ``targets[:, t]``: shift before calling, e.g.
    ``logits = model(ids[:, :-1])`` and ``targets = ids[:, 1:]``.

    Args:
        logits: (..., V) logits in any float dtype.
        targets: (...) integer labels.
        mask: optional (...) weights (1 = count the token); the mean is over the mask's sum
            (at least 1).

    Returns:
        A float32 scalar.

    Example:
        >>> logits = jnp.zeros((1, 3, 4))
        >>> round(float(causal_lm_loss(logits, jnp.zeros((1, 3), jnp.int32))), 4)
        1.3863
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(ce)
    m = jnp.asarray(mask).astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


__all__ = [
    "LlamaAttention",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "RMSNorm",
    "causal_lm_loss",
    "convert_scan",
    "init_params",
    "rope_inv_freq",
]
