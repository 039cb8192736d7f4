"""Frontends: how a model's adapted layers are found and computed. `rslora_jax.frontends.linen`
(`lora(apply_fn, config)`: interception of linen layers), `rslora_jax.frontends.nnx`
(`add_adapters`: LoRA-aware NNX layers), and `rslora_jax.frontends.site` (one adapted layer:
the method's factors, then the dispatch), which the built-in models use too."""
