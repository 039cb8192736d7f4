"""`lora(apply_fn, config)`: run an unmodified linen model with its adapters.

Three ways to compute an adapted layer, with the same result (up to rounding):

- **factored**: ``y = x @ W + gamma * (x @ A) @ B``, never forming ``W + gamma * A @ B``. Done by
  intercepting linen ``Dense``, ``DenseGeneral``, ``Einsum`` and Dense-like module calls
  (`flax.linen.intercept_methods`), which also works inside ``nn.scan`` and ``nn.remat``: the
  adapter leaves sit in the same dict as the kernel and are sliced with it.
- **merged**: fold the adapters into the kernels (float32, cast once) and call the model; works
  for any model, including layers the factored path does not know.
- **fused** (`rslora_jax.fused`): per layer and per call, form ``W + gamma * A @ B`` (float32,
  cast once) and run one matmul, with the adapter gradients computed in low-rank form by a custom
  VJP (no ``d_in x d_out`` gradient). Fewer activation-sized reads and writes than the factored
  path once a call holds more tokens than the layer has features (training batches); more work
  for a handful of tokens. ``nn.Dense`` layers, ``nn.DenseGeneral`` layers that contract the
  input's trailing axes (LoRA, RaSA and DoRA adapters on both) and the projections of the
  built-in models (`rslora_jax.models`); everything else as in ``"auto"``. Reverse mode only
  (a custom VJP): forward-mode autodiff through the model (``jax.jvp``, ``jax.jacfwd``) needs
  ``mode="factored"``.

``mode="auto"`` (the default) picks between the factored and the fused path per layer and per
call by a cost rule (`rslora_jax.fused.prefers_fused`: fused once the call's tokens reach
``d_in * d_out / (d_in + d_out)``, as in training; factored for a few tokens, as in decoding)
and merges the layers neither can compute. Which layers can be factored is found once per input
structure by an abstract trace (`jax.eval_shape`), so it costs no FLOPs.

Variants. RaSA layers (`rslora_jax.rasa`) are computed as one LoRA pair
``[A_i | A_S], diag(d_i) [B_i ; B_S]`` with scale 1: the wrapper takes the top-level
``lora_shared`` pools out of the params before calling the model and hands them to the
interceptor (by closure), so they also reach layers inside ``nn.scan``. DoRA layers
(`rslora_jax.variants`) add ``(m/n - 1) * (x @ W) + (m/n) * gamma * (x @ A) @ B`` with the
column norm ``n = ||W + gamma*A@B||`` detached; DoRA is factored for Dense, Dense-like and
DenseGeneral layers (Einsum layers with DoRA are merged in ``mode="auto"``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rslora_jax import fused as fused_mm
from rslora_jax import native, rasa
from rslora_jax.adapters import adapter_paths, join_path
from rslora_jax.config import LoraConfig
from rslora_jax.lowrank import einsum_lowrank, einsum_roles, lowrank
from rslora_jax.merge import merge, merged_kernels
from rslora_jax.variants import MAGNITUDE, column_norm

Mode = Literal["auto", "factored", "fused", "merged"]
MODES = ("auto", "factored", "fused", "merged")
DROPOUT_RNG = "lora_dropout"

# Module classes (or class names, so that optional dependencies need not be imported) whose
# ``__call__(inputs)`` computes ``inputs[..., d_in] @ kernel_as_(d_in, d_out) (+ bias)``.
_DENSE_LIKE: set[type | str] = {"FlaxConv1D"}


def register_dense_like(cls: type | str) -> None:
    """Declares a linen module class Dense-like, so the factored forward handles it.

    A Dense-like module's ``__call__`` takes the input as its first argument and computes
    ``y = inputs @ K (+ bias)`` over the last input axis, where K is its ``kernel`` param seen
    as a (d_in, d_out) matrix (stored either way round: see ``LoraConfig.fan_in_fan_out``).
    transformers' GPT-2 ``FlaxConv1D`` is registered by default.

    Args:
      cls: the module class, or its class name.

    Example:
      >>> import flax.linen as nn
      >>> class MyDense(nn.Dense):
      ...     pass
      >>> register_dense_like(MyDense)
    """
    _DENSE_LIKE.add(cls)


def _is_dense_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Dense):
        return True
    kinds = type(module).__mro__
    return any(c in _DENSE_LIKE or c.__name__ in _DENSE_LIKE for c in kinds)


# ---------------------------------------------------------------------------- deltas
def _check_local(path: str, a: Any, b: Any, d_in: int, d_out: int, what: str) -> None:
    if a.shape[-2] != d_in or b.shape[-1] != d_out or a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"adapter at {path!r} ({what}) expects lora_a (..., {d_in}, r) and lora_b "
            f"(..., r, {d_out}); got {tuple(a.shape)} and {tuple(b.shape)}. Check "
            "LoraConfig.kernel_axes / fan_in_fan_out for this path"
        )


def _dense_delta(module, path, x, kernel, a, b, scale, dtype, call_args):
    del kernel, call_args
    if a.ndim != 2:
        raise ValueError(f"adapter at {path!r}: a Dense layer needs 2-D lora_a, got {a.shape}")
    _check_local(path, a, b, x.shape[-1], b.shape[-1], "Dense")
    return lowrank(x, a, b, scale, dtype)


def _tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _dg_axes(module: nn.DenseGeneral, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A DenseGeneral's contracted input axes (normalised and sorted, as flax contracts them)
    and its output features, for an input of rank `ndim`."""
    return tuple(sorted(ax % ndim for ax in _tuple(module.axis))), _tuple(module.features)


