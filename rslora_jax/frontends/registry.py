"""Layer types whose weight is not a ``kernel``: a small declared registry with built-in entries.

Google's ``gemma`` library (linen) and google-tunix's NNX models (Llama 3, Qwen 2/3, Gemma 1-4)
compute their projections with their own ``Einsum`` modules: ``y = jnp.einsum(eq, x, w)`` with a
weight that is called ``w`` (tunix; gemma's attention) or named by the module (gemma's
feed-forward: ``gating_einsum``, ``linear``). An `EinsumLayer` entry says, for one such class,
where the weight, the equation and the activation are; the frontends then describe each call as
a `rslora_jax.execution.dispatch.Contraction` and the adapted weight's input, output and
member axes are read off the call's equation (`infer_kernel_axes`, `rslora_jax.nnx.kernel_axes`):
the weights are found by how the model uses them.

Why a registry of layer types, and not interception of ``jnp.einsum`` / ``lax.dot_general`` (as
qwix does):

- **pure**: patching ``jax.numpy`` while a model runs is global state, seen by every thread and
  every other library running then; the linen frontend already intercepts module calls through
  flax's own, context-local ``nn.intercept_methods``, and NNX layers swap their class;
- **fast**: at the module level the whole projection is known (weight, equation, compute dtype),
  so the dispatch can fuse it (one matmul with ``W + s*A@B``) or run the factored product next to
  the layer's own call, in every mode, inside ``nn.scan`` / ``nnx.scan`` and ``remat``;
- **exact**: an operation-level hook recognises a weight by the identity of the array entering
  the einsum, which fails as soon as the layer casts it first (tunix's Qwen 2/3 and Gemma 4
  einsums do ``jnp.astype(w, dtype)``), and cannot tell a projection from an attention einsum of
  two activations without more bookkeeping;
- **general enough**: a model library with its own layer class is one `register_einsum_layer`
  call away (Flax's ``Dense`` / ``DenseGeneral`` / ``Einsum`` and NNX's ``Linear`` /
  ``LinearGeneral`` / ``Einsum`` need none), and the merged forward still works for anything.

Stacked projections (one weight holding several HF projections: gemma's ``kv_einsum``
``(2, K, D, H)`` holds k and v, ``qkv_einsum`` q, k and v, ``gating_einsum`` gate and up) get one
adapter per member by default: `stacked_members` names them, and the member axis becomes a layer
axis ``l`` of the kernel axes (``kv_einsum``: ``"loio"``), so merge, PEFT export (``k_proj`` /
``v_proj``) and the fused path (where the contraction allows) work per member. A config that
gives that axis as an output axis (``"ooio"``) gets one adapter for the whole weight instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from rslora_jax.execution.lowrank import einsum_roles


@dataclasses.dataclass(frozen=True)
class EinsumLayer:
    """How one layer class computes ``y = einsum(equation, x, weight)``.

    Attributes:
      weight: the weight's name (linen: the param name; NNX: the attribute holding the
        ``nnx.Param``), or a function of the module returning it (gemma: ``weight_name``).
      equation: the equation: ``("arg", i)`` (the i-th positional argument of ``__call__``, or
        the keyword `equation_kw`), or ``("attr", name)`` (an attribute of the module).
      input_arg: the position of the activation among ``__call__``'s positional arguments.
      input_kw: its keyword name.
      equation_kw: the equation's keyword name, for ``("arg", i)``.
      dtype: the compute dtype of a call (e.g. the module's ``dtype`` when it casts both operands
        to it), or None for jnp's result type of the two operands.
      exact: whether a call is exactly ``einsum(equation, x, weight)`` in that dtype (then the
        fused path may replace the weight by ``W + s*A@B``); otherwise only the factored
        product is added to the layer's own output.
    """

    weight: str | Callable[[Any], str]
    equation: tuple[str, Any]
    input_arg: int = 0
    input_kw: str = "x"
    equation_kw: str = "eqn"
    dtype: Callable[[Any], Any] = lambda module: None
    exact: Callable[[Any], bool] = lambda module: True

    def weight_name(self, module: Any) -> str:
        return self.weight(module) if callable(self.weight) else self.weight

    def read(self, module: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(x, equation string)`` of one call (``x`` None if the call has no input)."""
        if len(args) > self.input_arg:
            x = args[self.input_arg]
        else:
            x = kwargs.get(self.input_kw)
        kind, where = self.equation
        if kind == "attr":
            eq = getattr(module, where, None)
        elif len(args) > where:
            eq = args[where]
        else:
            eq = kwargs.get(self.equation_kw)
        return x, eq

    def with_input(self, args: tuple, kwargs: dict, x: Any) -> tuple[tuple, dict]:
        """The call's arguments with the activation replaced by `x`."""
        if len(args) > self.input_arg:
            args = (*args[: self.input_arg], x, *args[self.input_arg + 1 :])
            return args, kwargs
        return args, {**kwargs, self.input_kw: x}


def _module_dtype(module: Any) -> Any:
    return getattr(module, "dtype", None)


def _no_scale(module: Any) -> bool:
    return getattr(module, "w_scale", None) is None


