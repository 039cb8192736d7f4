"""Flax NNX frontend: adapters inside `nnx.Linear` / `LinearGeneral` / `Einsum` layers, and
inside registered einsum layers whose weight is not a ``kernel`` (google-tunix's ``Einsum``
with ``w``: `rslora_jax.frontends.registry`; stacked projections such as tunix Gemma 3's
``kv_einsum`` get one adapter per member).

Two ways to use the library with an NNX model:

- **In the model** (`add_adapters`): each targeted layer gains the leaves its adapter method
  declares as `nnx.LoRAParam` variables (a subclass of `nnx.Param`) named like the leaves
  (``lora_a``, ``lora_b``; DoRA's ``lora_magnitude``; RaSA's ``lora_d``) next to its ``kernel``,
  and its class is swapped for a LoRA-aware subclass (`LoraLinear`, `LoraLinearGeneral`,
  `LoraEinsum`). The leaves are drawn by the core (`rslora_jax.init` / `principal_init` on the
  pure dict of the targeted kernels), so they equal what `rslora_jax.init` draws on
  ``nnx.to_pure_dict(state)`` for the same key. The model stays an ordinary NNX graph:
  `nnx.split` / `nnx.merge` round-trip it, ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains
  only the adapters, and every leaf carries ``out_sharding`` metadata derived from its kernel's
  and its layout (`rslora_jax.ops.sharding.leaf_spec`), so `nnx.get_partition_spec` shards it
  like the base. `merge` folds them into a plain model for serving.
- **Merged**, on the pure dict of `nnx.split`'s state with the core functions:
  ``rslora_jax.init`` / ``split`` / ``optimizer`` / ``merge`` and `merged_model` to rebuild the
  module for the forward pass. Works for any NNX layer with a ``kernel`` (Conv too).

A LoRA layer's ``__call__`` describes itself as a `rslora_jax.execution.dispatch.Contraction`,
takes the factor pair and column rescale from the method (`rslora_jax.frontends.site`), and the
one dispatch (`rslora_jax.execution.dispatch`) computes it, factored or fused, as for linen.

Support matrix of `add_adapters` (every cell factored and fused; fused where the dispatch can:
a layer whose contraction is a plain matmul after reshapes, no custom ``dot_general`` /
``einsum_op`` / ``out_sharding``, no active adapter dropout):

================  ============  ================  ==================================
method / init     plain layers  stacked layers    notes
================  ============  ================  ==================================
LoRA / rsLoRA     yes           yes               kaiming / gaussian init
PiSSA / OLoRA     yes           yes               base kernels become W - gamma*A@B
DoRA              yes           yes               ``lora_magnitude``
RaSA              yes           no (clear error)  pools shared by the layers
================  ============  ================  ==================================

("stacked": layers made with ``nnx.vmap`` and run with ``nnx.scan``; RaSA's pools are not
stacked, and ``nnx.scan`` would slice them with the layers.) RaSA's pools (a method's shared
entry) are one `nnx.Dict` of `nnx.LoRAParam`, referenced by every adapted layer: NNX keeps a
shared variable once, so `nnx.state` and ``nnx.Optimizer`` hold each pool once (under the first
adapted layer in graph order, ``<layer path>/lora_shared/...``) and the gradients of all layers
reach it. `to_params` moves it to the top-level ``lora_shared`` entry of the core layout and
`update_from_dict` takes it back from there.

Both ways give the same parameter layout as linen: `to_params` is a nested dict in which each
adapted ``kernel`` has its adapter leaves beside it, with the same values `rslora_jax.init` draws
for the same key, so the core checkpoint, merge and PEFT export functions accept it. A path is
the '/'-joined NNX path of the layer (``model/layers/0/self_attn/q_proj``; list items are
numbered), used for targets, ``rank_pattern`` / ``alpha_pattern`` and the per-path scale.

Kernel axes (which kernel axes are input, output or layer axes) are read off the module:
``nnx.Linear`` is ``"io"``; ``nnx.LinearGeneral`` is ``"l" * len(batch_axis) + "i" *
len(in_features) + "o" * len(out_features)``; an ``nnx.Einsum`` kernel axis is ``l`` if its
letter appears in the input and the output, ``i`` if only in the input, ``o`` if only in the
output. Extra leading kernel axes (layers stacked by ``nnx.vmap`` and run with ``nnx.scan``)
are layer axes. `kernel_axes` returns them, for core functions that need
``LoraConfig(kernel_axes=...)`` on kernels with more than two axes.

A quantized base (`rslora_jax.frontends.nnx_quant.quantize_model`) is read by the same layers:
the dispatch dequantizes each kernel inside the adapted matmul.

(Longer than this package's usual module: it is one frontend, the layer classes and the graph
operations that attach, merge, read and write their variables, about half of it docstrings.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax.sharding import NamedSharding, PartitionSpec

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core.config import ALL_LINEAR, OUTPUT_LAYER_NAMES, LoraConfig
from rslora_jax.core.protocol import shared_key_owner
from rslora_jax.core.sites import check_listed_targets
from rslora_jax.core.tree import KERNEL, get, is_adapter_key, iter_weights, set_in
from rslora_jax.execution.dispatch import Contraction, adapted, fuses
from rslora_jax.execution.lowrank import einsum_roles
from rslora_jax.execution.quant import is_quantized
from rslora_jax.frontends.registry import (
    EinsumLayer,
    einsum_layer,
    inferred_roles,
    member_letters,
)
from rslora_jax.frontends.site import method_inputs
from rslora_jax.ops.init import init_adapters, principal_init
from rslora_jax.ops.merge import merge as merge_params
from rslora_jax.ops.sharding import leaf_spec

LoRAParam = nnx.LoRAParam
"""The variable type of the adapter leaves (flax's own, a subclass of `nnx.Param`)."""

_SHARDING_METADATA = ("sharding_rules", "mesh")
_PROMOTE = nnx_dtypes.promote_dtype
# Letters for the input's leading axes of an nnx.Linear call ('y' and 'z' are the kernel's).
_LEAD = string.ascii_lowercase[:24] + string.ascii_uppercase
# Static attributes add_adapters sets on a layer (besides the leaves and the shared entry).
_STATIC = ("lora_config", "lora_path", "lora_roles", "lora_mode", "adapter_dropout")


# ---------------------------------------------------------------------------- contractions
def _parse_einsum(einsum_str: str) -> tuple[str, str, str]:
    eq = einsum_str.replace(" ", "")
    lhs, rs = eq.split("->")
    xs, ks = lhs.split(",")
    return xs, ks, rs


def _einsum_eq(einsum_str: str, x: Any, kernel: Any) -> tuple[str, str, str]:
    """The call's einsum with explicit letters (``...`` expanded against `x`)."""
    import opt_einsum

    operands, result, _ = opt_einsum.parser.parse_einsum_input(
        (einsum_str.replace(" ", ""), x, kernel)
    )
    xs, ks = operands.split(",")
    return xs, ks, result


def _linear_general_eq(module: nnx.LinearGeneral, ndim: int) -> tuple[str, str, str]:
    """``LinearGeneral``'s dot_general as an einsum (batch, free input, output axes)."""
    # Sorted, as LinearGeneral itself contracts them: the kernel's input axes follow that order.
    axis = tuple(sorted(ax % ndim for ax in module.axis))
    batch = tuple(sorted(ax % ndim for ax in module.batch_axis))
    letters = iter(string.ascii_letters)
    x_l = [next(letters) for _ in range(ndim)]
    out_l = [next(letters) for _ in module.out_features]
    free = [x_l[i] for i in range(ndim) if i not in axis and i not in batch]
    bat = [x_l[ax] for ax in batch]
    ks = "".join(bat + [x_l[ax] for ax in axis] + out_l)
    return "".join(x_l), ks, "".join(bat + free + out_l)


def _value(var: Any) -> Any:
    return None if var is None else var[...]


# ---------------------------------------------------------------------------- layer classes
class _LoraLayer:
    """Mixin: computes the layer through the method protocol and the dispatch.

    Instances are made by `add_adapters` (which sets the method's leaves, the shared entry if
    the method has one, ``lora_config``, ``lora_path``, ``lora_roles``, ``lora_mode`` and
    optionally ``adapter_dropout``), never constructed.
    """

    __slots__ = ()  # keeps the instance layout of the layer class, so __class__ can be swapped

    lora_config: LoraConfig
    lora_path: str
    lora_roles: str
    lora_mode: str

    @property
    def lora_scale(self) -> float:
        """The config's scale at this layer's path (``gamma``; RaSA's diagonal carries its
        own, and the forward uses the scale the method's `pair` returns)."""
        return float(self.lora_config.scale_for(self.lora_path))

    def _contraction(self, inputs: jax.Array, **call: Any) -> Contraction:
        raise NotImplementedError

    def _exact(self, out_sharding: Any) -> bool:
        """Whether the layer computes exactly its einsum (so the dispatch may fuse it)."""
        return (
            out_sharding is None
            and getattr(self, "preferred_element_type", None) is None
            and getattr(self, "promote_dtype", _PROMOTE) is _PROMOTE
        )

    def _active_dropout(self) -> Callable[[jax.Array], jax.Array] | None:
        dropout = getattr(self, "adapter_dropout", None)
        if dropout is None or dropout.rate <= 0 or dropout.deterministic:
            return None
        return dropout

    def _shared(self) -> dict[str, Any] | None:
        """The method's shared entry as the core's top-level params hold it, or None."""
        key = self.lora_config.method.shared_key
        node = getattr(self, key, None) if key is not None else None
        return None if node is None else {key: _node_values(node)}

    def _fuses(self, inputs: jax.Array, out_sharding: Any = None) -> bool:
        """Whether a call on `inputs` is fused (`rslora_jax.execution.dispatch.fuses`)."""
        lin = self._contraction(inputs, out_sharding=out_sharding)
        return fuses(inputs, [lin], self.lora_mode, [self._active_dropout()])

    def _adapted(self, inputs: jax.Array, lin: Contraction, base: Callable) -> jax.Array:
        config = self.lora_config
        leaves = {name: getattr(self, name)[...] for name in config.method.leaves}
        pair, col = method_inputs(config, leaves, self.lora_path, self._shared(), lin)
        return adapted(
            inputs,
            lin,
            pair,
            base=base,
            col=col,
            mode=self.lora_mode,
            dropout=self._active_dropout(),
        )


class LoraLinear(nnx.Linear, _LoraLayer):
    """`nnx.Linear` with an adapter (made by `add_adapters`), computed by the dispatch:
    factored, or fused (one matmul with ``W + gamma*A@B``, low-rank gradients) as the layer's
    ``lora_mode`` says."""

    def _contraction(self, inputs: jax.Array, out_sharding: Any = None) -> Contraction:
        lead = _LEAD[: inputs.ndim - 1]
        return Contraction(
            eq=(lead + "y", "yz", lead + "z"),
            kernel=self.kernel[...],
            bias=_value(self.bias),
            dtype=self.dtype,
            precision=self.precision,
            exact=self._exact(out_sharding) and self.dot_general is jax.lax.dot_general,
        )

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        base = functools.partial(super().__call__, out_sharding=out_sharding)
        return self._adapted(inputs, self._contraction(inputs, out_sharding), base)


class LoraLinearGeneral(nnx.LinearGeneral, _LoraLayer):
    """`nnx.LinearGeneral` with an adapter (made by `add_adapters`); fused as `LoraLinear` when
    it contracts the input's trailing axes and has no batch axes."""

    def _contraction(self, inputs: jax.Array, out_sharding: Any = None) -> Contraction:
        ndim = inputs.ndim
        bias = _value(self.bias)
        if bias is not None:  # as LinearGeneral broadcasts it: batch axes, 1 per free axis
            axis = {ax % ndim for ax in self.axis}
            batch = {ax % ndim for ax in self.batch_axis}
            expanded = tuple(
                inputs.shape[ax] if ax in batch else 1 for ax in range(ndim) if ax not in axis
            )
            bias = bias.reshape(*expanded, *self.out_features)
        plain = self.dot_general in (None, jax.lax.dot_general) and self.dot_general_cls is None
        return Contraction(
            eq=_linear_general_eq(self, ndim),
            kernel=self.kernel[...],
            bias=bias,
            dtype=self.dtype,
            precision=self.precision,
            exact=self._exact(out_sharding) and plain,
        )

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        base = functools.partial(super().__call__, out_sharding=out_sharding)
        return self._adapted(inputs, self._contraction(inputs, out_sharding), base)


class LoraEinsum(nnx.Einsum, _LoraLayer):
    """`nnx.Einsum` with an adapter (made by `add_adapters`); fused when the einsum is a
    matmul of the input's trailing axes after reshapes (e.g. ``"btnk,nkd->btd"``)."""

    def _contraction(
        self, inputs: jax.Array, out_sharding: Any = None, einsum_str: str | None = None
    ) -> Contraction:
        text = einsum_str if einsum_str is not None else self.einsum_str
        kernel = self.kernel[...]
        eq = _einsum_eq(text, inputs, kernel)
        if einsum_roles(*eq) != self.lora_roles:
            raise ValueError(
                f"Einsum at {self.lora_path!r} was adapted for kernel axes {self.lora_roles!r} "
                f"but is called with einsum_str={einsum_str!r} (axes {einsum_roles(*eq)!r})"
            )
        bias = _value(self.bias)
        if bias is not None:
            bias = bias.reshape(self._infer_broadcasted_bias_shape(text, inputs, kernel))
        return Contraction(
            eq=eq,
            kernel=kernel,
            bias=bias,
            dtype=self.dtype,
            precision=self.precision,
            exact=self._exact(out_sharding) and self.einsum_op is jnp.einsum,
        )

    def __call__(
        self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> jax.Array:
        lin = self._contraction(inputs, out_sharding, einsum_str)
        base = functools.partial(super().__call__, einsum_str=einsum_str, out_sharding=out_sharding)
        return self._adapted(inputs, lin, base)


class LoraEinsumLayer(_LoraLayer):
    """A registered einsum layer (`rslora_jax.frontends.registry`: google-tunix's ``Einsum``,
    whose weight is ``w``) with an adapter (made by `add_adapters`). Its call is described by
    its registry entry; the member axis of a stacked projection (tunix Gemma 3's ``kv_einsum``)
    gets one adapter per member. Fused where the dispatch can (the einsum a matmul of the
    input's trailing axes, per member for stacked ones); factored next to the layer's own call
    otherwise."""

    __slots__ = ()

    def _entry(self) -> EinsumLayer:
        entry = einsum_layer(type(self), "nnx")
        assert entry is not None  # the class was made for a registered one
        return entry

    def _contraction(self, inputs: jax.Array, out_sharding: Any = None) -> Contraction:
        del out_sharding
        entry = self._entry()
        weight = getattr(self, entry.weight_name(self))[...]
        _, text = entry.read(self, (inputs,), {})
        eq = _einsum_eq(text, inputs, weight)
        return Contraction(
            eq=eq,
            kernel=weight,
            dtype=entry.dtype(self),
            exact=entry.exact(self),
            members=member_letters(self.lora_roles, eq),
        )

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        entry = self._entry()
        x, _ = entry.read(self, args, kwargs)

        def base(inp: jax.Array) -> jax.Array:
            a, kw = entry.with_input(args, kwargs, inp)
            return _base_class(type(self)).__call__(self, *a, **kw)

        return self._adapted(x, self._contraction(x), base)


def _weight(module: Any) -> nnx.Variable | None:
    """The weight variable of an adaptable layer: its ``kernel``, or the weight its registry
    entry names (tunix: ``w``); None for other modules."""
    var = getattr(module, "kernel", None)
    if isinstance(var, nnx.Variable):
        return var
    entry = einsum_layer(type(module), "nnx")
    if entry is None:
        return None
    var = getattr(module, entry.weight_name(module), None)
    return var if isinstance(var, nnx.Variable) else None


_LORA_CLASSES: dict[type, type] = {
    nnx.Linear: LoraLinear,
    nnx.LinearGeneral: LoraLinearGeneral,
    nnx.Einsum: LoraEinsum,
}
_SUBCLASSES: dict[type, type] = {}
# Layers whose kernel is quantized and that have no adapter (`rslora_jax.frontends.nnx_quant`):
# plain class <-> its quantized-kernel class.
QUANT_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type | None:
    """The LoRA-aware class for a layer class, or None if it cannot be adapted."""
    cls = next((plain for plain, q in QUANT_CLASSES.items() if q is cls), cls)
    if cls in _LORA_CLASSES:
        return _LORA_CLASSES[cls]
    if einsum_layer(cls, "nnx") is not None and not issubclass(cls, _LoraLayer):
        if cls not in _SUBCLASSES:
            # The layer class first (so the instance layout is its own and __class__ can be
            # swapped), the LoRA call taken over explicitly.
            namespace = {
                "__module__": __name__,
                "__call__": LoraEinsumLayer.__call__,
                "_contraction": LoraEinsumLayer._contraction,
            }
            _SUBCLASSES[cls] = type(f"Lora{cls.__name__}", (cls, LoraEinsumLayer), namespace)
        return _SUBCLASSES[cls]
    for base, lora_cls in _LORA_CLASSES.items():
        # A subclass that keeps the base's __call__ computes the same thing: give it a
        # LoRA-aware subclass of its own, so its other methods and attributes stay.
        if issubclass(cls, base) and cls.__call__ is base.__call__:
            if cls not in _SUBCLASSES:
                _SUBCLASSES[cls] = type(f"Lora{cls.__name__}", (lora_cls, cls), {})
            return _SUBCLASSES[cls]
    return None


def _base_class(cls: type) -> type:
    """Inverse of `_lora_class`."""
    for lora_cls in (*_LORA_CLASSES.values(), *_SUBCLASSES.values()):
        if cls is lora_cls:
            return next(c for c in cls.__mro__[1:] if not issubclass(c, _LoraLayer))
    raise ValueError(f"{cls.__name__} is not a LoRA layer class")


def _set_class(module: nnx.Module, cls: type) -> None:
    # Bypass nnx's __setattr__: the class is not an attribute of the graph node.
    object.__setattr__(module, "__class__", cls)


# ---------------------------------------------------------------------------- shared entry
def _node_values(node: Any) -> Any:
    """Nested dict of the arrays of a shared entry (`nnx.Dict` of variables)."""
    if isinstance(node, nnx.Variable):
        return node[...]
    return {k: _node_values(v) for k, v in node.items()}


def _shared_node(values: Mapping[str, Any], make: Callable[[tuple, Any], nnx.Variable], prefix=()):
    """An `nnx.Dict` tree mirroring `values`, with ``make(keys, value)`` variables."""
    return nnx.Dict(
        {
            k: _shared_node(v, make, (*prefix, k))
            if isinstance(v, Mapping)
            else make((*prefix, k), v)
            for k, v in values.items()
        }
    )


def _lift_shared(tree: Any, depth: int = 0, found: dict | None = None) -> Any:
    """Copies a pure dict, moving a method's shared entry from the adapted layer where NNX
    keeps it (``<layer>/lora_shared``) to the top level, as the core layout has it."""
    top = found is None
    found = {} if found is None else found
    holds_leaves = any(is_adapter_key(k) and not isinstance(v, Mapping) for k, v in tree.items())
    out = {}
    for key, val in tree.items():
        if depth > 0 and holds_leaves and isinstance(val, Mapping) and shared_key_owner(key):
            found.setdefault(key, val)
        elif isinstance(val, Mapping) and not (depth > 0 and is_adapter_key(key)):
            out[key] = _lift_shared(val, depth + 1, found)
        else:
            out[key] = val
    if top:
        for key, val in found.items():
            out.setdefault(key, val)
    return out


def _shared_nodes(node: Any) -> dict[str, Any]:
    """``{shared key: nnx.Dict}`` of the adapted layers of `node`."""
    out = {}
    for _, module in _lora_layers(node):
        key = module.lora_config.method.shared_key
        if key is not None and key in vars(module):
            out.setdefault(key, getattr(module, key))
    return out


def _pair_shared(node: Any, values: Any, keys: tuple, out: list) -> None:
    """``(variable, value)`` pairs for writing `values` into a shared entry; raises on a
    structure or shape mismatch."""
    where = "/".join(map(str, keys))
    if isinstance(node, nnx.Variable):
        if not hasattr(values, "shape") or tuple(values.shape) != tuple(node.shape):
            raise ValueError(
                f"update_from_dict: {where!r} holds {getattr(values, 'shape', type(values))}, "
                f"the model's variable there has shape {tuple(node.shape)}"
            )
        out.append((node, values))
        return
    if not isinstance(values, Mapping):
        raise ValueError(f"update_from_dict: {where!r} must be a dict, got {type(values)}")
    for k, v in values.items():
        if k not in node:
            raise ValueError(
                f"update_from_dict: {where}/{k} is not in the model's shared adapter entry "
                f"(it holds {sorted(node)})"
            )
        _pair_shared(node[k], v, (*keys, k), out)


# ---------------------------------------------------------------------------- discovery
def _join(path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in path)


def _kernel_modules(model: Any) -> list[tuple[tuple[Any, ...], nnx.Module]]:
    """``(path, module)`` for every module holding an `nnx.Param` ``kernel``, in graph order."""
    out: list[tuple[tuple[Any, ...], nnx.Module]] = []
    seen: set[int] = set()

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        # Graph nodes only (nnx.iter_children), each once, at its first path (as nnx.state).
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, nnx.Module) and _weight(node) is not None:
            out.append((path, node))
        for key, child in nnx.iter_children(node):
            if not isinstance(child, nnx.Variable):
                walk(child, (*path, key))

    walk(model, ())
    out.sort(key=lambda item: tuple(map(str, item[0])))
    return out


def _local_roles(module: nnx.Module, path: str) -> str:
    """Axis roles of the kernel as the module itself uses it (no stacked layer axes)."""
    if isinstance(module, nnx.LinearGeneral):
        return (
            "l" * len(module.batch_axis)
            + "i" * len(module.in_features)
            + "o" * len(module.out_features)
        )
    entry = None if isinstance(module, nnx.Einsum) else einsum_layer(type(module), "nnx")
    if entry is not None:
        weight = _weight(module)
        _, text = entry.read(module, (), {})
        if not isinstance(text, str):
            raise ValueError(
                f"{type(module).__name__} at {path!r} has no einsum equation where its registry "
                f"entry says ({entry.equation!r}), so its kernel axes are unknown"
            )
        xs, ks, rs = _parse_einsum(text)
        roles = None
        if "." not in ks:
            roles = inferred_roles(path, (xs, ks, rs))
        if roles is None or len(ks) > weight.ndim:
            raise ValueError(
                f"{type(module).__name__} at {path!r} ({text!r}) cannot be factored: every "
                "weight axis must be an input, output or batch axis, with at least one input and "
                "one output axis, and the weight operand must not use '...'"
            )
        return roles
    if isinstance(module, nnx.Einsum):
        if module.einsum_str is None:
            raise ValueError(
                f"Einsum at {path!r} has no einsum_str attribute (it is passed at call time), so "
                "its kernel axes are unknown; give the module its einsum_str"
            )
        xs, ks, rs = _parse_einsum(module.einsum_str)
        roles = None if "." in ks else einsum_roles(xs, ks, rs)
        if roles is None or "i" not in roles or "o" not in roles:
            raise ValueError(
                f"Einsum at {path!r} ({module.einsum_str!r}) cannot be factored: every kernel "
                "axis must be an input, output or batch axis, with at least one input and one "
                "output axis, and the kernel operand must not use '...'"
            )
        return roles
    return "io"


def _full_roles(module: nnx.Module, path: str) -> str:
    local = _local_roles(module, path)
    ndim = _weight(module).ndim
    if ndim < len(local):
        raise ValueError(
            f"kernel at {path!r} has shape {tuple(_weight(module).shape)}, fewer axes than its "
            f"{type(module).__name__} uses ({local!r})"
        )
    return "l" * (ndim - len(local)) + local


def kernel_axes(model: Any) -> dict[str, str]:
    """Axis roles of every adaptable kernel of an NNX model, as ``{path: roles}``.

    Pass the result as ``LoraConfig(kernel_axes=...)`` when calling core functions
    (`rslora_jax.init`, `merge`, `partition_specs`) on the model's pure dict with kernels of
    more than two axes. Paths hold only names, digits and '/', so they are valid regexes.

    Args:
      model: an NNX module (graph node).

    Returns:
      ``{path: roles}`` for each ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` (and
      subclasses that keep their ``__call__``), letters ``l`` / ``i`` / ``o`` per kernel axis.

    Example:
      >>> from flax import nnx
      >>> layer = nnx.LinearGeneral(4, (2, 3), rngs=nnx.Rngs(0))
      >>> kernel_axes(layer)
      {'': 'ioo'}
    """
    out = {}
    for path, module in _kernel_modules(model):
        cls = type(module)
        if _lora_class(cls) is None and not issubclass(cls, _LoraLayer):
            continue
        p = _join(path)
        out[p] = _full_roles(module, p)
    return out


# ---------------------------------------------------------------------------- sharding
def _kernel_metadata(kernel: nnx.Variable) -> tuple[Any, Any, dict]:
    """The kernel's ``out_sharding`` metadata as (PartitionSpec or None, mesh or None, the
    other sharding metadata to copy)."""
    names = kernel.get_metadata("out_sharding", None)
    if not names:
        return None, None, {}
    extra = {k: kernel.get_metadata(k) for k in _SHARDING_METADATA if k in kernel.get_metadata()}
    if isinstance(names, NamedSharding):
        return names.spec, names.mesh, extra
    return PartitionSpec(*names), None, extra


def _names(spec: PartitionSpec, mesh: Any) -> Any:
    return NamedSharding(mesh, spec) if mesh is not None else tuple(spec)


def _placed_sharding(value: Any) -> NamedSharding | None:
    """The `NamedSharding` of a concrete array (None under a transform or unsharded)."""
    if isinstance(value, jax.core.Tracer):
        return None
    sharding = getattr(value, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) else None


def _member_specs(spec: PartitionSpec, roles: str) -> tuple[Any, Any]:
    """(input spec, output spec) of a kernel, flattened, as `Method.shared_specs` takes them."""
    return tuple(leaf_spec("a", spec, roles))[-2], tuple(leaf_spec("b", spec, roles))[-1]


# ---------------------------------------------------------------------------- public API
def _check_call(config: Any, mode: str, dropout_rngs: Any) -> None:
    if not isinstance(config, LoraConfig):
        raise ValueError(f"add_adapters: config must be a LoraConfig, got {type(config)}")
    if mode not in ("auto", "factored", "fused"):
        raise ValueError(f"add_adapters: mode must be 'auto', 'factored' or 'fused', got {mode!r}")
    if config.dropout > 0 and dropout_rngs is None:
        raise ValueError(
            f"add_adapters: LoraConfig.dropout={config.dropout} needs dropout_rngs "
            "(an nnx.Rngs with a 'dropout' or default stream)"
        )


def _plan(model: Any, config: LoraConfig) -> tuple[dict, dict]:
    """``({path: (keys, module, full roles)}, kernels tree)`` of the targeted layers, checked."""
    modules = _kernel_modules(model)
    for path, module in modules:
        if isinstance(module, _LoraLayer):
            raise ValueError(f"{_join(path)!r} already has adapters ({type(module).__name__})")
    plan: dict[str, tuple[tuple, nnx.Module, str]] = {}
    tree: dict[Any, Any] = {}  # the targeted kernels, laid out as the pure dict
    for path, module in modules:
        p = _join(path)
        kernel = _weight(module)[...]
        if not config.is_target(p, kernel):
            continue
        if _lora_class(type(module)) is None:
            raise ValueError(
                f"{p!r} is a {type(module).__name__}, which the factored NNX forward (or the "
                "fused one) cannot compute (the NNX adapter layers handle nnx.Linear, "
                "nnx.LinearGeneral and nnx.Einsum); exclude it "
                "(LoraConfig(exclude=...)) or use the merged recipe (rslora_jax.init on "
                "nnx.to_pure_dict(state), rslora_jax.nnx.merged_model)"
            )
        roles = _full_roles(module, p)
        try:
            configured = config.axes_for(p, kernel.shape)
        except ValueError:
            configured = roles
        if configured != roles:
            raise ValueError(
                f"LoraConfig gives kernel axes {configured!r} for {p!r}, but its "
                f"{type(module).__name__} uses {roles!r} (check kernel_axes / fan_in_fan_out)"
            )
        plan[p] = (path, module, roles)
        set_in(tree, (*path, KERNEL), kernel)
    others = _other_weights(model, {_join(p) for p, _ in modules})
    matched = [(p, w) for p, w, _ in others if config.is_target(p, w)]
    if matched and config.targets != ALL_LINEAR:
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}) matches weights of modules the NNX frontend "
            f"cannot adapt: {_listing(matched)}. The NNX adapter layers are nnx.Linear, "
            "nnx.LinearGeneral, nnx.Einsum and registered einsum layers "
            "(rslora_jax.frontends.registry.register_einsum_layer); exclude these or register "
            "their class"
        )
    if not plan:
        candidates = ", ".join(repr(_join(p)) for p, _ in modules[:30]) or "none"
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}, exclude={config.exclude!r}) matched no "
            f"kernel of the NNX model. Candidate paths: {candidates}"
        )
    matched = [(p, w) for p, w, embedding in others if not embedding and config.is_target(p, w)]
    if matched:
        warnings.warn(
            "LoraConfig(targets='all-linear') leaves weights of modules the NNX frontend cannot "
            f"adapt unadapted: {_listing(matched)}; register their class "
            "(rslora_jax.frontends.registry.register_einsum_layer) to adapt them, or exclude "
            "them (LoraConfig(exclude=...)) to silence this",
            UserWarning,
            stacklevel=3,
        )
    paths = [_join(p) for p, _ in modules] + [p for p, _, _ in others]
    check_listed_targets(config, paths, " of the NNX model")
    method = config.method
    if method.shared_key is not None:
        stacked = [p for p, (_, m, roles) in plan.items() if len(roles) > len(_local_roles(m, p))]
        if stacked:
            raise ValueError(
                f"{method.title} adapters on stacked NNX layers ({stacked[0]!r}, kernel axes "
                f"{plan[stacked[0]][2]!r}: made with nnx.vmap) are not supported: its shared "
                f"entry ({method.shared_key!r}) is not stacked, and nnx.scan would slice it "
                "with the layers. Use unstacked layers (a list of modules), the linen frontend "
                "(rslora_jax.lora on nn.scan), or the merged recipe (rslora_jax.init on "
                "nnx.to_pure_dict(state), rslora_jax.nnx.merged_model)"
            )
    return plan, tree


