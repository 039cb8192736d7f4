"""rsLoRA for Flax NNX models: factored adapters on `nnx.Linear` / `LinearGeneral` / `Einsum`.

Two ways to use rsLoRA with an NNX model:

- **Factored** (this module's `add_adapters`): each targeted layer gains ``lora_a`` and
  ``lora_b`` as `nnx.LoRAParam` variables (a subclass of `nnx.Param`) next to its ``kernel``,
  and its class is swapped for a LoRA-aware subclass (`LoraLinear`, `LoraLinearGeneral`,
  `LoraEinsum`) whose ``__call__`` returns ``y + gamma * (x @ A) @ B`` without ever forming
  ``W + gamma * A @ B``. The model stays an ordinary NNX graph: `nnx.split` / `nnx.merge`
  round-trip it, ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains only the adapters,
  and the adapters carry ``out_sharding`` metadata derived from the kernel's (A: the input
  axes' names and ``None``; B: ``None`` and the output axes' names), so
  `nnx.get_partition_spec` shards them like the base. `merge` folds them back into a plain
  model for serving.
- **Merged**, on the pure dict of `nnx.split`'s state, with the core functions:
  ``rslora_jax.init`` / ``split`` / ``optimizer`` / ``merge`` and `merged_model` to rebuild the
  module for the forward pass. Works for any NNX layer with a ``kernel`` (Conv too).

Both give the same parameter layout as linen: ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``
is a nested dict in which each adapted ``kernel`` has ``lora_a`` (*l, d_in, r) and ``lora_b``
(*l, r, d_out) beside it, with the same values `rslora_jax.init` draws for the same key, so the
core checkpoint and PEFT export functions accept it. A path is the '/'-joined NNX path of the
layer (``model/layers/0/self_attn/q_proj``; list items are numbered), used for targets,
``rank_pattern`` / ``alpha_pattern`` and the per-path scale ``config.scale_for(path)``.

Kernel axes (which kernel axes are input, output or layer axes) are read off the module:
``nnx.Linear`` is ``"io"``; ``nnx.LinearGeneral`` is ``"l" * len(batch_axis) + "i" *
len(in_features) + "o" * len(out_features)``; an ``nnx.Einsum`` kernel axis is ``l`` if its
letter appears in the input and the output, ``i`` if only in the input, ``o`` if only in the
output. Extra leading kernel axes (layers stacked by ``nnx.vmap`` and run with ``nnx.scan``)
are layer axes. `kernel_axes` returns them, for core functions that need
``LoraConfig(kernel_axes=...)`` on kernels with more than two axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.layout import KernelLayout
from rslora_jax.core.sites import path_key, target_paths
from rslora_jax.execution.fused import merged_matmul, prefers_fused
from rslora_jax.execution.lowrank import einsum_lowrank, einsum_roles, lowrank
from rslora_jax.ops.merge import merge as merge_params
from rslora_jax.ops.sharding import factor_specs

LoRAParam = nnx.LoRAParam
"""The variable type of the adapter factors (flax's own, a subclass of `nnx.Param`)."""

_HIGHEST = jax.lax.Precision.HIGHEST
_SHARDING_METADATA = ("sharding_rules", "mesh")


# ---------------------------------------------------------------------------- low-rank math
def _parse_einsum(einsum_str: str) -> tuple[str, str, str]:
    eq = einsum_str.replace(" ", "")
    lhs, rs = eq.split("->")
    xs, ks = lhs.split(",")
    return xs, ks, rs


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


# ---------------------------------------------------------------------------- layer classes
class _LoraLayer:
    """Mixin: adds ``lora_scale * (x @ lora_a) @ lora_b`` to the wrapped layer's output.

    Instances are made by `add_adapters` (which sets ``lora_a``, ``lora_b``, ``lora_scale``,
    ``lora_roles``, ``lora_path`` and optionally ``adapter_dropout``), never constructed.
    """

    __slots__ = ()  # keeps the instance layout of the layer class, so __class__ can be swapped

    lora_scale: float
    lora_roles: str
    lora_path: str

    def _adapter_input(self, x: jax.Array) -> jax.Array:
        dropout = getattr(self, "adapter_dropout", None)
        return x if dropout is None else dropout(x)

    def _factors(self) -> tuple[jax.Array, jax.Array]:
        return self.lora_a[...], self.lora_b[...]

    def _dropout_active(self) -> bool:
        dropout = getattr(self, "adapter_dropout", None)
        return dropout is not None and dropout.rate > 0 and not dropout.deterministic

    def _view(self, inputs: jax.Array) -> tuple[tuple[int, ...], int, int, tuple[int, ...]] | None:
        """``(lead, d_in, d_out, out_shape)`` if the layer is ``x (*lead, d_in) @ W (d_in,
        d_out)`` reshaped to ``(*lead, *out_shape)`` without a transpose, else None."""
        return None

    def _fuses(self, inputs: jax.Array, out_sharding: Any = None) -> bool:
        """Whether this call uses the fused path (`rslora_jax.fused`), per ``lora_mode``."""
        mode = getattr(self, "lora_mode", "auto")
        if mode == "factored" or out_sharding is not None or self._dropout_active():
            return False
        if getattr(self, "dot_general_cls", None) is not None:
            return False
        if getattr(self, "dot_general", None) not in (None, jax.lax.dot_general):
            return False
        if getattr(self, "preferred_element_type", None) is not None:
            return False
        view = self._view(inputs)
        if view is None:
            return False
        lead, d_in, d_out, _ = view
        return mode == "fused" or prefers_fused(math.prod(lead), d_in, d_out)

    def _fused(self, inputs: jax.Array) -> jax.Array:
        """The layer's output with the kernel ``W + gamma * A @ B`` (`fused.merged_matmul`)."""
        lead, d_in, d_out, out_shape = self._view(inputs)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, _, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        a, b = self._factors()
        (y,) = merged_matmul(
            x.reshape(*lead, d_in),
            [kernel.reshape(d_in, d_out)],
            [(a, b)],
            [self.lora_scale],
            x.dtype,
            self.precision,
        )
        if bias is not None:
            y = y + bias.reshape(-1)
        return y.reshape(*lead, *out_shape)


class LoraLinear(nnx.Linear, _LoraLayer):
    """`nnx.Linear` with an rsLoRA branch (made by `add_adapters`): factored, or fused
    (`rslora_jax.fused.merged_matmul`: one matmul with ``W + gamma*A@B``, low-rank gradients)
    as the layer's ``lora_mode`` says (``"auto"``: by `rslora_jax.fused.prefers_fused`)."""

    def _view(self, inputs: jax.Array):
        return inputs.shape[:-1], self.in_features, self.out_features, (self.out_features,)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if self._fuses(inputs, out_sharding):
            return self._fused(inputs)
        y = super().__call__(inputs, out_sharding=out_sharding)
        a, b = self._factors()
        delta = lowrank(self._adapter_input(inputs), a, b, self.lora_scale, y.dtype)
        return y + delta


class LoraLinearGeneral(nnx.LinearGeneral, _LoraLayer):
    """`nnx.LinearGeneral` with an rsLoRA branch (made by `add_adapters`): factored, or fused as
    `LoraLinear` when it contracts the input's trailing axes and has no batch axes."""

    def _view(self, inputs: jax.Array):
        if self.batch_axis:
            return None
        axis = tuple(sorted(ax % inputs.ndim for ax in self.axis))
        lead = inputs.ndim - len(axis)
        if axis != tuple(range(lead, inputs.ndim)):
            return None
        out_shape = tuple(self.out_features)
        return inputs.shape[:lead], math.prod(inputs.shape[lead:]), math.prod(out_shape), out_shape

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if self._fuses(inputs, out_sharding):
            return self._fused(inputs)
        y = super().__call__(inputs, out_sharding=out_sharding)
        a, b = self._factors()
        eq = _linear_general_eq(self, inputs.ndim)
        x = self._adapter_input(inputs)
        delta = einsum_lowrank(eq, x, a, b, self.lora_scale, y.dtype, self.kernel.shape)
        return y + delta


class LoraEinsum(nnx.Einsum, _LoraLayer):
    """`nnx.Einsum` with a factored rsLoRA branch (made by `add_adapters`)."""

    def __call__(
        self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> jax.Array:
        y = super().__call__(inputs, einsum_str, out_sharding=out_sharding)
        eq = _parse_einsum(einsum_str if einsum_str is not None else self.einsum_str)
        if einsum_roles(*eq) != self.lora_roles:
            raise ValueError(
                f"Einsum at {self.lora_path!r} was adapted for kernel axes {self.lora_roles!r} "
                f"but is called with einsum_str={einsum_str!r} (axes {einsum_roles(*eq)!r})"
            )
        a, b = self._factors()
        x = self._adapter_input(inputs)
        delta = einsum_lowrank(eq, x, a, b, self.lora_scale, y.dtype, self.kernel.shape)
        return y + delta


_LORA_CLASSES: dict[type, type] = {
    nnx.Linear: LoraLinear,
    nnx.LinearGeneral: LoraLinearGeneral,
    nnx.Einsum: LoraEinsum,
}
_SUBCLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type | None:
    """The LoRA-aware class for a layer class, or None if it cannot be factored."""
    if cls in _LORA_CLASSES:
        return _LORA_CLASSES[cls]
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


# ---------------------------------------------------------------------------- discovery
def _join(path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in path)


def _kernel_modules(model: Any) -> list[tuple[tuple[Any, ...], nnx.Module]]:
    """``(path, module)`` for every module holding an `nnx.Param` ``kernel``, in graph order."""
    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "kernel", None), nnx.Variable):
            out.append((tuple(path), node))
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
    ndim = module.kernel.ndim
    if ndim < len(local):
        raise ValueError(
            f"kernel at {path!r} has shape {tuple(module.kernel.shape)}, fewer axes than its "
            f"{type(module).__name__} uses ({local!r})"
        )
    return "l" * (ndim - len(local)) + local


