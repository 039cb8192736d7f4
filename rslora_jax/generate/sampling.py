"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus) sampling.

`SamplingConfig` holds the settings (checked when made, hashable: a compiled decode loop is
cached per setting); `next_tokens` draws one token per row from the logits of a step, as
transformers' ``generate`` does: the logits divided by the temperature, then the top-k filter,
then the top-p filter over what top-k left (the smallest set of most likely tokens whose
probability reaches ``top_p``), then one draw per row. Temperature 0 is greedy (``argmax``,
no randomness). Each row draws with its own key, folded with the step, so a row's tokens do not
depend on the other rows of the batch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from rslora_jax._types import Array, PRNGKey


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How many tokens to generate and how to pick them.

    Attributes:
      max_new_tokens: the most tokens generated per prompt (>= 1).
      temperature: logits are divided by it before sampling; 0 is greedy (>= 0).
      top_k: keep the k most likely tokens (0: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches it, in
        (0, 1] (1: all).
      stop_tokens: token ids that end a row (EOS); the stop token is part of the output.
      pad_token: the id written after a row has stopped.

    Raises:
      ValueError: for values outside those ranges, naming the field.

    Example:
      >>> SamplingConfig(max_new_tokens=8).greedy
      True
      >>> SamplingConfig(temperature=-1.0)
      Traceback (most recent call last):
      ...
      ValueError: SamplingConfig.temperature=-1.0: expected a finite number >= 0 (0 = greedy)
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0

    def __post_init__(self) -> None:
        def integer(name: str, low: int, what: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"SamplingConfig.{name}={value!r}: expected {what}")

        integer("max_new_tokens", 1, "an integer >= 1")
        integer("top_k", 0, "an integer >= 0 (0 = no top-k filter)")
        integer("pad_token", 0, "a token id >= 0")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(
                f"SamplingConfig.temperature={t!r}: expected a finite number >= 0 (0 = greedy)"
            )
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p={p!r}: expected a number in (0, 1]")
        stops = tuple(self.stop_tokens)
        for s in stops:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
                raise ValueError(
                    f"SamplingConfig.stop_tokens={self.stop_tokens!r}: expected token ids >= 0"
                )
        object.__setattr__(self, "stop_tokens", tuple(int(s) for s in stops))
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "top_k", int(self.top_k))

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax (temperature 0)."""
        return self.temperature == 0.0


def filter_logits(logits: Array, config: SamplingConfig) -> Array:
    """The float32 logits divided by the temperature, with the tokens outside top-k and top-p
    set to ``-inf`` (for a sampling config; greedy configs are not filtered).

    Args:
      logits: ``(B, V)`` logits.
      config: the sampling settings.

    Returns:
      ``(B, V)`` float32 logits to draw from.

    Example:
      >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
      >>> kept = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.8))
      >>> jnp.isfinite(kept).tolist()
      [[True, True, False, False]]
    """
    x = logits.astype(jnp.float32)
    if config.greedy:
        return x
    x = x / jnp.float32(config.temperature)
    neg = jnp.float32(-jnp.inf)
    if config.top_k and config.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, config.top_k)[0][..., -1:]
        x = jnp.where(x < kth, neg, x)
    if config.top_p < 1.0:
        ordered = jnp.sort(x, axis=-1)[..., ::-1]  # most likely first
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        keep = before < jnp.float32(config.top_p)  # the first token is always kept
        count = jnp.sum(keep, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, count - 1, axis=-1)
        x = jnp.where(x < cutoff, neg, x)
    return x


def next_tokens(logits: Array, keys: PRNGKey, step: Array, config: SamplingConfig) -> Array:
    """One token per row from a step's logits.

    Args:
      logits: ``(B, V)`` logits.
      keys: ``(B,)`` one PRNG key per row (unused when greedy).
      step: the step's index (folded into each row's key).
      config: the sampling settings.

    Returns:
      ``(B,)`` int32 token ids.

    Example:
      >>> logits = jnp.array([[0.0, 3.0, 1.0]])
      >>> next_tokens(logits, jax.random.split(jax.random.key(0), 1), 0, SamplingConfig()).tolist()
      [1]
    """
    x = filter_logits(logits, config)
    if config.greedy:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)

    def draw(key: PRNGKey, row: Array) -> Array:
        return jax.random.categorical(jax.random.fold_in(key, step), row)

    return jax.vmap(draw)(keys, x).astype(jnp.int32)


__all__ = ["SamplingConfig", "filter_logits", "next_tokens"]