def _other_weights(model: Any, layers: set[str]) -> list[tuple[str, Any, bool]]:
    """``(path, weight, is embedding or output layer)`` of the `nnx.Param` weights (two or more
    axes; not biases or scales) outside the adaptable layers `layers` (their paths)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = []
    for ref, holder in iter_weights(params):
        if _join(ref.keys) in layers:
            continue
        names = (str(ref.name), *map(str, ref.keys[-1:]))
        embedding = any("embed" in n.lower() for n in names) or (
            ref.path.rsplit("/", 1)[-1] in OUTPUT_LAYER_NAMES
        )
        out.append((ref.path, holder[KERNEL], embedding))
    return out


def _listing(weights: list[tuple[str, Any]]) -> str:
    shown = ", ".join(f"{p!r} {tuple(w.shape)}" for p, w in weights[:20])
    return shown + (f" (and {len(weights) - 20} more)" if len(weights) > 20 else "")


def _with_axes(config: LoraConfig, plan: dict) -> LoraConfig:
    """`config`, with the kernel axes read off the modules where the config cannot tell them."""
    known = True
    for p, (_, module, _) in plan.items():
        try:
            config.axes_for(p, _weight(module).shape)
        except ValueError:
            known = False
            break
    if known:
        return config
    return dataclasses.replace(
        config, kernel_axes=tuple((re.escape(p), roles) for p, (_, _, roles) in plan.items())
    )


def _attach_shared(config: LoraConfig, plan: dict, values: Mapping[str, Any]) -> nnx.Dict:
    """The shared entry as an `nnx.Dict` of `LoRAParam`, placed and annotated like its
    members' kernels (`Method.shared_specs`)."""
    method = config.method
    meta_members: dict[str, tuple[Any, Any]] = {}
    placed_members: dict[str, tuple[Any, Any]] = {}
    mesh = meta_mesh = None
    extra: dict = {}
    for p, (_, module, roles) in plan.items():
        spec, m, more = _kernel_metadata(_weight(module))
        if spec is not None:
            meta_members[p] = _member_specs(spec, roles)
            meta_mesh = m if meta_mesh is None else meta_mesh
            extra = extra or more
        sharding = _placed_sharding(_weight(module).get_raw_value())
        if sharding is not None:
            placed_members[p] = _member_specs(sharding.spec, roles)
            mesh = sharding.mesh if mesh is None else mesh
    replicated = (None, None)
    meta_specs = placed_specs = None
    if meta_members:
        full = {p: meta_members.get(p, replicated) for p in plan}
        meta_specs = method.shared_specs(values, full, config)
    if placed_members:
        full = {p: placed_members.get(p, replicated) for p in plan}
        placed_specs = method.shared_specs(values, full, config)

    def make(keys: tuple, value: Any) -> nnx.Variable:
        meta = {}
        if meta_specs is not None:
            meta = {"out_sharding": _names(get(meta_specs, keys), meta_mesh), **extra}
        if placed_specs is not None:
            value = jax.device_put(value, NamedSharding(mesh, get(placed_specs, keys)))
        return LoRAParam(value, eager_sharding=False, **meta)

    return _shared_node(values, make)