def _dense_general_delta(module, path, x, kernel, a, b, scale, dtype, call_args):
    del call_args
    axis, features = _dg_axes(module, x.ndim)
    d_in = math.prod(x.shape[ax] for ax in axis)
    d_out = math.prod(features)
    if a.ndim != 2:
        raise ValueError(f"adapter at {path!r}: DenseGeneral needs 2-D lora_a, got {a.shape}")
    _check_local(path, a, b, d_in, d_out, f"DenseGeneral axis={axis}")
    del kernel
    rest = tuple(i for i in range(x.ndim) if i not in axis)
    xt = jnp.transpose(x, rest + axis).reshape(*(x.shape[i] for i in rest), d_in)
    out = lowrank(xt, a, b, scale, dtype)
    return out.reshape(*out.shape[:-1], *features)


def _einsum_roles(module, x, kernel, call_args):
    import opt_einsum

    eq = call_args.get("einsum_str") or module.einsum_str
    eq = eq.replace(" ", "")
    operands, result, _ = opt_einsum.parser.parse_einsum_input((eq, x, kernel))
    xs, ks = operands.split(",")
    roles = einsum_roles(xs, ks, result)
    return None if roles is None else (xs, ks, result, roles)


def _einsum_delta(module, path, x, kernel, a, b, scale, dtype, call_args):
    parsed = _einsum_roles(module, x, kernel, call_args)
    if parsed is None:
        raise ValueError(f"Einsum at {path!r}: a kernel axis is summed away; cannot factor it")
    xs, ks, result, roles = parsed
    sizes = dict(zip(ks, kernel.shape))
    l_shape = tuple(sizes[c] for c, r in zip(ks, roles) if r == "l")
    d_in = math.prod(sizes[c] for c, r in zip(ks, roles) if r == "i")
    d_out = math.prod(sizes[c] for c, r in zip(ks, roles) if r == "o")
    _check_local(path, a, b, d_in, d_out, f"Einsum kernel axes {roles!r}")
    if tuple(a.shape[:-2]) != l_shape:
        raise ValueError(
            f"Einsum at {path!r} has kernel axes {roles!r} (layer axes {l_shape}) but lora_a "
            f"has shape {tuple(a.shape)}; set LoraConfig.kernel_axes for this path to {roles!r}"
        )
    return einsum_lowrank((xs, ks, result), x, a, b, scale, dtype, tuple(kernel.shape))


