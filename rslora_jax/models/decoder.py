"""The one decoder-only causal LM of every family, in Flax linen, configured by family flags.

Llama, Mistral, Qwen2, Qwen3, Gemma 2/3 and Phi-3 are this model with other flags
(`rslora_jax.models.architecture.Architecture`, read off the family's config as
``config.arch``): norm offset, embedding scale, MLP activation, sandwich norms, q/k norms,
query scale, soft caps, biases, and per-layer attention windows and rotary embeddings.

The parameter tree uses Hugging Face's module names, so that a path such as
``model/layers/self_attn/q_proj`` maps one to one onto ``model.layers.{i}.self_attn.q_proj``::

    {"model": {"embed_tokens": {"embedding": (V, D)},
               "layers": {"self_attn": {"q_proj": {"kernel": (L, D, H*hd)}, ...,
                                        "q_norm": {"scale": (L, hd)}, ...},   # q/k norms
                          "mlp": {"gate_proj": {"kernel": (L, D, I)}, ...},
                          "input_layernorm": {"scale": (L, D)},
                          "post_attention_layernorm": {"scale": (L, D)},
                          "pre_feedforward_layernorm": ..., "post_feedforward_layernorm": ...},
               "norm": {"scale": (D,)}},
     "lm_head": {"kernel": (D, V)}}                  # absent when embeddings are tied

(the feed-forward norms with sandwich norms only). With ``scan_layers=False`` the layers live
under string keys ``"0" .. "L-1"`` and have no leading layer axis. Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` are split into q/k/v and gate/up here (`rslora_jax.hf` splits and joins them).

Every projection is a plain :class:`flax.linen.Dense`, so :func:`flax.linen.intercept_methods`
sees it as a ``Dense`` whose params dict holds ``kernel`` (and ``bias``); extra leaves in that
dict (for instance ``lora_a``/``lora_b``) are ignored by the model and can be read by an
interceptor through ``module.get_variable("params", "lora_a")``. Inside `rslora_jax.lora`, the
projections that read one input (q/k/v, gate/up) claim their adapters and compute them
together (`rslora_jax.core.claim`).

Attention is `rslora_jax.models.attention.attention`. Each layer receives the per-call inputs
as one `LayerInputs` pytree (broadcast to every layer by the scan), and optionally its slice of a
key/value cache (`rslora_jax.models.cache`, scanned over the cache's leading layer axis): the
new tokens' keys and values (RoPE applied) are written at their positions and the queries attend
over the whole cache, causal by position, with the layer's window and soft cap, so decoding one
token at a time computes what the full forward computes (`rslora_jax.generate`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rslora_jax._types import Array, Params, PRNGKey
from rslora_jax.core import claim
from rslora_jax.execution.dispatch import Contraction
from rslora_jax.frontends.site import group_output, linen_dropout
from rslora_jax.models.attention import attention, materialises_scores
from rslora_jax.models.cache import KVCache, attend_cached
from rslora_jax.models.rope import apply_rope, cos_sin

# --------------------------------------------------------------------------------------------
# Modules


class LayerInputs(NamedTuple):
    """What every layer receives besides the hidden states (a pytree, broadcast by the scan).

    Attributes:
        rope: ``(cos, sin)`` per rotary embedding of ``config.arch.ropes``.
        positions: (B, S) integer positions.
        segment_ids: (B, S) ids of examples packed in a row (0: padding), or None.
    """

    rope: tuple[tuple[Array, Array], ...]
    positions: Array
    segment_ids: Array | None = None


class RMSNorm(nn.Module):
    """Root-mean-square normalisation computed in float32, output in the compute dtype.

    ``offset`` = 1 gives Gemma's ``(1 + w)`` norm (weights initialised at 0).
    """

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        w = scale.astype(jnp.float32)
        if self.offset:
            w = w + jnp.float32(self.offset)
        return (y * w).astype(self.dtype)


def _norm(config: Any, name: str) -> RMSNorm:
    return RMSNorm(
        config.rms_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        offset=config.arch.norm_offset,
        name=name,
    )


def _dense(config: Any, features: int, use_bias: bool, name: str) -> nn.Dense:
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


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE (and the family's q/k norms, query scale,
    soft cap, and per-layer window and rotary embedding).

    ``kind`` is the layer's index into ``config.arch.kinds``: a Python int (unscanned layers),
    a traced int (scanned layers of several kinds: one ``lax.switch`` branch per kind, each
    with a static window) or None (every layer alike). With ``cache`` (this layer's
    `KVCache`), the new keys and values are written into it at ``inputs.positions`` and the
    queries attend over it; returns ``(y, cache)`` (the cache None without one).
    """

    config: Any

    @nn.compact
    def __call__(
        self, x: Array, inputs: LayerInputs, kind: Any = None, cache: KVCache | None = None
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        a = c.arch
        b, s, _ = x.shape
        hd, nq, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        q, k, v = _projections(
            self,
            x,
            (
                ("q_proj", nq * hd, a.qkv_bias),
                ("k_proj", nkv * hd, a.qkv_bias),
                ("v_proj", nkv * hd, a.qkv_bias),
            ),
        )
        q = q.reshape(b, s, nq, hd)
        k = k.reshape(b, s, nkv, hd)
        v = v.reshape(b, s, nkv, hd)
        if a.qk_norm:
            q = _norm(c, "q_norm")(q)
            k = _norm(c, "k_norm")(k)

        def attend(
            index: int, q: Array, k: Array, v: Array, inputs: LayerInputs, cache: Any
        ) -> tuple[Array, Any]:
            lk = a.kinds[index]
            cos, sin = inputs.rope[lk.rope]
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            kw = dict(
                scale=a.query_scale, window=lk.window, softcap=a.attn_softcap, impl=c.attention_impl
            )
            if cache is not None:
                return attend_cached(q, k, v, cache, inputs.positions, **kw)
            return attention(q, k, v, segment_ids=inputs.segment_ids, **kw), None

        if kind is None or isinstance(kind, int | np.integer):
            run = functools.partial(attend, 0 if kind is None else int(kind))
        else:
            branches = [functools.partial(attend, i) for i in range(len(a.kinds))]

            def run(q: Array, k: Array, v: Array, inputs: LayerInputs, cache: Any) -> Any:
                return jax.lax.switch(kind, branches, q, k, v, inputs, cache)

        masked = inputs.segment_ids is not None or a.attn_softcap is not None
        if cache is None and materialises_scores(c.attention_impl, s, masked) and not c.remat:
            # The XLA path materialises (B, H, S, S) logits and probabilities: recompute them in
            # the backward pass rather than keep them for every layer (cuDNN's fused kernel and
            # the blocked CPU one keep only the log-sum-exp; with remat the whole layer is
            # recomputed anyway).
            run = jax.checkpoint(run)
        out, cache = run(q, k, v, inputs, cache)
        out = out.reshape(b, s, nq * hd)
        (y,) = _projections(self, out, (("o_proj", c.hidden_size, a.o_bias),))
        return y, cache


_ACT = {
    "silu": nn.silu,
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
}


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)) (SwiGLU, or GeGLU for Gemma)."""

    config: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        a = c.arch
        gate, up = _projections(
            self,
            x,
            (
                ("gate_proj", c.intermediate_size, a.mlp_bias),
                ("up_proj", c.intermediate_size, a.mlp_bias),
            ),
        )
        h = _ACT[a.activation](gate) * up
        (y,) = _projections(self, h, (("down_proj", c.hidden_size, a.mlp_bias),))
        return y


class DecoderLayer(nn.Module):
    """Pre-norm decoder block (with post-norms too for Gemma). Returns ``(x, cache)`` (the
    layer's updated key/value cache, None without one) so that it can be scanned."""

    config: Any

    @nn.compact
    def __call__(
        self, x: Array, inputs: LayerInputs, kind: Any = None, cache: KVCache | None = None
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        h = _norm(c, "input_layernorm")(x)
        h, cache = Attention(c, name="self_attn")(h, inputs, kind, cache)
        if c.arch.sandwich_norms:
            x = x + _norm(c, "post_attention_layernorm")(h)
            h = _norm(c, "pre_feedforward_layernorm")(x)
            x = x + _norm(c, "post_feedforward_layernorm")(MLP(c, name="mlp")(h))
        else:
            x = x + h
            h = _norm(c, "post_attention_layernorm")(x)
            x = x + MLP(c, name="mlp")(h)
        return x, cache


def _block_class(config: Any) -> Any:
    if not config.remat:
        return DecoderLayer
    policy = getattr(jax.checkpoint_policies, config.remat_policy)
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not config.scan_layers)


def _mixed(config: Any) -> bool:
    return len(config.arch.kinds) > 1


class _LayerList(nn.Module):
    """Unscanned layers under string keys "0" .. "L-1"."""

    config: Any

    @nn.compact
    def __call__(
        self, x: Array, inputs: LayerInputs, cache: KVCache | None = None
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        block = _block_class(c)
        layers = []
        for i in range(c.num_hidden_layers):
            kind = c.arch.layer_kinds[i] if _mixed(c) else None
            if kind is not None and c.remat:
                kind = jnp.asarray(kind, jnp.int32)  # nn.remat traces its arguments
            layer = None if cache is None else cache.layer(i)
            x, layer = block(c, name=str(i))(x, inputs, kind, layer)
            layers.append(layer)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm; returns hidden states (B, S, D)."""

    config: Any

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
                in_axes=(nn.broadcast, 0 if _mixed(c) else nn.broadcast, 0),
                length=c.num_hidden_layers,
            )(c)
        else:
            self.layers = _LayerList(c)
        self.norm = _norm(c, "norm")

    def __call__(
        self,
        input_ids: Array,
        positions: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        lengths: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        """``(hidden states, updated cache)`` (the cache None without one). With a cache,
        `lengths` (B,) is each row's sequence length (default: its largest position + 1), from
        which LongRoPE picks its frequencies per row."""
        c = self.config
        a = c.arch
        x = self.embed_tokens(input_ids)
        if a.embed_scale is not None:
            # transformers rounds the scale to the weights' dtype (sqrt(3072) -> 55.5 in bf16).
            scale = jnp.asarray(a.embed_scale, c.param_dtype).astype(x.dtype)
            x = x * scale
        if cache is not None and lengths is None:
            lengths = jnp.max(positions, axis=1) + 1
        inputs = LayerInputs(
            rope=tuple(cos_sin(r, positions, None if cache is None else lengths) for r in a.ropes),
            positions=positions,
            segment_ids=segment_ids,
        )
        if c.scan_layers:
            kinds = jnp.asarray(a.layer_kinds, jnp.int32) if _mixed(c) else None
            x, cache = self.layers(x, inputs, kinds, cache)
        else:
            x, cache = self.layers(x, inputs, cache)
        return self.norm(x), cache

    def attend(self, hidden: Array) -> Array:
        """Logits through the (tied) input embedding."""
        return self.embed_tokens.attend(hidden)


class DecoderForCausalLM(nn.Module):
    """Causal LM of any family: ``apply({"params": p}, input_ids, positions=None,
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
            (decoding; see `rslora_jax.models.cache`). Not with ``segment_ids``.
        logits_index: optional (B,) index into the sequence: logits only there (e.g. each
            row's last prompt token after a prefill), shape (B, 1, vocab_size). With a cache it
            also marks each row's last real token (what follows is padding): LongRoPE (Phi-3)
            then picks its frequencies per row from the row's length, as for the row alone.

        labels: optional (B, S) integer targets (``labels[:, t]`` scores the logits at ``t``:
            shift before calling, as for :func:`causal_lm_loss`): the call returns that loss
            instead of the logits, computed ``loss_chunk`` positions at a time.
        loss_mask: optional (B, S) weights of the labels (1 = count), as ``mask`` of
            :func:`causal_lm_loss`.
        loss_chunk: positions per chunk of the loss (default: all at once). Each chunk's
            logits and float32 log-softmax live only inside that chunk (rematerialised in the
            backward pass), so the (B, S, vocab) logits are never held whole: with a large
            vocabulary (Llama 3: 128,256) this is most of a remat step's temporaries.

    Returns:
        Logits (B, S, vocab_size) in the compute dtype ``config.dtype`` (float32 by default;
        bfloat16 logits keep memory low, :func:`causal_lm_loss` upcasts to float32), soft-capped
        when the family caps them (Gemma); with a cache, ``(logits, updated cache)``; with
        ``labels``, the float32 scalar loss (equal to ``causal_lm_loss(logits, labels,
        loss_mask)``).

    Raises:
        ValueError: bad shapes, ``segment_ids`` with a cache, ``labels`` with a cache or
            ``logits_index``, ``loss_chunk`` not positive.

    Example:
        >>> from rslora_jax.models.gemma import GemmaConfig
        >>> cfg = GemmaConfig.tiny()
        >>> params = init_params(cfg, jax.random.key(0))
        >>> ids = jnp.zeros((2, 5), jnp.int32)
        >>> DecoderForCausalLM(cfg).apply({"params": params}, ids).shape
        (2, 5, 64)
    """

    config: Any

    def setup(self) -> None:
        c = self.config
        self.model = DecoderModel(c)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c, c.vocab_size, False, "lm_head")

    def __call__(
        self,
        input_ids: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        logits_index: Array | None = None,
        labels: Array | None = None,
        loss_mask: Array | None = None,
        loss_chunk: int | None = None,
    ) -> Any:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, seq): got {input_ids.shape}")
        if labels is not None:
            _check_labels(input_ids.shape, labels, loss_mask, loss_chunk, cache, logits_index)
        if positions is None:
            positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        positions = jnp.broadcast_to(jnp.asarray(positions), input_ids.shape)
        if segment_ids is not None:
            if cache is not None:
                raise ValueError(
                    "segment_ids (packed rows) and a key/value cache do not mix: decode one "
                    "sequence per row"
                )
            segment_ids = jnp.broadcast_to(jnp.asarray(segment_ids), input_ids.shape)
        lengths = None
        if cache is not None and logits_index is not None:
            lengths = (
                jnp.take_along_axis(
                    positions, jnp.asarray(logits_index, jnp.int32).reshape(-1, 1), axis=1
                )[:, 0]
                + 1
            )
        hidden, new_cache = self.model(input_ids, positions, segment_ids, cache, lengths)
        if logits_index is not None:
            index = jnp.asarray(logits_index, jnp.int32).reshape(-1, 1, 1)
            hidden = jnp.take_along_axis(hidden, index, axis=1)
        if labels is not None:
            return self._chunked_loss(hidden, labels, loss_mask, loss_chunk)
        logits = self._head(hidden)
        return logits if cache is None else (logits, new_cache)

    def _head(self, hidden: Array) -> Array:
        """Logits of `hidden` (tied or own head; the family's final soft cap)."""
        if self.config.tie_word_embeddings:
            logits = self.model.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        cap = self.config.arch.final_softcap
        if cap is not None:
            capped = jnp.float32(cap) * jnp.tanh(logits.astype(jnp.float32) / jnp.float32(cap))
            logits = capped.astype(logits.dtype)
        return logits

    def _chunk_loss_sum(self, hidden: Array, labels: Array, weights: Array) -> Array:
        logits = self._head(hidden).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(ce * weights)

    def _chunked_loss(
        self, hidden: Array, labels: Array, mask: Array | None, chunk: int | None
    ) -> Array:
        labels = jnp.asarray(labels)
        s = hidden.shape[1]
        weights = (
            jnp.ones(labels.shape, jnp.float32)
            if mask is None
            else jnp.asarray(mask).astype(jnp.float32)
        )
        chunk = s if chunk is None else min(int(chunk), s)
        n = -(-s // chunk)
        pad = n * chunk - s  # padded positions weigh 0
        if pad:
            hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
            labels = jnp.pad(labels, ((0, 0), (0, pad)))
            weights = jnp.pad(weights, ((0, 0), (0, pad)))

        def chunks(x: Array) -> Array:  # (B, n * chunk, ...) -> (n, B, chunk, ...)
            return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

        def body(mdl: DecoderForCausalLM, total: Array, xs: tuple) -> tuple[Array, None]:
            return total + mdl._chunk_loss_sum(*xs), None

        # One chunk per scan step, rematerialised: its logits and log-softmax are recomputed in
        # the backward pass instead of kept, so only one chunk's (B, chunk, vocab) float32
        # temporaries live at a time.
        scan = nn.scan(
            nn.remat(body),
            variable_broadcast="params",
            split_rngs={"params": False},
            length=n,
        )
        total, _ = scan(self, jnp.float32(0), (chunks(hidden), chunks(labels), chunks(weights)))
        return total / jnp.maximum(jnp.sum(weights), 1.0)


# --------------------------------------------------------------------------------------------
# Helpers


def _check_labels(
    shape: tuple[int, ...],
    labels: Any,
    mask: Any,
    chunk: Any,
    cache: Any,
    logits_index: Any,
) -> None:
    """Raises ValueError unless ``labels`` (and ``loss_mask``, ``loss_chunk``) fit the call."""
    if cache is not None or logits_index is not None:
        raise ValueError(
            "labels (a loss) go with a full forward pass: not with cache or logits_index"
        )
    for name, value in (("labels", labels), ("loss_mask", mask)):
        got = tuple(getattr(value, "shape", np.shape(value))) if value is not None else shape
        if got != tuple(shape):
            raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}: got {got}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"loss_chunk must be a positive int (positions per chunk): got {chunk!r}")


def init_params(config: Any, key: PRNGKey) -> Params:
    """Initialises the model's parameters (HF-style: normal(initializer_range), norms at 1,
    or at 0 for Gemma's ``1 + w`` norms).

    Args:
        config: the model configuration (any family's).
        key: a PRNG key.

    Returns:
        The params dict (without the ``{"params": ...}`` collection wrapper).

    Example:
        >>> from rslora_jax.models.llama import LlamaConfig
        >>> p = init_params(LlamaConfig.tiny(), jax.random.key(0))
        >>> p["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape
        (2, 32, 32)
    """
    variables = _jitted_init(config)(key, jnp.zeros((1, 1), jnp.int32))
    return dict(variables["params"])


@functools.lru_cache(maxsize=16)
def _jitted_init(config: Any) -> Any:
    # One compiled initialiser per (hashable) config, reused across calls.
    return jax.jit(DecoderForCausalLM(config).init)


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
        >>> from rslora_jax.models.llama import LlamaConfig
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
    "MLP",
    "Attention",
    "DecoderForCausalLM",
    "DecoderLayer",
    "DecoderModel",
    "LayerInputs",
    "RMSNorm",
    "causal_lm_loss",
    "convert_scan",
    "init_params",
]