def add_adapters(
    model: Any,
    config: LoraConfig,
    key: PRNGKey,
    *,
    dropout_rngs: nnx.Rngs | nnx.RngStream | None = None,
    mode: str = "auto",
) -> Any:
    """Adds adapters (any method, any initialiser) to an NNX model, in place.

    Every ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` whose path `config` targets gains the
    leaves of ``config.method`` as `nnx.LoRAParam` attributes named like the leaves (LoRA:
    ``lora_a`` (*l, d_in, r) and ``lora_b`` (*l, r, d_out, zeros); DoRA adds
    ``lora_magnitude``; RaSA ``lora_d`` and its shared pools, see the module docstring), and its
    output includes the adapter from then on. The leaves are the core's
    (`rslora_jax.init` on the model's pure dict, same key, same values); a base-modifying
    initialiser (PiSSA, OLoRA) also writes the residual kernels ``W - gamma*A@B`` into the
    layers. Leaves of a sharded kernel are placed on its mesh with the spec of their layout
    (A: the input axes' spec, B and per-output leaves: the output axes'), and carry the derived
    ``out_sharding`` metadata when the kernel has some.

    Args:
      model: an NNX module (modified in place and returned).
      config: method, targets, ranks and scales; paths are '/'-joined NNX paths.
      key: a PRNG key for the initialiser.
      dropout_rngs: needed when ``config.dropout > 0``: each adapted layer gets an
        ``nnx.Dropout`` (attribute ``adapter_dropout``) on the adapter input, drawing from
        this ``Rngs``' ``dropout`` stream; ``model.eval()`` turns it off.
      mode: how the layers compute the adapter (as `rslora_jax.lora`'s modes, decided per
        call by `rslora_jax.execution.dispatch`): ``"factored"``, ``"fused"`` (one matmul with
        ``W + gamma*A@B`` formed per call, adapter gradients in low-rank form) or ``"auto"``
        (fused once a call's tokens reach ``d_in*d_out/(d_in+d_out)``). Kept per layer as
        ``lora_mode``; active adapter dropout and layers whose contraction is not a matmul of
        the input's trailing axes (batch axes, transposes) are always factored.

    Returns:
      `model`.

    Raises:
      ValueError: if nothing is targeted (listing candidate paths), if a targeted kernel
        belongs to a layer that cannot be adapted (use the merged recipe for it, or exclude
        it), if a layer already has adapters, if the rank exceeds a kernel's dimensions, if
        the config's kernel axes for a path contradict the module, if the method has a shared
        entry (RaSA) and a target is stacked, or if dropout is on and `dropout_rngs` is missing.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> x = jnp.ones((3, 4))
      >>> y0 = model(x)
      >>> model = add_adapters(model, LoraConfig(rank=2), jax.random.key(0))
      >>> type(model.layers[0]).__name__, model.layers[0].lora_a.shape
      ('LoraLinear', (4, 2))
      >>> bool(jnp.allclose(model(x), y0))  # B = 0: output unchanged
      True

      Other methods need nothing else: ``LoraConfig(method="dora")`` adds a magnitude.

      >>> layer = add_adapters(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
      ...                      LoraConfig(rank=2, method="dora"), jax.random.key(0))
      >>> layer.lora_magnitude.shape
      (3,)
    """
    _check_call(config, mode, dropout_rngs)
    plan, tree = _plan(model, config)
    cfg = _with_axes(config, plan)
    method = cfg.method
    # The core draws every leaf (and checks ranks, RaSA groups ...) on the pure-dict layout.
    if cfg.init.modifies_base:
        adapters, base = principal_init(tree, cfg, key)
    else:
        adapters, base = init_adapters(tree, cfg, key), None
    shared = None
    if method.shared_key is not None and method.shared_key in adapters:
        shared = _attach_shared(cfg, plan, adapters[method.shared_key])
    for p, (path, module, roles) in plan.items():
        kernel_var = _weight(module)
        kernel_value = kernel_var.get_raw_value()
        placed = _placed_sharding(kernel_value)
        spec, mesh, extra = _kernel_metadata(kernel_var)
        if base is not None:
            new_kernel = get(base, path)[KERNEL]
            kernel_var.set_value(
                new_kernel if placed is None else jax.device_put(new_kernel, placed)
            )
        leaves = get(adapters, path)
        local = _local_roles(module, p)
        _set_class(module, _lora_class(type(module)))
        for name, leaf in method.leaves.items():
            value = leaves[name]
            if placed is not None:
                value = jax.device_put(
                    value, NamedSharding(placed.mesh, leaf_spec(leaf.layout, placed.spec, roles))
                )
            meta = {}
            if spec is not None:
                meta = {"out_sharding": _names(leaf_spec(leaf.layout, spec, roles), mesh), **extra}
            # Created as eager_sharding=False: the values are already placed like the kernel,
            # and creating them must not need a mesh context.
            setattr(module, name, LoRAParam(value, eager_sharding=False, **meta))
        if shared is not None:
            setattr(module, method.shared_key, shared)  # one node, referenced by every layer
        module.lora_config = cfg
        module.lora_path = p
        module.lora_roles = local  # as the module sees its kernel (inside nnx.scan: no stack)
        module.lora_mode = mode
        if cfg.dropout > 0:
            module.adapter_dropout = nnx.Dropout(cfg.dropout, rngs=dropout_rngs)
    return model