def _handler(module: nn.Module) -> Callable | None:
    if isinstance(module, nn.DenseGeneral):
        return _dense_general_delta if not module.batch_dims else None
    if isinstance(module, nn.Einsum):
        return _einsum_delta
    if _is_dense_like(module):
        return _dense_delta
    return None


def _call_args(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, dict]:
    if args:
        x, rest = args[0], args[1:]
    else:
        x, rest = kwargs.get("inputs"), ()
    extra = dict(kwargs)
    extra.pop("inputs", None)
    if isinstance(module, nn.Einsum) and rest:
        extra["einsum_str"] = rest[0]
    return x, extra


def _adapted(module: nn.Module) -> bool:
    return (
        module.has_variable("params", "lora_a")
        and module.has_variable("params", "lora_b")
        and module.has_variable("params", "kernel")
    )


def _dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    if rate <= 0.0 or not module.has_rng(DROPOUT_RNG):
        return x
    keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def _local_matrix(module: nn.Module, kernel: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """The (local) kernel of a Dense-like or DenseGeneral module as (d_in, d_out), and the
    shape of the module's output features."""
    if isinstance(module, nn.DenseGeneral):
        out_shape = _tuple(module.features)
        d_out = math.prod(out_shape)
        return kernel.reshape(-1, d_out), out_shape
    if type(module).__name__ == "FlaxConv1D":  # stored (out, in)
        return kernel.T, (kernel.shape[0],)
    return kernel, (kernel.shape[-1],)


def _with_input(module: nn.Module, args: tuple, kwargs: dict, x: jax.Array):
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "inputs": x}


def _interceptor(
    config: LoraConfig,
    handled: set[str],
    skip: frozenset[str],
    compute: bool,
    shared: Any = None,
    fused: bool | None = False,
):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        handler = _handler(module)
        if handler is None or not _adapted(module):
            return next_fun(*args, **kwargs)
        dora = module.has_variable("params", MAGNITUDE)
        if dora and handler is _einsum_delta:
            return next_fun(*args, **kwargs)  # not factored: merged by mode="auto"
        path = join_path(module.path)
        if path in skip:
            return next_fun(*args, **kwargs)
        ctx = native.active()
        if ctx is not None and path in ctx.claimed:  # the model computes this adapter itself
            handled.add(path)
            return next_fun(*args, **kwargs)
        handled.add(path)
        if compute and fused is not False and _fusable(module, config):
            view = _fused_view(module, _call_args(module, args, kwargs)[0])
            if view is not None:
                x2, k2, features = view
                tokens = math.prod(x2.shape[:-1])
                if fused or fused_mm.prefers_fused(tokens, k2.shape[0], k2.shape[1]):
                    return _fused_dense(module, path, config, x2, k2, features, shared)
        y = next_fun(*args, **kwargs)
        if not compute:
            return y
        x, call_args = _call_args(module, args, kwargs)
        a = module.get_variable("params", "lora_a")
        b = module.get_variable("params", "lora_b")
        kernel = module.get_variable("params", "kernel")
        x_in = x
        x = _dropout(module, x, config.dropout)
        scale = config.scale_for(path)
        if module.has_variable("params", rasa.DIAG):
            holder = {"lora_a": a, "lora_b": b, rasa.DIAG: module.get_variable("params", rasa.DIAG)}
            a, b = rasa.factors(holder, path, config, shared)
            scale = 1.0
        out = handler(module, path, x, kernel, a, b, scale, y.dtype, call_args)
        if not dora:
            return y + out.astype(y.dtype)
        # DoRA, as PEFT's DoraLinearLayer.forward: y + (m/n - 1) * (x @ W) + (m/n) * lora(x),
        # with the column norm n = ||W + gamma*A@B|| detached.
        w, out_shape = _local_matrix(module, kernel)
        n = jax.lax.stop_gradient(column_norm(w, a, b, scale))
        m = module.get_variable("params", MAGNITUDE).astype(jnp.float32)
        factor = (m / n).reshape(out_shape).astype(y.dtype)
        bias = (
            module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
        )
        if x is x_in:
            base = y
        else:  # dropout is active: PEFT recomputes the base output on the dropped-out input
            d_args, d_kwargs = _with_input(module, args, kwargs, x)
            own = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
            base = module.clone(parent=None).apply({"params": own}, *d_args, **d_kwargs)
        if bias is not None:
            base = base - bias.astype(base.dtype)
        one = jnp.ones((), y.dtype)
        return y + (factor - one) * base + factor * out.astype(y.dtype)

    return intercept


