"""Adapter methods and initialisers, one module each, registered with the core's protocol.

- `LoRA` (`rslora_jax.methods.lora`): LoRA / rsLoRA, the default.
- `RaSA` (`rslora_jax.methods.rasa`): rank sharing across layers (He et al. 2025).
- `DoRA` (`rslora_jax.methods.dora`): weight-decomposed LoRA (PEFT's ``use_dora``).
- Initialisers (`rslora_jax.methods.inits`): `Kaiming`, `Gaussian`, `PiSSA`, `OLoRA`.

A new method is a `rslora_jax.core.Method` subclass decorated with
`rslora_jax.core.register_method`; see ``docs/adding_a_method.md``.
"""

from rslora_jax.methods.dora import DoRA
from rslora_jax.methods.inits import Gaussian, Kaiming, OLoRA, PiSSA
from rslora_jax.methods.lora import LoRA
from rslora_jax.methods.rasa import RaSA

__all__ = ["DoRA", "Gaussian", "Kaiming", "LoRA", "OLoRA", "PiSSA", "RaSA"]