def kernel_axes(model: Any) -> dict[str, str]:
    """Axis roles of every factorable kernel of an NNX model, as ``{path: roles}``.

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
def _kernel_sharding_names(kernel: nnx.Variable) -> tuple[Any, Any]:
    """The kernel's ``out_sharding`` metadata as (PartitionSpec, mesh or None)."""
    names = kernel.get_metadata("out_sharding", None)
    if not names:
        return None, None
    if isinstance(names, NamedSharding):
        return names.spec, names.mesh
    return PartitionSpec(*names), None


def _adapter_metadata(kernel: nnx.Variable, roles: str) -> tuple[dict, dict]:
    """``out_sharding`` (and rules / mesh) metadata of (lora_a, lora_b), from the kernel's."""
    spec, mesh = _kernel_sharding_names(kernel)
    if spec is None:
        return {}, {}
    a_spec, b_spec = factor_specs(spec, roles)
    extra = {k: kernel.get_metadata(k) for k in _SHARDING_METADATA if k in kernel.get_metadata()}
    if mesh is not None:
        a_names, b_names = NamedSharding(mesh, a_spec), NamedSharding(mesh, b_spec)
    else:
        a_names, b_names = tuple(a_spec), tuple(b_spec)
    return {"out_sharding": a_names, **extra}, {"out_sharding": b_names, **extra}