def _lora_layers(model: Any) -> list[tuple[tuple[Any, ...], Any]]:
    return [(p, m) for p, m in _kernel_modules(model) if isinstance(m, _LoraLayer)]


def _strip(module: Any) -> None:
    method = module.lora_config.method
    names = (*method.leaves, *((method.shared_key,) if method.shared_key else ()), *_STATIC)
    for name in names:
        if name in vars(module):
            delattr(module, name)
    plain = _base_class(type(module))
    if is_quantized(_weight(module).get_raw_value()) and plain in QUANT_CLASSES:
        plain = QUANT_CLASSES[plain]  # adapters removed from a quantized layer
    _set_class(module, plain)


@functools.partial(jax.jit, static_argnums=(1,))
def _merged_kernels(tree: PyTree, config: LoraConfig) -> PyTree:
    """The core merge (`rslora_jax.merge`) of the adapted layers, in one compiled program."""
    return merge_params(tree, config)


def merge(model: Any) -> Any:
    """A plain copy of an adapted NNX model with every adapter folded into its kernel.

    The kernels are the core merge's (`rslora_jax.merge`, any method: ``W + gamma * A @ B``;
    RaSA: with the shared pools; DoRA: ``m * V / ||V||``), computed in one compiled program
    (float32, cast to the kernel's dtype once); the copy's layers are the original classes again
    (``nnx.Linear`` ...) without adapter variables, so its state has exactly the structure of
    the model before `add_adapters`. `model` is left unchanged (unchanged arrays are shared
    with the copy).

    Args:
      model: an NNX model with adapters from `add_adapters`.

    Returns:
      The merged model.

    Raises:
      ValueError: if the model has no adapters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = add_adapters(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), LoraConfig(rank=2),
      ...                      jax.random.key(1))
      >>> layer.lora_b[...] = jnp.ones((2, 3))
      >>> merged = merge(layer)
      >>> type(merged).__name__, hasattr(merged, "lora_a")
      ('Linear', False)
      >>> x = jnp.ones((1, 4))
      >>> bool(jnp.allclose(merged(x), layer(x), atol=1e-5))
      True
    """
    out = nnx.clone(model)  # the copy's layers hold the same arrays
    layers = _lora_layers(out)
    if not layers:
        raise ValueError("merge: the model has no adapters (rslora_jax.nnx.add_adapters)")
    config = layers[0][1].lora_config
    method = config.method
    tree: dict[Any, Any] = {}  # the adapted layers alone, in the core layout
    for path, module in layers:
        holder = {KERNEL: _weight(module)[...]}
        holder.update({name: getattr(module, name)[...] for name in method.leaves})
        if path:
            set_in(tree, path, holder)
        else:  # the model is the layer
            tree.update(holder)
    tree.update(layers[0][1]._shared() or {})
    merged = _merged_kernels(tree, config)
    for path, module in layers:
        _strip(module)
        _weight(module).set_value(get(merged, path)[KERNEL])
    return out


