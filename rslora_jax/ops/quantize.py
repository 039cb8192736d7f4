"""A quantized frozen base (QLoRA): quantize a parameter tree, read its size, undo it.

The array format and its math live in `rslora_jax.execution.quant` (`QuantizedArray`, a JAX
pytree node with codes and scales of the kernel's rank, so they shard like the kernel); here is
what works on whole trees: which kernels to quantize (by default those ``"all-linear"`` targets:
every ``kernel`` except ``lm_head``; embeddings and norms hold no ``kernel`` and stay in their
dtype), the checks that run before any work, the shardings of the quantized leaves, the
per-tensor transform the Hugging Face loader applies while it streams a checkpoint, and the
guard for functions that need a plain tree.

Typical use::

    base = rslora_jax.quantize(base, "nf4", config=lora_config)   # or while loading
    params = rslora_jax.init(base, lora_config, key)               # adapters on top
    apply = rslora_jax.lora(model.apply, lora_config)              # dequantized per layer
    merged = rslora_jax.merge(params, lora_config)                 # a plain tree again

Gradients never reach a quantized kernel (`rslora_jax.split` puts it in the base, and its
matmuls give it a zero cotangent); the optimizer state and the adapter checkpoints are exactly
those of a plain base.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rslora_jax._types import PyTree
from rslora_jax.core.config import ALL_LINEAR, LoraConfig, TargetSpec, matches
from rslora_jax.core.tree import KERNEL, iter_holders, join_path
from rslora_jax.execution.quant import (
    SCHEMES,
    QuantizedArray,
    check_quantizable,
    is_quantized,
    quantize_array,
)
from rslora_jax.execution.quant import (
    dequantize as dequantize_array,
)

#: The ``--quantize`` choices: no quantization, or a scheme of `rslora_jax.execution.quant`.
CHOICES = ("none", *SCHEMES)


def _in_axes(config: LoraConfig, path: str, shape: tuple[int, ...]) -> tuple[tuple, tuple]:
    """(input axes, output axes) of the kernel at `path`."""
    axes = config.axes_for(path, shape)
    return (
        tuple(i for i, r in enumerate(axes) if r == "i"),
        tuple(i for i, r in enumerate(axes) if r == "o"),
    )


def _selects(targets: TargetSpec, exclude: TargetSpec | None, path: str, kernel: Any) -> bool:
    if not matches(targets, path, kernel):
        return False
    return exclude is None or not matches(exclude, path, kernel)


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: unknown scheme {scheme!r}; expected one of {SCHEMES}")


def quantized_paths(params: PyTree) -> list[str]:
    """Paths of the dicts whose ``kernel`` is quantized.

    Example:
      >>> import jax.numpy as jnp
      >>> quantized_paths({"d": {"kernel": jnp.ones((64, 2))}})
      []
    """
    return [join_path(k) for k, h in iter_holders(params) if is_quantized(h[KERNEL])]


def check_plain(params: PyTree, where: str) -> None:
    """Raises ValueError naming the quantized kernels of `params` (for functions that need
    plain arrays: HF export, PEFT export of a base).

    Example:
      >>> import jax.numpy as jnp
      >>> check_plain({"d": {"kernel": jnp.ones((2, 2))}}, "save_pretrained")
    """
    found = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
        if is_quantized(leaf)
    ]
    if found:
        shown = ", ".join(repr(p) for p in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise ValueError(
            f"{where} needs plain arrays, but {shown}{more} is quantized "
            "(rslora_jax.quantize): call rslora_jax.merge (adapters folded into the "
            "dequantized kernels) or rslora_jax.dequantize first"
        )


def _plan(
    params: PyTree,
    scheme: str,
    config: LoraConfig,
    targets: TargetSpec,
    exclude: TargetSpec | None,
    block: int,
) -> dict[tuple, tuple[int, ...]]:
    """``{keys: input axes}`` of the kernels to quantize, every check done first."""
    _check_scheme(scheme)
    plan = {}
    for keys, holder in iter_holders(params):
        path = join_path(keys)
        kernel = holder[KERNEL]
        if not _selects(targets, exclude, path, kernel):
            continue
        if is_quantized(kernel):
            raise ValueError(
                f"quantize: the kernel at {path!r} is already quantized ({kernel.scheme}); "
                "quantizing twice would compound the rounding error (dequantize first)"
            )
        in_axes, out_axes = _in_axes(config, path, tuple(kernel.shape))
        where = f"quantize {path!r}"
        check_quantizable(tuple(kernel.shape), scheme, in_axes, block, where, out_axes)
        plan[tuple(keys)] = (in_axes, out_axes)
    if not plan:
        raise ValueError(
            f"quantize: targets={targets!r}, exclude={exclude!r} matched no kernel; paths: "
            f"{[join_path(k) for k, _ in iter_holders(params)][:20]}"
        )
    return plan


def quantized_spec(q: QuantizedArray, spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> Any:
    """The PartitionSpecs of `q`'s children for a kernel sharded as `spec`: each axis keeps
    the kernel's mesh axes where the child's size there splits evenly (packed codes and block
    scales then split at the kernel's shard boundaries), else it is replicated.

    Returns:
      A `QuantizedArray` whose children are `PartitionSpec` (a tree matching `q`).

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize_array(jnp.ones((128, 8)), "nf4")
      >>> s = quantized_spec(q, PartitionSpec("fsdp", "model"), {"fsdp": 4, "model": 8})
      >>> s.codes, s.scale
      (P('fsdp', 'model'), P(None, 'model'))
    """
    entries = list(spec) + [None] * (q.ndim - len(spec))

    def ways(name: Any) -> int:
        names = name if isinstance(name, tuple) else (name,)
        return math.prod(axis_sizes.get(n, 1) for n in names if n is not None)

    def child(x: Any) -> PartitionSpec:
        out = []
        for size, name in zip(x.shape, entries):
            out.append(name if name is not None and size > 1 and size % ways(name) == 0 else None)
        return PartitionSpec(*out)

    return jax.tree.map(child, q)


def _jitted(scheme: str, axes: tuple, block: int, double_quant: bool, where: str):
    return functools.partial(
        quantize_array,
        scheme=scheme,
        in_axes=axes[0],
        out_axes=axes[1],
        block=block,
        double_quant=double_quant,
        where=where,
    )


def _quantize_leaf(
    x: jax.Array, scheme: str, axes: tuple, block: int, double_quant: bool, where: str
) -> QuantizedArray:
    """One kernel, quantized on its devices; a `NamedSharding` kernel's codes and scales are
    placed by `quantized_spec` (sharded like the kernel)."""
    fn = _jitted(scheme, axes, block, double_quant, where)
    sharding = getattr(x, "sharding", None)
    out_shardings = None
    if isinstance(sharding, NamedSharding):
        abstract = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
        specs = quantized_spec(abstract, sharding.spec, dict(sharding.mesh.shape))
        out_shardings = jax.tree.map(
            lambda s: NamedSharding(sharding.mesh, s),
            specs,
            is_leaf=lambda s: isinstance(s, PartitionSpec),
        )
    return jax.jit(fn, out_shardings=out_shardings)(x)


def quantize(
    params: PyTree,
    scheme: str = "nf4",
    *,
    config: LoraConfig | None = None,
    targets: TargetSpec = ALL_LINEAR,
    exclude: TargetSpec | None = None,
    block: int = 64,
    double_quant: bool = False,
) -> PyTree:
    """The tree with the targeted kernels stored quantized (`QuantizedArray`).

    Args:
      params: a parameter tree (plain, or with adapters: only kernels change).
      scheme: ``"int8"`` (per-output-channel absmax), ``"nf4"`` (QLoRA's NormalFloat, block-wise
        absmax) or ``"fp8"`` (e4m3, per-output-channel scale).
      config: gives the kernels' axis roles (``kernel_axes``, ``fan_in_fan_out``) for kernels
        with more than two axes; default ``LoraConfig()``.
      targets: which kernels (same forms as ``LoraConfig.targets``): by default every kernel
        but ``lm_head``, the kernels LoRA targets by default.
      exclude: kernels to leave alone.
      block: nf4 block size along the input axis (even; where it divides no input axis, the
        blocks run along the output axis, e.g. a down projection with 688 inputs).
      double_quant: nf4: also quantize the block scales (int8 per output feature).

    Returns:
      The same structure with the targeted ``kernel`` leaves quantized (each quantized on its
      own devices, codes and scales sharded like a sharded kernel).

    Raises:
      ValueError: unknown scheme, no kernel matched, an already quantized kernel, or a block
        that does not divide a kernel's input axis (naming the path), before any work.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"q": {"kernel": jnp.ones((128, 4))}, "lm_head": {"kernel": jnp.ones((4, 9))}}
      >>> q = quantize(p, "nf4")
      >>> type(q["q"]["kernel"]).__name__, type(q["lm_head"]["kernel"]).__name__
      ('QuantizedArray', 'ArrayImpl')
    """
    config = config or LoraConfig()
    plan = _plan(params, scheme, config, targets, exclude, block)

    def walk(tree: Any, prefix: tuple) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        out = {k: walk(v, (*prefix, k)) for k, v in tree.items()}
        if prefix in plan and KERNEL in tree:
            where = f"quantize {join_path(prefix)!r}"
            out[KERNEL] = _quantize_leaf(
                tree[KERNEL], scheme, plan[prefix], block, double_quant, where
            )
        return out

    return walk(params, ())


def abstract_quantize(params: PyTree, scheme: str, **kwargs: Any) -> PyTree:
    """`quantize` on shapes alone (`jax.ShapeDtypeStruct` leaves in, and out): for building
    shardings and compiling before any weight is read.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"q": {"kernel": jax.ShapeDtypeStruct((128, 4), jnp.bfloat16)}}
      >>> abstract_quantize(p, "nf4")["q"]["kernel"].codes.shape
      (64, 4)
    """
    config = kwargs.pop("config", None) or LoraConfig()
    targets = kwargs.pop("targets", ALL_LINEAR)
    exclude = kwargs.pop("exclude", None)
    block = kwargs.pop("block", 64)
    double_quant = kwargs.pop("double_quant", False)
    if kwargs:
        raise ValueError(f"abstract_quantize: unexpected arguments {sorted(kwargs)}")
    plan = _plan(params, scheme, config, targets, exclude, block)

    def walk(tree: Any, prefix: tuple) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        out = {k: walk(v, (*prefix, k)) for k, v in tree.items()}
        if prefix in plan and KERNEL in tree:
            k = tree[KERNEL]
            fn = _jitted(scheme, plan[prefix], block, double_quant, join_path(prefix))
            out[KERNEL] = jax.eval_shape(fn, jax.ShapeDtypeStruct(k.shape, k.dtype))
        return out

    return walk(params, ())


def quantized_specs(specs: PyTree, abstract: PyTree, axis_sizes: Mapping[str, int]) -> PyTree:
    """Specs for a (partly) quantized tree from the plain tree's specs: each quantized kernel's
    spec becomes `quantized_spec`'s tree, the others are kept.

    Args:
      specs: PartitionSpecs of the plain tree (e.g. `rslora_jax.models.sharding.param_specs`).
      abstract: the quantized tree (arrays or `abstract_quantize`'s shapes).
      axis_sizes: the mesh's axis sizes (``dict(mesh.shape)``).

    Returns:
      A tree of PartitionSpecs matching `abstract`.
    """

    def walk(s: Any, a: Any) -> Any:
        if is_quantized(a):
            return quantized_spec(a, s, axis_sizes)
        if isinstance(a, Mapping):
            return {k: walk(s[k], v) for k, v in a.items()}
        return s

    return walk(specs, abstract)


def loader_transform(
    scheme: str,
    *,
    config: LoraConfig | None = None,
    targets: TargetSpec = ALL_LINEAR,
    exclude: TargetSpec | None = None,
    block: int = 64,
    double_quant: bool = False,
) -> Callable[[str, jax.Array], Any]:
    """The per-tensor transform that quantizes a checkpoint while it loads
    (``rslora_jax.hf.load_pretrained(..., transform=...)``): called with each leaf's path
    (``.../q_proj/kernel``) and array once it is on its devices, it returns the targeted
    kernels quantized (sharded like the kernel, the full-precision leaf then dropped) and the
    other leaves unchanged, so the device holds one full-precision leaf at a time.

    Example:
      >>> import jax.numpy as jnp
      >>> fn = loader_transform("int8")
      >>> type(fn("layers/q_proj/kernel", jnp.ones((4, 4)))).__name__
      'QuantizedArray'
      >>> fn("norm/scale", jnp.ones(4)).shape
      (4,)
    """
    _check_scheme(scheme)
    config = config or LoraConfig()

    def transform(path: str, x: jax.Array) -> Any:
        holder, _, leaf = path.rpartition("/")
        if leaf != KERNEL or not _selects(targets, exclude, holder, x):
            return x
        if is_quantized(x):
            raise ValueError(f"quantize: the kernel at {holder!r} is already quantized")
        axes = _in_axes(config, holder, tuple(x.shape))
        where = f"quantize {holder!r}"
        check_quantizable(tuple(x.shape), scheme, axes[0], block, where, axes[1])
        return _quantize_leaf(x, scheme, axes, block, double_quant, where)

    return transform


def dequantize(params: PyTree, dtype: Any = None) -> PyTree:
    """The tree with every quantized kernel dequantized (float32 math, cast once to `dtype`,
    default each kernel's original dtype): a plain tree.

    Example:
      >>> import jax.numpy as jnp
      >>> p = quantize({"q": {"kernel": jnp.ones((64, 2))}}, "nf4")
      >>> dequantize(p)["q"]["kernel"].tolist()[0]
      [1.0, 1.0]
    """
    return jax.tree.map(
        lambda x: dequantize_array(x, dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )


def base_bytes(params: PyTree) -> int:
    """Bytes the tree's leaves occupy (codes and scales for quantized kernels), adapters
    included if present: use it on the base of `rslora_jax.split`.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"q": {"kernel": jnp.ones((64, 4), jnp.bfloat16)}}
      >>> base_bytes(p), base_bytes(quantize(p, "nf4"))
      (512, 144)
    """
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            total += leaf.nbytes
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


__all__ = [
    "CHOICES",
    "QuantizedArray",
    "abstract_quantize",
    "base_bytes",
    "check_plain",
    "dequantize",
    "is_quantized",
    "loader_transform",
    "quantize",
    "quantized_paths",
    "quantized_spec",
    "quantized_specs",
]