def _place_like_kernel(value: jax.Array, kernel_value: Any, roles: str, which: int) -> jax.Array:
    """Puts a factor on the kernel's mesh with the derived spec (concrete sharded kernels)."""
    if isinstance(kernel_value, jax.core.Tracer):
        return value  # under a transform: the metadata is there for nnx.get_partition_spec
    sharding = getattr(kernel_value, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return value
    spec = factor_specs(sharding.spec, roles)[which]
    return jax.device_put(value, NamedSharding(sharding.mesh, spec))


# ---------------------------------------------------------------------------- public API
@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_factors(key: PRNGKey, plan: tuple, config: LoraConfig) -> dict[str, tuple]:
    """The factors `rslora_jax.init` draws (same per-path keys and distributions), compiled once
    per plan: ``plan`` is ``((path, a_shape, b_shape, d_in), ...)``."""
    return {
        path: (
            config.init.draw_a(path_key(key, path), a_shape, d_in, config.dtype),
            jnp.zeros(b_shape, config.dtype),
        )
        for path, a_shape, b_shape, d_in in plan
    }


def _check_variant(config: LoraConfig) -> None:
    unsupported = [
        f"{name}={getattr(config, name)!r}"
        for name in ("rasa", "use_dora")
        if getattr(config, name, False)
    ]
    if getattr(config, "base_modifying_init", False):
        unsupported.append(f"init={config.init!r}")
    if unsupported:
        raise ValueError(
            f"add_adapters: {', '.join(unsupported)} is not supported by the factored NNX "
            "forward (plain rsLoRA / LoRA only); use the merged recipe (rslora_jax.init on "
            "nnx.to_pure_dict(state), rslora_jax.nnx.merged_model), which supports every variant"
        )


def add_adapters(
    model: Any,
    config: LoraConfig,
    key: PRNGKey,
    *,
    dropout_rngs: nnx.Rngs | nnx.RngStream | None = None,
    mode: str = "auto",
) -> Any:
    """Adds factored rsLoRA adapters to an NNX model, in place.

    Every ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` whose path `config` targets gains
    ``lora_a`` (*l, d_in, r) and ``lora_b`` (*l, r, d_out, zeros) as `nnx.LoRAParam`, and
    computes ``y + config.scale_for(path) * (x @ A) @ B`` from then on. The factors equal those
    `rslora_jax.init` draws for the same key on the model's pure dict. Factors of a sharded
    kernel are placed on its mesh (A: input axes' spec, B: output axes'), and carry the
    derived ``out_sharding`` metadata when the kernel has some.

    Args:
      model: an NNX module (modified in place and returned).
      config: targets, ranks and scales; paths are '/'-joined NNX paths.
      key: a PRNG key for ``lora_a``.
      dropout_rngs: needed when ``config.dropout > 0``: each adapted layer gets an
        ``nnx.Dropout`` (attribute ``adapter_dropout``) on the adapter input, drawing from
        this ``Rngs``' ``dropout`` stream; ``model.eval()`` turns it off.
      mode: how ``nnx.Linear`` layers compute the adapter (as `rslora_jax.lora`'s modes):
        ``"factored"``, ``"fused"`` (one matmul with ``W + gamma*A@B`` formed per call, adapter
        gradients in low-rank form; `rslora_jax.fused`) or ``"auto"`` (fused once a call's tokens
        reach ``d_in*d_out/(d_in+d_out)``). Kept per layer as ``lora_mode``; active adapter
        dropout, ``Einsum`` layers and ``LinearGeneral`` layers that do not contract the
        input's trailing axes (or have batch axes) are always factored.

    Returns:
      `model`.

    Raises:
      ValueError: if nothing is targeted (listing candidate paths), if a targeted kernel
        belongs to a layer that cannot be factored (use the merged recipe for it, or exclude
        it), if a layer already has adapters, if the rank exceeds a kernel's dimensions, if
        the config's kernel axes for a path contradict the module, or if dropout is on and
        `dropout_rngs` is missing.

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
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(f"add_adapters: config must be a LoraConfig, got {type(config)}")
    _check_variant(config)
    if mode not in ("auto", "factored", "fused"):
        raise ValueError(f"add_adapters: mode must be 'auto', 'factored' or 'fused', got {mode!r}")
    if config.dropout > 0 and dropout_rngs is None:
        raise ValueError(
            f"add_adapters: LoraConfig.dropout={config.dropout} needs dropout_rngs "
            "(an nnx.Rngs with a 'dropout' or default stream)"
        )
    modules = _kernel_modules(model)
    for path, module in modules:
        p = _join(path)
        if isinstance(module, _LoraLayer):
            raise ValueError(f"{p!r} already has adapters ({type(module).__name__})")
    plan: dict[str, tuple[nnx.Module, str]] = {}  # path -> (module, full kernel axes)
    tree: dict[Any, Any] = {}  # the kernels' shapes, laid out as the pure dict
    for path, module in modules:
        p = _join(path)
        kernel = module.kernel[...]
        if not config.is_target(p, kernel):
            continue
        if _lora_class(type(module)) is None:
            raise ValueError(
                f"{p!r} is a {type(module).__name__}, which the factored NNX forward cannot "
                "compute (it handles nnx.Linear, nnx.LinearGeneral and nnx.Einsum); exclude it "
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
        plan[p] = (module, roles)
        node = tree
        for k in path:
            node = node.setdefault(k, {})
        node["kernel"] = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
    if not plan:
        candidates = ", ".join(repr(_join(p)) for p, _ in modules[:30]) or "none"
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}, exclude={config.exclude!r}) matched no "
            f"kernel of the NNX model. Candidate paths: {candidates}"
        )
    # The core's checks (ranks), with the axes read off the modules; then the core's draws.
    axes = tuple((re.escape(p), roles) for p, (_, roles) in plan.items())
    target_paths(tree, dataclasses.replace(config, kernel_axes=axes))
    draws = []
    for p, (module, roles) in plan.items():
        layout = KernelLayout(roles, module.kernel.shape)
        r = config.rank_for(p)
        draws.append((p, layout.a_shape(r), layout.b_shape(r), layout.d_in))
    factors = _draw_factors(key, tuple(draws), LoraConfig(init=config.init, dtype=config.dtype))
    for p, (module, roles) in plan.items():
        kernel_var = module.kernel
        kernel_value = kernel_var.get_raw_value()
        a_meta, b_meta = _adapter_metadata(kernel_var, roles)
        a = _place_like_kernel(factors[p][0], kernel_value, roles, 0)
        b = _place_like_kernel(factors[p][1], kernel_value, roles, 1)
        local = _local_roles(module, p)
        _set_class(module, _lora_class(type(module)))
        # Created as eager_sharding=False: the values are already placed like the kernel, and
        # creating them must not need a mesh context.
        module.lora_a = LoRAParam(a, eager_sharding=False, **a_meta)
        module.lora_b = LoRAParam(b, eager_sharding=False, **b_meta)
        module.lora_scale = float(config.scale_for(p))
        module.lora_roles = local  # as the module sees its kernel (inside nnx.scan: no stack)
        module.lora_path = p
        module.lora_mode = mode
        if config.dropout > 0:
            module.adapter_dropout = nnx.Dropout(config.dropout, rngs=dropout_rngs)
    return model


def _lora_layers(model: Any) -> list[tuple[str, Any]]:
    return [(_join(p), m) for p, m in _kernel_modules(model) if isinstance(m, _LoraLayer)]


def _strip(module: Any) -> None:
    for name in (
        "lora_a",
        "lora_b",
        "lora_scale",
        "lora_roles",
        "lora_path",
        "lora_mode",
        "adapter_dropout",
    ):
        if name in vars(module):
            delattr(module, name)
    _set_class(module, _base_class(type(module)))


def merge(model: Any) -> Any:
    """A plain copy of an adapted NNX model with every adapter folded into its kernel.

    ``W' = W + gamma * A @ B`` (float32, cast to the kernel's dtype once); the copy's layers are
    the original classes again (``nnx.Linear`` ...) without adapter variables, so its state has
    exactly the structure of the model before `add_adapters`. `model` is left unchanged
    (unchanged arrays are shared with the copy).

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
    if not _lora_layers(model):
        raise ValueError("merge: the model has no adapters (rslora_jax.nnx.add_adapters)")
    out = nnx.clone(model)
    for _, module in _lora_layers(out):
        kernel = module.kernel[...]
        layout = KernelLayout(
            "l" * (kernel.ndim - len(module.lora_roles)) + module.lora_roles, kernel.shape
        )
        a = module.lora_a[...].astype(jnp.float32)
        b = module.lora_b[...].astype(jnp.float32)
        ab = jnp.matmul(a, b, precision=_HIGHEST) * jnp.float32(module.lora_scale)
        merged = kernel.astype(jnp.float32) + layout.to_kernel(ab)
        module.kernel[...] = merged.astype(kernel.dtype)
        _strip(module)
    return out