def remove_adapters(model: Any) -> Any:
    """Drops all adapters in place (no merge): layers become their original classes again.

    With PiSSA / OLoRA the kernels stay the residual ``W - gamma*A@B`` (the base of the core's
    `rslora_jax.split`); use `merge` to fold the adapters back in.

    Returns:
      `model`.
    """
    for _, module in _lora_layers(model):
        _strip(module)
    return model


def to_params(model_or_state: Any) -> dict[Any, Any]:
    """The `nnx.Param` values (adapters included) as a pure nested dict in the core layout.

    Each adapted ``kernel`` has its adapter leaves beside it, a method's shared entry (RaSA's
    ``lora_shared`` pools) is a top-level entry (NNX keeps it under the first adapted layer),
    list items keep integer keys: the layout `rslora_jax.init` makes. Use it for
    `rslora_jax.split` / `merge`, checkpoints and PEFT export; `update_from_dict` takes it back.

    Args:
      model_or_state: an NNX module (its `nnx.Param` variables are taken) or an `nnx.State`
        (taken whole).

    Returns:
      A nested dict of arrays.

    Example:
      >>> from flax import nnx
      >>> sorted(to_params(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
      ['bias', 'kernel']
    """
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return _lift_shared(nnx.to_pure_dict(state))


def update_from_dict(node: Any, values: Mapping[Any, Any]) -> Any:
    """Writes a pure dict of values into an NNX object's variables, in place.

    The inverse of `to_params` and of ``nnx.to_pure_dict(nnx.state(node, ...))``: use it to
    put restored adapters into a model (``update_from_dict(model, params)``, a top-level
    ``lora_shared`` entry included) or a restored optimizer state into an ``nnx.Optimizer``.
    Keys may be strings where the object has integer list indices (as after a checkpoint round
    trip); `values` may cover only part of the object.

    Args:
      node: an NNX module or optimizer.
      values: nested dict of arrays, a subset of the node's state.

    Returns:
      `node`.

    Raises:
      ValueError: naming a path of `values` that `node` does not have.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> _ = update_from_dict(layer, {"bias": jnp.ones(3)})
      >>> layer.bias[...].tolist()
      [1.0, 1.0, 1.0]
    """
    values = dict(values)
    writes: list[tuple[nnx.Variable, Any]] = []
    nodes = None
    for key in [k for k in values if shared_key_owner(k) is not None]:
        if not isinstance(values[key], Mapping):
            continue
        nodes = _shared_nodes(node) if nodes is None else nodes
        if key not in nodes:
            raise ValueError(
                f"update_from_dict: values hold a top-level {key!r} entry (the shared adapter "
                f"state of {shared_key_owner(key).title}), but the node has no adapter layers "
                "that use it; add the adapters first (add_adapters with that method)"
            )
        _pair_shared(nodes[key], values.pop(key), (key,), writes)
    state = nnx.state(node)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(node, state)
    for var, value in writes:
        var.set_value(value)
    return node


