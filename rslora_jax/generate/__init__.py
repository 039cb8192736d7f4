"""Generation with the built-in models: a key/value cache, one compiled decode loop, adapters
applied as trained (factored at decode), several adapters in one batch, a device mesh.

- `rslora_jax.generate.sampling`: `SamplingConfig` (greedy, temperature, top-k, top-p, stop
  tokens, max new tokens) and `next_tokens`;
- `rslora_jax.generate.loop`: `generate` (prefill, then a `jax.lax.while_loop` of decode steps)
  and its result, `Generation`.

The cache itself lives with the models (`rslora_jax.models.cache`); stacking adapters for one
batch is `rslora_jax.ops.stack.stack_adapters`. The command ``python -m rslora_jax.generate``
(``rslora-generate``) is `rslora_jax.cli.generate`.

Example:
  >>> import jax
  >>> from rslora_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_params
  >>> cfg = LlamaConfig.tiny()
  >>> out = generate(LlamaForCausalLM(cfg), init_params(cfg, jax.random.key(0)), [[5, 6]],
  ...                SamplingConfig(max_new_tokens=3, temperature=0.8, top_p=0.9),
  ...                key=jax.random.key(1))
  >>> len(out.completions()[0])
  3
"""

from rslora_jax.generate.loop import PAD_MULTIPLE, Generation, generate
from rslora_jax.generate.sampling import SamplingConfig, filter_logits, next_tokens

__all__ = [
    "PAD_MULTIPLE",
    "Generation",
    "SamplingConfig",
    "filter_logits",
    "generate",
    "next_tokens",
]
