"""Kernel layouts: which axes of a kernel are layer, input and output axes.

A kernel of any rank is seen by the adapters as a stack of ``(d_in, d_out)`` matrices: the layer
axes (``l``: ``nn.scan`` stacks, einsum batch axes) index the stack, the input axes (``i``) and
the output axes (``o``) are flattened in kernel order. Factors are ``lora_a (*l, d_in, r)`` and
``lora_b (*l, r, d_out)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


class KernelLayout:
    """How a kernel's axes map onto the adapter factors.

    Example:
      >>> lay = KernelLayout("lio", (3, 4, 5))
      >>> lay.d_in, lay.d_out, lay.a_shape(2), lay.b_shape(2)
      (4, 5, (3, 4, 2), (3, 2, 5))
    """

    def __init__(self, axes: str, shape: tuple[int, ...]):
        self.axes = axes
        self.shape = tuple(int(s) for s in shape)
        self.layer_idx = tuple(i for i, a in enumerate(axes) if a == "l")
        self.in_idx = tuple(i for i, a in enumerate(axes) if a == "i")
        self.out_idx = tuple(i for i, a in enumerate(axes) if a == "o")
        self.layer_shape = tuple(self.shape[i] for i in self.layer_idx)
        self.in_shape = tuple(self.shape[i] for i in self.in_idx)
        self.out_shape = tuple(self.shape[i] for i in self.out_idx)
        self.d_in = math.prod(self.in_shape)
        self.d_out = math.prod(self.out_shape)

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (*self.layer_shape, self.d_in, r)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (*self.layer_shape, r, self.d_out)

    def out_vector_shape(self) -> tuple[int, ...]:
        """Shape of a per-output-feature vector (``(*l, d_out)``), e.g. DoRA's magnitude."""
        return (*self.layer_shape, self.d_out)

    def to_kernel(self, delta: jax.Array) -> jax.Array:
        """(*l, d_in, d_out) -> the kernel's own axis order and shape."""
        full = delta.reshape(*self.layer_shape, *self.in_shape, *self.out_shape)
        order = self.layer_idx + self.in_idx + self.out_idx
        inverse = np.argsort(order)
        return jnp.transpose(full, tuple(int(i) for i in inverse))

    def from_kernel(self, kernel: jax.Array) -> jax.Array:
        """The kernel as a (*l, d_in, d_out) matrix stack (inverse of `to_kernel`)."""
        order = self.layer_idx + self.in_idx + self.out_idx
        moved = jnp.transpose(kernel, order)
        return moved.reshape(*self.layer_shape, self.d_in, self.d_out)


__all__ = ["KernelLayout"]