def merged_model(graphdef: Any, params: PyTree, config: LoraConfig, *states: Any) -> Any:
    """The merged-mode forward's module: `nnx.merge` of ``rslora_jax.merge(params, config)``.

    For the core recipe on NNX state: ``graphdef, state = nnx.split(model, nnx.Param, ...)``,
    ``params = rslora_jax.init(nnx.to_pure_dict(state), config, key)``, train the adapters of
    `params` with `rslora_jax.optimizer`, and build the module for each forward pass here (the
    merge is float32 and differentiable; jit the whole step).

    Args:
      graphdef: from `nnx.split`.
      params: the pure dict with adapters (the state that goes with `graphdef`, first after it).
      config: the adapter config.
      *states: the other states `nnx.split` returned (e.g. RNG state), unchanged.

    Returns:
      A new NNX module with merged kernels.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import rslora_jax as rl
      >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
      >>> cfg = rl.LoraConfig(rank=2)
      >>> params = rl.init(nnx.to_pure_dict(state), cfg, jax.random.key(1))
      >>> merged_model(graphdef, params, cfg)(jnp.ones((1, 4))).shape
      (1, 3)
    """
    return nnx.merge(graphdef, merge_params(params, config), *states)


def num_adapter_params(model: Any) -> int:
    """Number of adapter elements (`nnx.LoRAParam`, shared ones once) in an NNX model."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, LoRAParam))))


__all__ = [
    "LoRAParam",
    "LoraEinsum",
    "LoraEinsumLayer",
    "LoraLinear",
    "LoraLinearGeneral",
    "add_adapters",
    "kernel_axes",
    "merge",
    "merged_model",
    "num_adapter_params",
    "remove_adapters",
    "to_params",
    "update_from_dict",
]
