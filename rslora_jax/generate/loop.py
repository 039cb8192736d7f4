"""`generate`: prompts in, new tokens out, with a key/value cache, in one compiled program.

The program (one `jax.jit` per model, adapters config, sampling settings and batch shape):

1. **prefill**: the prompts, right-padded to a common length (a multiple of 16, so that nearby
   lengths share a compilation), run through the model once, writing every layer's keys and
   values into an empty cache (`rslora_jax.models.cache`); the logits at each row's last
   prompt token give the first new token;
2. **decode**: a `jax.lax.while_loop` feeds each row's last token at its own position, one
   token per step, until every row has met a stop token or ``max_new_tokens`` are out.

A model with LongRoPE (Phi-3) switches to its long frequencies once a sequence grows past the
pre-training context; at the step where a row crosses that point, the cache is recomputed over
every row's sequence so far (one more prefill, as transformers does), so that every step's
logits equal a forward pass over the sequence so far.

Rows are independent: a row's keys and values sit at its own positions and attention is causal
by position, so padding is never attended to, and every row draws with its own key: a row's
result is the one it gets alone (greedy tokens exactly; logits up to rounding).

Adapters are applied as trained: params with adapter leaves run through
``rslora_jax.lora(model.apply, lora_config, mode="auto")``, whose dispatch computes a handful
of tokens per step factored, ``y = x @ W + s * (x @ A) @ B`` (no merged copy of the weights),
and the prefill's many tokens fused or factored as in training; a merged tree (or a plain
base) runs the model as it is. Several adapters serve one batch when the params hold adapters
stacked by `rslora_jax.ops.stack.stack_adapters` and ``adapter_index`` names each row's.

On a device mesh (``mesh=``), the parameters keep the shardings they were placed with (the
training shardings: `rslora_jax.models.sharding.param_specs` and `rslora_jax.partition_specs`),
prompts and cache rows are split over the ``data``/``fsdp`` axes and the cache's K/V heads over
``model`` (tensor-parallel decode) when their number divides.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rslora_jax._types import Array, Params, PRNGKey
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.sites import layout_for
from rslora_jax.core.tree import KERNEL, adapted_holders, adapter_leaves, split
from rslora_jax.frontends.linen import lora
from rslora_jax.generate.sampling import SamplingConfig, next_tokens
from rslora_jax.models.cache import constrain_cache, init_cache, needs_refill
from rslora_jax.models.rope import is_dynamic
from rslora_jax.ops.quantize import quantized_paths

#: Prompts are right-padded to a multiple of this (fewer compilations for nearby lengths).
PAD_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` returns (host numpy arrays, one row per prompt).

    Attributes:
      tokens: ``(B, max_new_tokens)`` int32 new tokens; after a row stops, its pad token.
      lengths: ``(B,)`` new tokens per row (a stop token included).
      stopped: ``(B,)`` whether the row ended with a stop token.
      prompt_lengths: ``(B,)`` prompt tokens per row.
      logits: ``(B, max_new_tokens, V)`` float32 logits each new token was drawn from (with
        ``return_logits=True``; rows past their end hold what the model computed there).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    prompt_lengths: np.ndarray
    logits: np.ndarray | None = None

    def completions(self) -> list[list[int]]:
        """Each row's new tokens as a list (a final stop token included)."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def _check_prompts(prompts: Sequence[Sequence[int]], config: Any, max_new: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            f"prompts: expected a non-empty list of token-id sequences, got {type(prompts).__name__}"
        )
    vocab, limit = config.vocab_size, config.max_position_embeddings
    out = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"prompts[{i}]: expected a non-empty 1-D sequence of integer token ids, got "
                f"{ids.dtype} of shape {ids.shape}"
            )
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(
                f"prompts[{i}]: token id {int(ids.max() if ids.max() >= vocab else ids.min())} "
                f"is outside the model's vocabulary [0, {vocab})"
            )
        if ids.size > limit:
            raise ValueError(
                f"prompts[{i}] has {ids.size} tokens, more than the model's "
                f"{limit} positions (max_position_embeddings): shorten it"
            )
        if ids.size + max_new > limit:
            raise ValueError(
                f"prompts[{i}] has {ids.size} tokens: with max_new_tokens={max_new} it would "
                f"reach position {ids.size + max_new}, past the model's {limit} positions "
                f"(max_position_embeddings); lower max_new_tokens to {limit - ids.size} or less"
            )
        out.append([int(t) for t in ids])
    return out