def _fusable(module: nn.Module, config: LoraConfig) -> bool:
    """Whether `mode="fused"` may compute this adapted layer with `fused.merged_matmul`: an
    ``nn.Dense`` or ``nn.DenseGeneral`` (their own ``__call__``, default dot_general) with a
    LoRA, RaSA or DoRA adapter and adapter dropout inactive. `_fused_view` checks the shapes."""
    if type(module).__call__ not in (nn.Dense.__call__, nn.DenseGeneral.__call__):
        return False
    if getattr(module, "dot_general", None) is not None:
        return False
    if getattr(module, "dot_general_cls", None) is not None:
        return False
    return not (config.dropout > 0 and module.has_rng(DROPOUT_RNG))


def _fused_view(module: nn.Module, x: Any) -> tuple[Any, Any, tuple[int, ...]] | None:
    """``(x2, kernel2, features)``: the layer as ``x2 (..., d_in) @ kernel2 (d_in, d_out)``
    reshaped to ``(..., *features)``, or None where that needs a transpose (a DenseGeneral
    contracting other than x's trailing axes, or with batch dims)."""
    kernel = module.get_variable("params", "kernel")
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            return None
        axis, features = _dg_axes(module, x.ndim)
        lead = x.ndim - len(axis)
        if axis != tuple(range(lead, x.ndim)) or kernel.ndim != len(axis) + len(features):
            return None
        d_in = math.prod(x.shape[lead:])
        return x.reshape(*x.shape[:lead], d_in), kernel.reshape(d_in, -1), features
    if kernel.ndim != 2:
        return None
    return x, kernel, (kernel.shape[1],)


def _fused_dense(module, path, config, x, kernel, features, shared):
    """The Dense / DenseGeneral call with the kernel ``W + gamma * A @ B`` (`rslora_jax.fused`),
    on the 2-D view of `_fused_view`.

    RaSA layers use their combined pair ``[A_i | A_S], diag(d_i) [B_i ; B_S]`` (scale 1);
    DoRA layers scale the output columns by ``m / ||W + gamma*A@B||`` (norm detached), which
    equals PEFT's ``y + (m/n - 1) * (x @ W) + (m/n) * lora(x)``.
    """
    a = module.get_variable("params", "lora_a")
    b = module.get_variable("params", "lora_b")
    _check_local(path, a, b, kernel.shape[0], kernel.shape[1], type(module).__name__)
    scale = config.scale_for(path)
    if module.has_variable("params", rasa.DIAG):
        holder = {"lora_a": a, "lora_b": b, rasa.DIAG: module.get_variable("params", rasa.DIAG)}
        a, b = rasa.factors(holder, path, config, shared)
        scale = 1.0
    bias = module.get_variable("params", "bias") if module.use_bias else None
    dtype = module.dtype
    if dtype is None:  # flax promotes the input and the params to their common dtype
        dtype = jnp.result_type(x, kernel, *(() if bias is None else (bias,)))
    (y,) = fused_mm.merged_matmul(x, [kernel], [(a, b)], [scale], dtype, module.precision)
    if module.has_variable("params", MAGNITUDE):
        n = jax.lax.stop_gradient(column_norm(kernel, a, b, scale))
        m = module.get_variable("params", MAGNITUDE).astype(jnp.float32).reshape(-1)
        y = y * (m / n).astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype).reshape(-1)
    return y.reshape(*y.shape[:-1], *features)


# ---------------------------------------------------------------------------- planning
def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or hasattr(x, "aval")