# Built-in entries, by the class's "module.QualName" (the libraries are not imported here).
_GEMMA_EINSUM = EinsumLayer(
    weight=lambda module: module.weight_name,
    equation=("arg", 0),
    input_arg=1,
)
_TUNIX_EINSUM = EinsumLayer(weight="w", equation=("attr", "einsum_str"))
_TUNIX_CAST_EINSUM = EinsumLayer(
    weight="w", equation=("attr", "einsum_str"), dtype=_module_dtype, exact=_no_scale
)
_LINEN: dict[str, EinsumLayer] = {"gemma.gm.nn._layers.Einsum": _GEMMA_EINSUM}
_NNX: dict[str, EinsumLayer] = {
    "tunix.models.gemma.model.Einsum": _TUNIX_EINSUM,
    "tunix.models.gemma3.model.Einsum": _TUNIX_EINSUM,
    "tunix.models.llama3.model.Einsum": _TUNIX_EINSUM,
    "tunix.models.gemma4.model.Einsum": _TUNIX_CAST_EINSUM,
    "tunix.models.qwen2.model.Einsum": _TUNIX_CAST_EINSUM,
    "tunix.models.qwen3.model.Einsum": _TUNIX_CAST_EINSUM,
}
_ENTRIES = {"linen": _LINEN, "nnx": _NNX}

# Stacked projections: weight name -> (member axis of the kernel, member names).
_STACKED: dict[str, tuple[int, tuple[str, ...]]] = {
    "kv_einsum": (0, ("k", "v")),
    "qkv_einsum": (0, ("q", "k", "v")),
    "gating_einsum": (0, ("gate", "up")),
}


def _key(cls: type | str) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def register_einsum_layer(cls: type | str, layer: EinsumLayer, *, frontend: str) -> None:
    """Declares a layer class that computes ``einsum(equation, x, weight)`` with a weight of its
    own name, so `rslora_jax.lora` (``frontend="linen"``) or `rslora_jax.nnx.add_adapters`
    (``frontend="nnx"``) adapts it.

    Args:
      cls: the class, or its ``"module.QualName"``.
      layer: how it computes (see `EinsumLayer`).
      frontend: ``"linen"`` or ``"nnx"``.

    Raises:
      ValueError: for another frontend.

    Example:
      >>> register_einsum_layer("mylib.layers.Proj",
      ...                       EinsumLayer(weight="w", equation=("attr", "eq")), frontend="nnx")
      >>> einsum_layer("mylib.layers.Proj", "nnx").weight
      'w'
    """
    if frontend not in _ENTRIES:
        raise ValueError(f"frontend must be one of {sorted(_ENTRIES)}, got {frontend!r}")
    _ENTRIES[frontend][_key(cls)] = layer


def einsum_layer(cls: type | str, frontend: str) -> EinsumLayer | None:
    """The entry of a class (or of its nearest registered base class), or None."""
    table = _ENTRIES[frontend]
    if isinstance(cls, str):
        return table.get(cls)
    for base in cls.__mro__:
        entry = table.get(_key(base))
        if entry is not None:
            return entry
    return None


def register_stacked(name: str, members: tuple[str, ...], axis: int = 0) -> None:
    """Declares a stacked projection: a weight called `name` whose kernel axis `axis` (an
    output axis that is not in the input) stacks the projections `members`; each gets its
    own adapter by default.

    Example:
      >>> register_stacked("wkv", ("k", "v"))
      >>> stacked_members("layer_0/attn/wkv")
      (0, ('k', 'v'))
    """
    _STACKED[name] = (int(axis), tuple(members))


def stacked_members(path: str) -> tuple[int, tuple[str, ...]] | None:
    """``(member axis, member names)`` of the stacked projection at `path` (by its last name),
    or None.

    Example:
      >>> stacked_members("layer_0/attn/kv_einsum")
      (0, ('k', 'v'))
    """
    return _STACKED.get(path.rsplit("/", 1)[-1])


def inferred_roles(path: str, eq: tuple[str, str, str]) -> str | None:
    """The kernel axes of a call's equation (`einsum_roles`), a stacked projection's member axis
    as a layer axis ``l``; None when the kernel cannot be factored (an axis summed away, no input
    or no output axis).

    Example:
      >>> inferred_roles("attn/kv_einsum", ("BSD", "CKDH", "CBSKH"))
      'loio'
      >>> inferred_roles("attn/q_einsum", ("BTD", "NDH", "BTNH"))
      'oio'
    """
    roles = einsum_roles(*eq)
    if roles is None or "i" not in roles or "o" not in roles:
        return None
    stacked = stacked_members(path)
    if stacked is not None:
        axis = stacked[0]
        ks = eq[1]
        if axis < len(ks) and roles[axis] == "o" and roles.count("o") > 1:
            roles = roles[:axis] + "l" + roles[axis + 1 :]
    return roles


def member_letters(declared: str | None, eq: tuple[str, str, str]) -> str:
    """The kernel letters of `eq` that the declared kernel axes (the config's, for the kernel as
    this call sees it: its last ``len(ks)`` letters) call layer axes although they are output
    axes of the einsum: the members of a stacked projection.

    Example:
      >>> member_letters("loio", ("BSD", "CKDH", "CBSKH")), member_letters("ooio", ("BSD", "CKDH", "CBSKH"))
      ('C', '')
    """
    if declared is None:
        return ""
    ks = eq[1]
    local = declared[len(declared) - len(ks) :]
    roles = einsum_roles(*eq) or ""
    return "".join(c for c, d, r in zip(ks, local, roles) if d == "l" and r == "o")


__all__ = [
    "EinsumLayer",
    "einsum_layer",
    "inferred_roles",
    "member_letters",
    "register_einsum_layer",
    "register_stacked",
    "stacked_members",
]