def _stack_size(params: Params, lora_config: LoraConfig) -> int:
    """The number of stacked adapters (the axis after the layer axes of an ``a``-layout leaf)."""
    names = [n for n, leaf in lora_config.method.leaves.items() if leaf.layout == "a"]
    for path, holder in adapted_holders(params):
        layers = len(layout_for(lora_config, path, holder[KERNEL]).layer_shape)
        for name, leaf in adapter_leaves(holder).items():
            if name in names:
                if leaf.ndim != layers + 3:
                    raise ValueError(
                        f"adapter_index: the adapters at {path!r} are not stacked ({name} has "
                        f"shape {tuple(leaf.shape)}); stack them with "
                        "rslora_jax.ops.stack.stack_adapters"
                    )
                return int(leaf.shape[layers])
    raise ValueError("adapter_index: the params hold no stacked adapters")


def _keys(key: Any, batch: int) -> PRNGKey:
    if key is None:
        return jax.random.split(jax.random.key(0), batch)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    if key.shape != (batch,):
        raise ValueError(
            f"key: expected one PRNG key, or one per prompt ({batch}); got shape {key.shape}"
        )
    return key


def _batch_axes(mesh: Any) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp") if a in mesh.shape)


def generate(
    model: Any,
    params: Params,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
    *,
    lora_config: LoraConfig | None = None,
    adapter_index: Sequence[int] | None = None,
    key: PRNGKey | None = None,
    mesh: Any = None,
    mode: str = "auto",
    on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    return_logits: bool = False,
) -> Generation:
    """Generates new tokens after each prompt (see the module docstring).

    Args:
      model: a built-in causal LM (e.g. ``LlamaForCausalLM(config)``): its ``apply`` takes a
        ``cache`` (`rslora_jax.models.cache`).
      params: its parameters: a plain or merged tree, or one with adapter leaves (then
        `lora_config` is needed); the base may be quantized (`rslora_jax.quantize`).
      prompts: token-id sequences, of any lengths.
      sampling: how many tokens and how to pick them (default: 32 greedy tokens).
      lora_config: the adapters' config, when `params` hold adapters.
      adapter_index: one adapter per prompt, for params whose adapters are stacked
        (`rslora_jax.ops.stack.stack_adapters`).
      key: a PRNG key (one, folded with each row's index, or one per prompt); needed to
        sample, unused when greedy.
      mesh: a `jax.sharding.Mesh` to decode on (see the module docstring); the params should
        already be placed on it.
      mode: the `rslora_jax.lora` mode of adapted params (``"auto"``, ``"factored"``,
        ``"fused"``, ``"merged"``).
      on_token: called on the host after every step with ``(step, tokens (B,), active (B,))``
        (``active``: the row had not stopped before this step), e.g. to stream text.
      return_logits: also return the logits of every step.

    Returns:
      A `Generation`.

    Raises:
      ValueError: before anything is compiled: empty or out-of-vocabulary prompts, a prompt
        (plus ``max_new_tokens``) longer than the model's positions, adapters without a
        config, a sampling config without a key, ``adapter_index`` that does not fit.

    Example:
      >>> from rslora_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_params
      >>> cfg = LlamaConfig.tiny()
      >>> params = init_params(cfg, jax.random.key(0))
      >>> out = generate(LlamaForCausalLM(cfg), params, [[1, 2, 3], [4]],
      ...                SamplingConfig(max_new_tokens=4))
      >>> out.tokens.shape, out.lengths.tolist()
      ((2, 4), [4, 4])
    """
    sampling = sampling if sampling is not None else SamplingConfig()
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling: expected a SamplingConfig, got {type(sampling).__name__}")
    config = model.config
    rows = _check_prompts(prompts, config, sampling.max_new_tokens)
    for s in (*sampling.stop_tokens, sampling.pad_token):
        if s >= config.vocab_size:
            raise ValueError(
                f"sampling: token id {s} (stop or pad) is outside the model's vocabulary "
                f"[0, {config.vocab_size})"
            )
    adapters, _ = split(params)
    if adapters and lora_config is None:
        raise ValueError(
            "params hold adapters (keys 'lora_...'): pass their lora_config, or merge them "
            "(rslora_jax.merge) first"
        )
    n = len(rows)
    index = None
    if adapter_index is not None:
        if not adapters:
            raise ValueError("adapter_index given, but the params hold no adapters")
        index = np.asarray(adapter_index)
        size = _stack_size(params, lora_config)
        if index.shape != (n,) or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(
                f"adapter_index: expected {n} integers (one per prompt), got {index.dtype} of "
                f"shape {index.shape}"
            )
        if index.min() < 0 or index.max() >= size:
            raise ValueError(
                f"adapter_index: {index.tolist()} has entries outside [0, {size}) (the params "
                f"stack {size} adapters)"
            )
    if key is None and not sampling.greedy:
        raise ValueError(
            f"sampling with temperature {sampling.temperature} needs a PRNG key (key=...)"
        )
    ways = 1
    if mesh is not None:
        for a in _batch_axes(mesh):
            ways *= mesh.shape[a]
    batch = -(-n // ways) * ways
    longest = max(len(r) for r in rows)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = np.zeros((batch, width), np.int32)
    lengths = np.ones((batch,), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        lengths[i] = len(r)
    keys = _keys(key, n)
    if batch > n:
        keys = jnp.concatenate([keys, jax.random.split(jax.random.key(0), batch - n)])
    idx = None
    if index is not None:
        idx = np.zeros((batch,), np.int32)
        idx[:n] = index
    wrap = lora_config if adapters else None
    if wrap is None and quantized_paths(params):  # a quantized base runs through `lora`
        wrap = lora_config or LoraConfig()
    run = _program(
        type(model),
        config,
        wrap,
        mode,
        sampling,
        mesh,
        on_token,
        n,
        return_logits,
    )
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        rows_sharding = NamedSharding(mesh, PartitionSpec(_batch_axes(mesh) or None))
        ids, lengths, keys = jax.device_put((ids, lengths, keys), rows_sharding)
        if idx is not None:
            idx = jax.device_put(idx, rows_sharding)
    tokens, count, stopped, logits = run(params, ids, lengths, keys, idx)
    return Generation(
        tokens=np.asarray(tokens)[:n],
        lengths=np.asarray(count)[:n],
        stopped=np.asarray(stopped)[:n],
        prompt_lengths=np.asarray([len(r) for r in rows], np.int32),
        logits=None if logits is None else np.asarray(logits)[:n],
    )


@functools.lru_cache(maxsize=32)
def _program(
    model_class: Any,
    config: Any,
    lora_config: LoraConfig | None,
    mode: str,
    sampling: SamplingConfig,
    mesh: Any,
    on_token: Any,
    n_rows: int,
    return_logits: bool,
) -> Callable:
    """The jitted prefill + decode loop (cached; `jax.jit` caches per batch shape)."""
    model = model_class(config)
    apply = model.apply if lora_config is None else lora(model.apply, lora_config, mode=mode)
    max_new = sampling.max_new_tokens
    stops = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)
    pad = jnp.int32(sampling.pad_token)
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        batch_axes = _batch_axes(mesh) or None
        tp = mesh.shape.get("model", 1)
        heads = "model" if tp > 1 and config.num_key_value_heads % tp == 0 else None

        def fix_cache(cache: Any) -> Any:
            return constrain_cache(cache, mesh, batch_axes, heads)

        def fix_rows(x: Array) -> Array:
            spec = PartitionSpec(batch_axes, *([None] * (x.ndim - 1)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

        def to_host(x: Array) -> Array:  # replicated: the callback reads it on one device
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))
    else:

        def fix_cache(cache: Any) -> Any:
            return cache

        def fix_rows(x: Array) -> Array:
            return x

        def to_host(x: Array) -> Array:
            return x

    def call(params: Params, ids: Array, positions: Array, cache: Any, index: Any, last: Any):
        kwargs = {} if index is None else {"adapter_index": index}
        return apply({"params": params}, ids, positions, cache=cache, logits_index=last, **kwargs)

    def report(step: Array, tokens: Array, active: Array) -> None:
        if on_token is not None:

            def host(step: Any, tokens: Any, active: Any) -> None:
                on_token(int(step), np.asarray(tokens)[:n_rows], np.asarray(active)[:n_rows])

            # Ordered callbacks need one device; on a mesh the steps' data dependence orders them.
            tokens, active = to_host(tokens), to_host(active)
            jax.debug.callback(host, step, tokens, active, ordered=mesh is None)

    dynamic = any(is_dynamic(r) for r in config.arch.ropes)

    def prefill(params: Params, ids: Array, length: int, index: Any, last: Array) -> Any:
        """Logits at `last` of every row, and a new cache of `length` slots holding `ids`."""
        b, width = ids.shape
        cache = fix_cache(init_cache(config, b, length))
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
        return call(params, ids, positions, cache, index, last)

    def run(params: Params, ids: Array, lengths: Array, keys: PRNGKey, index: Any):
        b, width = ids.shape
        ids, lengths = fix_rows(ids), fix_rows(lengths)
        logits, cache = prefill(params, ids, width + max_new, index, lengths - 1)
        logits = logits[:, 0].astype(jnp.float32)
        token = next_tokens(logits, keys, jnp.int32(0), sampling)
        report(jnp.int32(0), token, jnp.ones((b,), bool))
        out = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(token)
        saved = None
        if return_logits:
            saved = jnp.zeros((b, max_new, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
        done = jnp.isin(token, stops)
        count = jnp.ones((b,), jnp.int32)
        state = (jnp.int32(1), token, lengths, done, count, out, saved, fix_cache(cache))

        def cond(state: Any) -> Array:
            step, _, _, done, *_ = state
            return (step < max_new) & ~jnp.all(done)

        def body(state: Any) -> Any:
            step, token, position, done, count, out, saved, cache = state

            def decode(cache: Any) -> Any:
                return call(params, token[:, None], position[:, None], cache, index, None)

            def refill(cache: Any) -> Any:  # every row's sequence so far, prefilled again
                del cache
                cols = lengths[:, None] + jnp.arange(max_new, dtype=jnp.int32)
                seq = jnp.zeros((b, width + max_new), jnp.int32).at[:, :width].set(ids)
                seq = seq.at[jnp.arange(b)[:, None], cols].set(out)
                return prefill(params, seq, width + max_new, index, position)

            if dynamic:
                crossing = jnp.any(needs_refill(config, position) & ~done)
                logits, cache = jax.lax.cond(crossing, refill, decode, cache)
            else:
                logits, cache = decode(cache)
            logits = logits[:, 0].astype(jnp.float32)
            new = next_tokens(logits, keys, step, sampling)
            new = jnp.where(done, pad, new)
            report(step, new, ~done)
            out = out.at[:, step].set(new)
            if saved is not None:
                saved = saved.at[:, step].set(logits)
            count = count + (~done).astype(jnp.int32)
            done = done | jnp.isin(new, stops)
            return step + 1, new, position + 1, done, count, out, saved, fix_cache(cache)

        _, _, _, done, count, out, saved, _ = jax.lax.while_loop(cond, body, state)
        stopped = jnp.isin(jnp.take_along_axis(out, (count - 1)[:, None], axis=1)[:, 0], stops)
        return out, count, stopped & done, saved

    return jax.jit(run)


__all__ = ["PAD_MULTIPLE", "Generation", "generate"]
