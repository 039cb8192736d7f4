"""Growing the vocabulary: new tokens in the tokenizer, new rows in the embedding and LM head.

`add_tokens` adds tokens to a transformers tokenizer and, when its ids outgrow the model's
table, rows to the embedding (and columns to an untied ``lm_head`` kernel), initialised as the
mean of the existing rows, as transformers' ``resize_token_embeddings(mean_resizing=True)``
does (transformers draws them from a normal distribution around that mean with ``1e-9`` times
the rows' covariance, i.e. the mean to about ``3e-5`` of the rows' spread; here it is the mean
exactly, computed in float32). Pair it with ``LoraConfig(trainable_token_indices=new_ids)`` (or
``modules_to_save``) to train the new rows; `rslora_jax.merge` then gives the resized model,
which `rslora_jax.hf.save_pretrained` writes with the new ``vocab_size``.

`resize_vocab` is the parameter part alone. The model side (where the tables are) comes from the
family (`rslora_jax.models.families`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from rslora_jax._types import Params
from rslora_jax.core.tree import is_adapter_key
from rslora_jax.models.families import family_of


def _get(tree: Any, keys: Sequence[str]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _with(tree: Any, keys: Sequence[str], leaf: str, value: Any) -> Any:
    if not keys:
        return {**tree, leaf: value}
    return {**tree, keys[0]: _with(tree[keys[0]], keys[1:], leaf, value)}


def _grown(table: Any, axis: int, size: int) -> Any:
    """`table` with ``size - n`` new entries along `axis`, each the mean of the others."""
    n = int(table.shape[axis])
    mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True)
    reps = [1] * table.ndim
    reps[axis] = size - n
    return jnp.concatenate([table, jnp.tile(mean, reps).astype(table.dtype)], axis=axis)


def with_vocab_size(model_config: Any, size: int) -> Any:
    """A copy of `model_config` (ours or a transformers config) with ``vocab_size=size``."""
    if hasattr(model_config, "to_json_string"):  # a transformers config
        new_config = copy.deepcopy(model_config)
        new_config.vocab_size = size
        return new_config
    return model_config.replace(vocab_size=size)


def add_to_tokenizer(tokenizer: Any, tokens: Sequence[str], *, special: bool = True) -> tuple:
    """Adds `tokens` to `tokenizer` (in place); returns their ids, in order.

    Raises:
      ValueError: no tokens, or a token that is not a non-empty string.
    """
    if isinstance(tokens, str) or not tokens:
        raise ValueError(f"add_tokens: tokens must be a non-empty list of strings, got {tokens!r}")
    for t in tokens:
        if not isinstance(t, str) or not t:
            raise ValueError(f"add_tokens: {t!r} is not a token (a non-empty string)")
    tokenizer.add_tokens(list(tokens), special_tokens=special)
    return tuple(int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens)))


def resize_vocab(params: Params, model_config: Any, size: int) -> tuple[Params, Any]:
    """Grows the embedding (and an untied ``lm_head``) of `params` to `size` tokens.

    New rows are the mean of the existing rows (float32, cast to the table's dtype); the model
    config comes back with ``vocab_size=size``.

    Args:
      params: the model's params (base, no adapters).
      model_config: our model config (e.g. `LlamaConfig`) or a transformers config.
      size: the new vocabulary size (at least the current one).

    Returns:
      ``(params, model_config)`` resized; the config is of the type given.

    Raises:
      ValueError: `size` smaller than the table, params with adapter entries, or params whose
        tables do not match the config.

    Example:
      >>> import jax
      >>> from rslora_jax.models import LlamaConfig, init_params
      >>> cfg = LlamaConfig.tiny()
      >>> p, cfg2 = resize_vocab(init_params(cfg, jax.random.key(0)), cfg, 70)
      >>> p["model"]["embed_tokens"]["embedding"].shape, cfg2.vocab_size
      ((70, 32), 70)
    """
    fam = family_of(model_config, "resize_vocab")
    emb_path, _ = fam.flax_module_path(fam.embedding_name, True)
    out_path, _ = fam.flax_module_path(fam.output_name, True)
    emb_keys = emb_path.split("/")
    holder = _get(params, emb_keys)
    if any(is_adapter_key(k) for k in holder):
        raise ValueError(
            f"resize_vocab: {emb_path!r} holds adapter entries; resize the base, then add adapters"
        )
    table = holder["embedding"]
    vocab = int(table.shape[0])
    if vocab != int(model_config.vocab_size):
        raise ValueError(
            f"resize_vocab: {emb_path}/embedding has {vocab} rows, the config says vocab_size="
            f"{model_config.vocab_size}"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < vocab:
        raise ValueError(f"resize_vocab: size={size!r} must be an int >= the vocabulary ({vocab})")
    if size == vocab:
        return params, model_config
    params = _with(
        params, emb_keys[:-1], emb_keys[-1], {**holder, "embedding": _grown(table, 0, size)}
    )
    if not model_config.tie_word_embeddings:
        out_keys = out_path.split("/")
        head = _get(params, out_keys)
        kernel = head["kernel"]
        if int(kernel.shape[-1]) != vocab:
            raise ValueError(
                f"resize_vocab: {out_path}/kernel {tuple(kernel.shape)} does not end with the "
                f"vocabulary ({vocab})"
            )
        grown = {**head, "kernel": _grown(kernel, kernel.ndim - 1, size)}
        params = _with(params, out_keys[:-1], out_keys[-1], grown)
    return params, with_vocab_size(model_config, size)


def add_tokens(
    params: Params,
    model_config: Any,
    tokenizer: Any,
    tokens: Sequence[str],
    *,
    special: bool = True,
) -> tuple[Params, Any, tuple[int, ...]]:
    """Adds `tokens` to `tokenizer` (in place) and grows the model's tables to fit.

    Args:
      params: the model's params (base, no adapters).
      model_config: our model config or a transformers config.
      tokenizer: a transformers tokenizer (e.g. `rslora_jax.hf.load_tokenizer`); changed in
        place, save it with the model (``tokenizer.save_pretrained``).
      tokens: the new tokens (tokens it already has are kept, with their ids).
      special: add them as special tokens (never split, e.g. chat markers).

    Returns:
      ``(params, model_config, ids)``: the resized params and config (vocabulary
      ``max(vocab_size, len(tokenizer))``), and the ids of `tokens` in order, e.g. for
      ``LoraConfig(trainable_token_indices=ids)``.

    Raises:
      ValueError: no tokens, or a token that is not a non-empty string; as `resize_vocab`.

    Example:
      >>> import jax
      >>> from rslora_jax.hf import load_tokenizer
      >>> from rslora_jax.models import LlamaConfig, init_params
      >>> cfg = LlamaConfig.tiny(vocab_size=2048)
      >>> tok = load_tokenizer()
      >>> p, cfg2, ids = add_tokens(init_params(cfg, jax.random.key(0)), cfg, tok, ["<|user|>"])
      >>> ids, cfg2.vocab_size, p["model"]["embed_tokens"]["embedding"].shape[0]
      ((2048,), 2049, 2049)
    """
    ids = add_to_tokenizer(tokenizer, tokens, special=special)
    size = max(int(model_config.vocab_size), len(tokenizer), max(ids) + 1)
    params, model_config = resize_vocab(params, model_config, size)
    return params, model_config, ids


__all__ = ["add_to_tokenizer", "add_tokens", "resize_vocab", "with_vocab_size"]