def remove_adapters(model: Any) -> Any:
    """Drops all adapters in place (no merge): layers become their original classes again.

    Returns:
      `model`.
    """
    for _, module in _lora_layers(model):
        _strip(module)
    return model


def to_params(model_or_state: Any) -> dict[Any, Any]:
    """The `nnx.Param` values (adapters included) as a pure nested dict.

    The layout of the core library: each adapted ``kernel`` has ``lora_a`` / ``lora_b`` beside
    it, list items keep integer keys. Use it for `rslora_jax.split`, checkpoints and PEFT export.

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
    return nnx.to_pure_dict(state)


def update_from_dict(node: Any, values: Mapping[Any, Any]) -> Any:
    """Writes a pure dict of values into an NNX object's variables, in place.

    The inverse of ``nnx.to_pure_dict(nnx.state(node, ...))``: use it to put restored
    adapters into a model (``update_from_dict(model, params)``) or a restored optimizer state
    into an ``nnx.Optimizer``. Keys may be strings where the object has integer list indices
    (as after a checkpoint round trip); `values` may cover only part of the object.

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
    state = nnx.state(node)
    nnx.replace_by_pure_dict(state, dict(values))
    nnx.update(node, state)
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
    """Number of adapter elements (`nnx.LoRAParam`) in an NNX model."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, LoRAParam))))


__all__ = [
    "LoRAParam",
    "LoraEinsum",
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