def _signature(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    sig = []
    for leaf in leaves:
        if _is_array(leaf):
            sig.append(("array", tuple(leaf.shape), str(leaf.dtype)))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            sig.append(("static", type(leaf), leaf))
    return treedef, tuple(sig)


def _factorable(apply_fn, config, variables, args, kwargs) -> frozenset[str]:
    """The adapted module paths that the factored path handles, from an abstract trace."""
    leaves, treedef = jax.tree.flatten((variables, args, kwargs))
    dyn_idx = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def run(*dyn):
        full = list(leaves)
        for i, val in zip(dyn_idx, dyn):
            full[i] = val
        v, a, kw = jax.tree.unflatten(treedef, full)
        with (
            native.activate(config, frozenset(), config.dropout == 0.0) as ctx,
            nn.intercept_methods(_interceptor(config, handled, frozenset(), compute=False)),
        ):
            out = apply_fn(v, *a, **kw)
            handled.update(ctx.claimed)
            return out

    handled: set[str] = set()
    dyn_vals = [
        jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) if _is_array(leaves[i]) else None
        for i in dyn_idx
    ]
    jax.eval_shape(run, *dyn_vals)
    return frozenset(handled)


def lora(
    apply_fn: Callable[..., Any], config: LoraConfig, mode: Mode = "auto"
) -> Callable[..., Any]:
    """Wraps a linen ``apply`` so that the forward pass includes the adapters.

    The wrapped function has the same signature as `apply_fn` (``variables, *args,
    **kwargs``); ``variables["params"]`` is a tree with adapters (from `init`, or
    `combine`). Adapter dropout (``config.dropout``) is active in the factored path when the
    call passes an ``rngs={"lora_dropout": key}`` stream.

    Args:
      apply_fn: a linen ``Module.apply`` (or any function with that signature that runs
        linen modules).
      config: the adapter config.
      mode: ``"factored"``, ``"fused"``, ``"merged"`` or ``"auto"`` (see the module
        docstring). ``"factored"`` raises if an adapted kernel belongs to a layer it cannot
        factor; ``"fused"`` and ``"auto"`` merge such layers.

    Returns:
      The wrapped apply function.

    Raises:
      ValueError: for an unknown mode.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from rslora_jax import LoraConfig, init
      >>> model = nn.Dense(3)
      >>> x = jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> cfg = LoraConfig(rank=2)
      >>> adapted = init(params, cfg, jax.random.key(1))
      >>> apply = lora(model.apply, cfg)
      >>> bool(jnp.allclose(apply({"params": adapted}, x), model.apply({"params": params}, x)))
      True

    RaSA, DoRA and PiSSA/OLoRA adapters need nothing else: the config says which they are.
    """
    if mode not in MODES:
        raise ValueError(f"lora(mode=...) must be one of {MODES}, got {mode!r}")
    plans: dict[Any, frozenset[str]] = {}

    @functools.wraps(apply_fn)
    def wrapped(variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError(
                "the wrapped apply expects a variables dict with a 'params' collection, "
                f"got {type(variables).__name__} with keys "
                f"{sorted(variables) if isinstance(variables, Mapping) else 'n/a'}"
            )
        params = variables["params"]
        if mode == "merged":
            if config.dropout > 0 and DROPOUT_RNG in (kwargs.get("rngs") or {}):
                raise ValueError(
                    "adapter dropout needs the factored forward; use mode='factored' or 'auto'"
                )
            return apply_fn({**variables, "params": merge(params, config)}, *args, **kwargs)
        shared = params.get(rasa.SHARED) if isinstance(params, Mapping) else None
        if shared is not None:
            # The pools are handed to the interceptor; the model never sees them.
            params = {k: v for k, v in params.items() if k != rasa.SHARED}
            variables = {**variables, "params": params}
        wanted = set(adapter_paths(params))
        skip: frozenset[str] = frozenset()
        if mode in ("auto", "fused"):
            key = _signature((variables, args, kwargs))
            plan = plans.get(key) if key is not None else None
            if plan is None:
                plan = _factorable(apply_fn, config, variables, args, kwargs)
                if key is not None:
                    plans[key] = plan
            unhandled = wanted - plan
            if unhandled:
                with_pools = params if shared is None else {**params, rasa.SHARED: shared}
                params = merged_kernels(with_pools, config, unhandled)
                params = {k: v for k, v in params.items() if k != rasa.SHARED}
                variables = {**variables, "params": params}
                skip = frozenset(unhandled)
        handled: set[str] = set()
        fused = {"fused": True, "auto": None}.get(mode, False)
        with (
            native.activate(config, skip, config.dropout == 0.0, fused=fused) as ctx,
            nn.intercept_methods(_interceptor(config, handled, skip, True, shared, fused=fused)),
        ):
            out = apply_fn(variables, *args, **kwargs)
        handled.update(ctx.claimed)
        missing = wanted - handled - skip
        if mode == "factored" and missing:
            raise ValueError(
                "mode='factored' cannot compute the adapters at "
                f"{sorted(missing)}: their modules are not Dense, DenseGeneral, Einsum or a "
                "registered Dense-like module (rslora_jax.register_dense_like), are Einsum "
                "layers with DoRA, or were never called. Use mode='auto' (merges those) or "
                "mode='merged'"
            )
        return out

    return wrapped


def infer_kernel_axes(apply_fn: Callable[..., Any], variables: Any, *args: Any, **kwargs: Any):
    """Reads the axis roles of every Dense/DenseGeneral/Einsum kernel off a linen model.

    Runs `apply_fn` abstractly (`jax.eval_shape`, no FLOPs) and records, for each module, which
    of its kernel's axes are layer (``l``: stacked by ``nn.scan``, or einsum batch axes),
    input (``i``) and output (``o``) axes. Pass the result as ``LoraConfig(kernel_axes=...)``.

    Args:
      apply_fn: a linen ``apply``.
      variables: its variables (``{"params": ...}``), arrays or `jax.ShapeDtypeStruct`.
      *args: sample inputs (shapes matter, values do not).
      **kwargs: passed to `apply_fn`.

    Returns:
      ``{path: roles}`` with exact paths (usable as regexes: paths only hold names, digits
      and '/').

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.DenseGeneral(features=(2, 3), axis=-1)
      >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> infer_kernel_axes(model.apply, v, jnp.ones((1, 4)))
      {'': 'ioo'}
    """
    found: dict[str, str] = {}
    full_shapes: dict[str, tuple[int, ...]] = {}
    params = variables["params"]
    from rslora_jax.adapters import iter_holders

    for keys, holder in iter_holders(params):
        full_shapes[join_path(keys)] = tuple(holder["kernel"].shape)

    def record(next_fun, a, kw, context):
        module = context.module
        if context.method_name == "__call__" and module.has_variable("params", "kernel"):
            path = join_path(module.path)
            kernel = module.get_variable("params", "kernel")
            x, call_args = _call_args(module, a, kw)
            local = None
            if isinstance(module, nn.DenseGeneral) and x is not None:
                axis = _tuple(module.axis)
                n_b = len(module.batch_dims)
                local = "l" * n_b + "i" * len(axis) + "o" * (kernel.ndim - n_b - len(axis))
            elif isinstance(module, nn.Einsum) and x is not None:
                parsed = _einsum_roles(module, x, kernel, call_args)
                local = parsed[3] if parsed is not None else None
            elif _is_dense_like(module) and kernel.ndim == 2:
                local = "oi" if type(module).__name__ == "FlaxConv1D" else "io"
            if local is not None and path in full_shapes:
                n_stack = len(full_shapes[path]) - kernel.ndim
                found[path] = "l" * n_stack + local
        return next_fun(*a, **kw)

    def run(v):
        with nn.intercept_methods(record):
            return apply_fn(v, *args, **kwargs)

    jax.eval_shape(run, variables)
    return found


__all__ = ["infer_kernel_axes", "lora", "register_dense_like"]
