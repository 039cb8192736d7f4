"""`lora(apply_fn, config)`: run an unmodified linen model with its adapters.

Three ways to compute an adapted layer, with the same result (up to rounding), for every method
(LoRA/rsLoRA, RaSA, DoRA, PiSSA/OLoRA-initialised):

- **factored**: ``y = x @ W + gamma * (x @ A) @ B``, never forming ``W + gamma * A @ B``. Done by
  intercepting linen ``Dense``, ``DenseGeneral``, ``Einsum`` and Dense-like module calls, and
  registered einsum layers whose weight is not a ``kernel`` (Google's ``gemma`` library:
  `rslora_jax.frontends.registry`) (`flax.linen.intercept_methods`), which also works inside
  ``nn.scan`` and ``nn.remat``: the adapter leaves sit in the same dict as the kernel (or in a
  ``lora_<name>`` sub-dict next to it, see `rslora_jax.core.tree`) and are sliced with it. A
  model whose ``__call__`` is ``nn.jit``-wrapped (gemma's ``Transformer``) is re-traced under
  the interceptor on every call (``jax.disable_jit`` around it, inlined into the caller's jit):
  its own cache is keyed by shapes alone and would replay another call's trace.
- **fused** (`rslora_jax.execution.fused`): per layer and per call, form ``W + gamma * A @ B``
  (float32, cast once) and run one matmul, with the adapter gradients computed in low-rank form by
  a custom VJP (no ``d_in x d_out`` gradient). Possible for ``Dense``, ``DenseGeneral`` and
  ``Einsum`` layers whose contraction is a matmul after reshapes (the input's trailing axes
  against the kernel's leading ones, no batch axes) and for the built-in models' projections.
  Reverse mode only (a custom VJP): forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) needs
  ``mode="factored"``.
- **merged**: fold the adapters into the kernels (float32, cast once) and call the model; works
  for any model, including layers the interceptor does not know.

``mode="auto"`` (the default) picks fused or factored per layer and per call
(`rslora_jax.execution.dispatch`: fused once the call's tokens reach ``d_in * d_out / (d_in +
d_out)``, as in training; factored for a few tokens, as in decoding) and merges the layers
neither can compute. Which layers the interceptor handles is found once per input structure by
an abstract trace (`jax.eval_shape`), so it costs no FLOPs. Active adapter dropout
(``rngs={"lora_dropout": key}``) makes the layers factored; ``mode="merged"`` refuses it.

A quantized base (`rslora_jax.quantize`: int8, nf4, fp8 kernels) runs through the same
interceptor: adapted layers dequantize inside the dispatch's matmul, layers without an adapter
compute their einsum with the kernel dequantized per call (so ``lora`` must wrap the apply even
where nothing is adapted), and ``mode="merged"`` dequantizes the whole tree.

Methods come in through the protocol (`rslora_jax.frontends.site`): the method's factor pair
(RaSA: ``[A_i | A_S], diag(d_i) [B_i ; B_S]`` with scale 1; the top-level ``lora_shared`` pools
are taken out of the params before the model runs and handed to the interceptor, so they reach
layers inside ``nn.scan``) and column rescale (DoRA: ``m / ||W + gamma*A@B||``, detached norm).

The extras (`rslora_jax.core.extras`): trained copies and token rows are written over the base
leaves before the model runs (`rslora_jax.ops.extras.substitute`); the lookup of an ``nn.Embed``
whose table has LoRA gets ``gamma * A[ids] @ B`` added (as PEFT's embedding layer; its
``attend``, the tied output layer, keeps the table, as in PEFT); a bias on B is added to its
layer's output. ``mode="merged"`` folds them all in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import string
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rslora_jax.core import claim
from rslora_jax.core import extras as ex
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.sites import declared_axes
from rslora_jax.core.tree import (
    KERNEL,
    adapter_leaves,
    adapter_paths,
    global_entries,
    holder_view,
    is_adapted,
    iter_weights,
    join_path,
    weight_refs,
)
from rslora_jax.execution.dispatch import Contraction, adapted
from rslora_jax.execution.lowrank import einsum_roles
from rslora_jax.execution.quant import is_quantized
from rslora_jax.frontends.registry import einsum_layer, inferred_roles, member_letters
from rslora_jax.frontends.site import (
    DROPOUT_RNG,
    add_bias,
    linen_dropout,
    method_inputs,
    split_bias,
)
from rslora_jax.ops import extras as extras_ops
from rslora_jax.ops.merge import merge, merged_kernels

Mode = Literal["auto", "factored", "fused", "merged"]
MODES = ("auto", "factored", "fused", "merged")

# Module classes (or class names, so that optional dependencies need not be imported) whose
# ``__call__(inputs)`` computes ``inputs[..., d_in] @ kernel_as_(d_in, d_out) (+ bias)``.
_DENSE_LIKE: set[type | str] = {"FlaxConv1D"}
_LETTERS = string.ascii_letters


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
    return any(c in _DENSE_LIKE or c.__name__ in _DENSE_LIKE for c in type(module).__mro__)


def _tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


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


def _with_input(args: tuple, kwargs: dict, x: jax.Array) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "inputs": x}


def _own_call(module: nn.Module, base: type) -> bool:
    """Whether the module computes exactly its base class's product (fusable)."""
    if type(module).__call__ is not base.__call__:
        return False
    return getattr(module, "dot_general", None) is None and (
        getattr(module, "dot_general_cls", None) is None
    )


def _param(module: nn.Module, name: str) -> Any:
    return module.get_variable("params", name) if module.has_variable("params", name) else None


def _dense_general_eq(module: nn.DenseGeneral, ndim: int) -> tuple[str, str, str]:
    axis = tuple(sorted(ax % ndim for ax in _tuple(module.axis)))
    batch = tuple(sorted(ax % ndim for ax in _tuple(module.batch_dims)))
    x_l = list(_LETTERS[:ndim])
    out_l = list(_LETTERS[ndim : ndim + len(_tuple(module.features))])
    free = [x_l[i] for i in range(ndim) if i not in axis and i not in batch]
    bat = [x_l[i] for i in batch]
    ks = "".join(bat + [x_l[i] for i in axis] + out_l)
    return "".join(x_l), ks, "".join(bat + free + out_l)


def _einsum_eq(module: nn.Module, x: Any, kernel: Any, call_args: Mapping) -> tuple | None:
    return _einsum_eq_text(call_args.get("einsum_str") or module.einsum_str, x, kernel)


def _einsum_eq_text(text: str, x: Any, kernel: Any) -> tuple[str, str, str]:
    """An einsum string with explicit letters (``...`` expanded against `x` and `kernel`)."""
    import opt_einsum

    operands, result, _ = opt_einsum.parser.parse_einsum_input((text.replace(" ", ""), x, kernel))
    xs, ks = operands.split(",")
    return xs, ks, result


def _describe(
    module: nn.Module, args: tuple, kwargs: dict, config: LoraConfig
) -> tuple[Any, Contraction] | None:
    """``(x, Contraction)`` of a linen layer call, or None for a layer we cannot describe."""
    x, call_args = _call_args(module, args, kwargs)
    kernel = _param(module, "kernel")
    if x is None or kernel is None:
        return None
    bias = _param(module, "bias")
    if isinstance(module, nn.DenseGeneral):
        eq = _dense_general_eq(module, x.ndim)
        exact = _own_call(module, nn.DenseGeneral)
    elif isinstance(module, nn.Einsum):
        eq = _einsum_eq(module, x, kernel, call_args)
        if bias is not None:
            bias = bias.reshape(module._get_bias_shape(f"{eq[0]},{eq[1]}->{eq[2]}", x, kernel)[1])
        exact = type(module).__call__ is nn.Einsum.__call__
    elif _is_dense_like(module) and kernel.ndim == 2:
        prefix = _LETTERS[: x.ndim - 1]
        path = join_path(module.path)
        stored_out_in = type(module).__name__ == "FlaxConv1D" or (
            not isinstance(module, nn.Dense) and config.is_fan_in_fan_out(path)
        )
        eq = (prefix + "y", "zy" if stored_out_in else "yz", prefix + "z")
        exact = isinstance(module, nn.Dense) and _own_call(module, nn.Dense)
    else:
        return None
    dtype = getattr(module, "dtype", None) if exact else None
    return x, Contraction(
        eq=eq,
        kernel=kernel,
        bias=bias,
        dtype=dtype,
        precision=getattr(module, "precision", None),
        exact=exact,
    )


def _quantized_call(module: nn.Module, args: tuple, kwargs: dict, config: LoraConfig) -> Any:
    """A layer with a quantized kernel (`rslora_jax.quantize`) and no adapter: its einsum with
    the kernel dequantized inside the matmul (the layer's own call cannot read the codes)."""
    desc = _describe(module, args, kwargs, config)
    if desc is None:
        raise ValueError(
            f"the kernel at {join_path(module.path)!r} is quantized, but its "
            f"{type(module).__name__} layer is not one rslora_jax.lora can compute (Dense, "
            "DenseGeneral, Einsum or a registered Dense-like module): exclude it from "
            "rslora_jax.quantize"
        )
    x, lin = desc
    return lin.plain(x)


def _adapted(module: nn.Module) -> bool:
    return is_adapted(module.variables.get("params", {}))


def _embedding_adapter(module: nn.Module) -> bool:
    return isinstance(module, nn.Embed) and ex.EMBEDDING_A in module.variables.get("params", {})


def _embedding_lookup(module: nn.Module, config: LoraConfig, y: jax.Array, ids: Any) -> jax.Array:
    """``y + gamma * A[ids] @ B`` for an ``nn.Embed`` call whose table has LoRA (PEFT's
    ``lora.Embedding``: no dropout on the lookup), in the layer's output dtype."""
    params = module.variables["params"]
    path = join_path(module.path)
    a, b = params[ex.EMBEDDING_A], params[ex.EMBEDDING_B]
    table = params[ex.EMBEDDING]
    if a.shape != (table.shape[0], b.shape[0]) or b.shape[1] != table.shape[1]:
        raise ValueError(
            f"embedding adapter at {path!r}: lora_embedding_a {tuple(a.shape)} and "
            f"lora_embedding_b {tuple(b.shape)} do not fit the table {tuple(table.shape)}"
        )
    dtype = y.dtype
    rows = jnp.take(a, jnp.asarray(ids), axis=0).astype(dtype)
    delta = jnp.matmul(rows, b.astype(dtype), precision=getattr(module, "precision", None))
    return y + (delta * jnp.asarray(config.scale_for(path), dtype)).astype(dtype)


def _lifted_jit(module: nn.Module, method_name: str) -> bool:
    """Whether the module's method is wrapped by ``nn.jit`` (gemma's ``Transformer.__call__``).

    Its trace is cached by the module and the arguments' shapes alone, so a second call would
    replay the first trace, made under another interceptor (another mode, config or adapters);
    such calls run under ``jax.disable_jit()``, which re-traces the method's body each time
    (inlined into the caller's own ``jax.jit``).
    """
    from flax.core import lift

    fn = getattr(type(module), method_name, None)
    code = getattr(fn, "__code__", None)
    if code is None or "transform" not in code.co_freevars or fn.__closure__ is None:
        return False
    cell = fn.__closure__[code.co_freevars.index("transform")]
    try:
        return cell.cell_contents is lift.jit
    except ValueError:  # an empty cell
        return False


def _retrace(apply_fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    """``jax.disable_jit()`` when `apply_fn` is the ``apply`` of a module whose called method is
    wrapped by ``nn.jit`` (see `_lifted_jit`), else a no-op context."""
    module = getattr(apply_fn, "__self__", None)
    method = kwargs.get("method") or "__call__"
    if isinstance(module, nn.Module) and isinstance(method, str) and _lifted_jit(module, method):
        return jax.disable_jit()
    return contextlib.nullcontext()


def _plain_call(next_fun, args, kwargs, context):
    """A module call the interceptor does not adapt (``nn.jit`` methods re-traced, see
    `_lifted_jit`)."""
    if _lifted_jit(context.module, context.method_name):
        with jax.disable_jit():
            return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs)


class _Call:
    """One call of an adapted layer: its input, contraction, weight path and holder, and how
    to call the layer on another input."""

    def __init__(self, x, lin, path, holder, with_input):
        self.x, self.lin, self.path, self.holder, self.with_input = x, lin, path, holder, with_input


def _registered_call(
    module: nn.Module, args: tuple, kwargs: dict, config: LoraConfig | None
) -> _Call | None:
    """A call of a registered einsum layer (`rslora_jax.frontends.registry`; gemma's
    ``Einsum``) whose weight has adapters (or any, when `config` is None), else None."""
    entry = einsum_layer(type(module), "linen")
    if entry is None:
        return None
    name = entry.weight_name(module)
    params = module.variables.get("params", {})
    ref = next((r for r in weight_refs(params, tuple(module.path)) if r.name == name), None)
    if ref is None:
        return None
    holder = holder_view(params, ref)
    if config is not None and not is_adapted(holder):
        return None
    x, text = entry.read(module, args, kwargs)
    if x is None or not isinstance(text, str):
        return None
    kernel = holder[KERNEL]
    eq = _einsum_eq_text(text, x, kernel)
    if config is not None:
        roles = einsum_roles(*eq)
        if roles is None:
            return None
    lin = Contraction(
        eq=eq,
        kernel=kernel,
        dtype=entry.dtype(module),
        exact=entry.exact(module),
        members=member_letters(declared_axes(config, ref.path), eq) if config else "",
    )
    return _Call(x, lin, ref.path, holder, lambda inp: entry.with_input(args, kwargs, inp))


def _layer_call(module: nn.Module, args: tuple, kwargs: dict, config: LoraConfig) -> _Call | None:
    """The adapted layer call the interceptor computes (kernel layers and registered ones)."""
    call = _registered_call(module, args, kwargs, config)
    if call is not None or not _adapted(module):
        return call
    desc = _describe(module, args, kwargs, config)
    if desc is None:
        return None
    x, lin = desc
    path = join_path(module.path)
    members = member_letters(declared_axes(config, path), lin.eq)
    if members:
        lin = dataclasses.replace(lin, members=members)
    params = module.variables.get("params", {})
    return _Call(x, lin, path, params, lambda inp: _with_input(args, kwargs, inp))


def _interceptor(
    config: LoraConfig,
    handled: set[str],
    skip: frozenset[str],
    compute: bool,
    shared: Mapping[str, Any] | None = None,
    mode: str = "auto",
    rows: Any = None,
):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and _embedding_adapter(module):
            handled.add(join_path(module.path))
            y = next_fun(*args, **kwargs)
            if not compute or join_path(module.path) in skip:
                return y
            x, _ = _call_args(module, args, kwargs)
            return _embedding_lookup(module, config, y, x)
        if context.method_name != "__call__":
            return _plain_call(next_fun, args, kwargs, context)
        quantized = is_quantized(_param(module, "kernel"))
        call = _layer_call(module, args, kwargs, config)
        if call is None or call.path in skip:
            if quantized:
                return _quantized_call(module, args, kwargs, config)
            return _plain_call(next_fun, args, kwargs, context)
        path = call.path
        handled.add(path)
        ctx = claim.active()
        if (ctx is not None and path in ctx.claimed) or not compute:
            return call.lin.plain(call.x) if quantized else next_fun(*args, **kwargs)
        x, lin = call.x, call.lin
        leaves, bias = split_bias(adapter_leaves(call.holder))
        if bias is not None and rows is not None:
            raise ValueError(
                f"adapter_index: the adapters at {path!r} carry a lora_bias, which per-row "
                "(stacked) adapters do not support; serve them one adapter per batch"
            )
        pair, col = method_inputs(config, leaves, path, shared, lin, rows)

        def base(inp: jax.Array) -> jax.Array:
            a, kw = call.with_input(inp)
            return next_fun(*a, **kw)

        y = adapted(
            x,
            lin,
            pair,
            base=base,
            col=col,
            mode=mode,
            dropout=linen_dropout(module, config.dropout),
            rows=rows,
        )
        return add_bias(y, bias, config.scale_for(path), path)

    return intercept


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


def _factorable(
    apply_fn, config, variables, args, kwargs, shared=None, rows=None
) -> frozenset[str]:
    """The adapted module paths that the interceptor (or the model) handles, from an abstract
    trace. `shared`: the params' top-level adapter entries (RaSA's pools), which a model that
    claims its projections needs to compute them; `rows`: the per-row adapter index, if any."""
    leaves, treedef = jax.tree.flatten((variables, args, kwargs, shared or {}, rows))
    dyn_idx = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def run(*dyn):
        full = list(leaves)
        for i, val in zip(dyn_idx, dyn):
            full[i] = val
        v, a, kw, sh, rw = jax.tree.unflatten(treedef, full)
        with (
            _retrace(apply_fn, kw),
            claim.activate(config, frozenset(), "factored", sh, rw) as ctx,
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
    `combine`). Adapter dropout (``config.dropout``) is active when the call passes an
    ``rngs={"lora_dropout": key}`` stream.

    Args:
      apply_fn: a linen ``Module.apply`` (or any function with that signature that runs
        linen modules).
      config: the adapter config.
      mode: ``"factored"``, ``"fused"``, ``"merged"`` or ``"auto"`` (see the module
        docstring). ``"factored"`` raises if an adapted kernel belongs to a layer it cannot
        factor; ``"fused"`` and ``"auto"`` merge such layers.

    Returns:
      The wrapped apply function. It also takes a keyword ``adapter_index``: ``(B,)``
      integers, one adapter per row of the batch (the leading axis of the model's input), for
      params whose adapters stack ``N`` adapters on a leading axis
      (`rslora_jax.ops.stack.stack_adapters`): row ``b`` is computed with adapter
      ``adapter_index[b]`` (factored, PEFT's ``adapter_names``), as if it ran alone with that
      adapter. Indices must lie in ``[0, N)``. Only layers the factored forward computes (and
      plain matmuls: Dense layers, the built-in models' projections) can be served that way;
      ``mode="merged"`` refuses it.

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
    def wrapped(
        variables: Mapping[str, Any], *args: Any, adapter_index: Any = None, **kwargs: Any
    ) -> Any:
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError(
                "the wrapped apply expects a variables dict with a 'params' collection, "
                f"got {type(variables).__name__} with keys "
                f"{sorted(variables) if isinstance(variables, Mapping) else 'n/a'}"
            )
        params = variables["params"]
        rows = None
        if adapter_index is not None:
            if mode == "merged":
                raise ValueError(
                    "adapter_index (several adapters in one batch) needs the factored forward; "
                    "mode='merged' cannot serve it: use mode='auto' or 'factored'"
                )
            rows = jax.numpy.asarray(adapter_index)
            if rows.ndim != 1 or not jax.numpy.issubdtype(rows.dtype, jax.numpy.integer):
                raise ValueError(
                    f"adapter_index must be a 1-D integer array (one adapter per batch row); "
                    f"got shape {tuple(rows.shape)} and dtype {rows.dtype}"
                )
        if mode == "merged":
            if config.dropout > 0 and DROPOUT_RNG in (kwargs.get("rngs") or {}):
                raise ValueError(
                    "adapter dropout needs the factored forward; use mode='factored' or 'auto'"
                )
            return apply_fn({**variables, "params": merge(params, config)}, *args, **kwargs)
        # Trained copies and token rows replace the base leaves (differentiably).
        params = extras_ops.substitute(params, config)
        variables = {**variables, "params": params}
        shared = global_entries(params)
        if shared:
            # Top-level entries (RaSA's pools) go to the interceptor; the model never sees them.
            params = {k: v for k, v in params.items() if k not in shared}
            variables = {**variables, "params": params}
        embeddings = extras_ops.embedding_paths(params)
        wanted = set(adapter_paths(params)) | embeddings
        skip: frozenset[str] = frozenset()
        if mode in ("auto", "fused"):
            key = _signature((variables, args, kwargs, rows))
            plan = plans.get(key) if key is not None else None
            if plan is None:
                plan = _factorable(apply_fn, config, variables, args, kwargs, shared, rows)
                if key is not None:
                    plans[key] = plan
            unhandled = wanted - plan
            if unhandled and rows is not None:
                raise ValueError(
                    f"adapter_index: the adapters at {sorted(unhandled)} belong to layers the "
                    "factored forward cannot compute (they could only be merged, which serves "
                    "one adapter per batch)"
                )
            if unhandled:
                params = merged_kernels({**params, **shared}, config, unhandled - embeddings)
                if unhandled & embeddings:  # tables not read through nn.Embed: merged
                    params = extras_ops.fold(params, config, embeddings=unhandled & embeddings)
                params = {k: v for k, v in params.items() if k not in shared}
                variables = {**variables, "params": params}
                skip = frozenset(unhandled)
        handled: set[str] = set()
        with (
            _retrace(apply_fn, kwargs),
            claim.activate(config, skip, mode, shared, rows) as ctx,
            nn.intercept_methods(_interceptor(config, handled, skip, True, shared, mode, rows)),
        ):
            out = apply_fn(variables, *args, **kwargs)
        handled.update(ctx.claimed)
        missing = wanted - handled - skip
        if rows is not None and missing:
            raise ValueError(
                f"adapter_index: the adapters at {sorted(missing)} were not computed: their "
                "modules are not Dense, DenseGeneral, Einsum or a registered Dense-like module "
                "(rslora_jax.register_dense_like), or were never called"
            )
        if mode == "factored" and missing:
            raise ValueError(
                "mode='factored' cannot compute the adapters at "
                f"{sorted(missing)}: their modules are not Dense, DenseGeneral, Einsum, Embed or "
                "a registered Dense-like module (rslora_jax.register_dense_like), or were never "
                "called. Use mode='auto' (merges those) or mode='merged'"
            )
        return out

    return wrapped


def infer_kernel_axes(apply_fn: Callable[..., Any], variables: Any, *args: Any, **kwargs: Any):
    """Reads the axis roles of every Dense/DenseGeneral/Einsum kernel off a linen model, and of
    the weights of registered einsum layers (gemma's ``Einsum``: ``w``, ``gating_einsum``,
    ``linear``; see `rslora_jax.frontends.registry`).

    Runs `apply_fn` abstractly (`jax.eval_shape`, no FLOPs) and records, for each module, which
    of its kernel's axes are layer (``l``: stacked by ``nn.scan``, einsum batch axes, or the
    member axis of a stacked projection such as gemma's ``kv_einsum``), input (``i``) and output
    (``o``) axes. Pass the result as ``LoraConfig(kernel_axes=...)``: it also tells the core
    which weights not named ``kernel`` enter a linear contraction (only those are adapted).

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
    full_shapes = {ref.path: tuple(h[KERNEL].shape) for ref, h in iter_weights(variables["params"])}
    plain = LoraConfig()

    def record(next_fun, a, kw, context):
        module = context.module
        call = None
        if context.method_name == "__call__":
            call = _registered_call(module, a, kw, None)
        if call is not None:
            local = inferred_roles(call.path, call.lin.eq)
            if local is not None and call.path in full_shapes:
                n_stack = len(full_shapes[call.path]) - call.lin.kernel.ndim
                found[call.path] = "l" * n_stack + local
        elif context.method_name == "__call__" and module.has_variable("params", "kernel"):
            path = join_path(module.path)
            desc = _describe(module, a, kw, plain)
            local = None if desc is None else einsum_roles(*desc[1].eq)
            if local is not None and path in full_shapes:
                n_stack = len(full_shapes[path]) - desc[1].kernel.ndim
                found[path] = "l" * n_stack + local
        return _plain_call(next_fun, a, kw, context)

    def run(v):
        with _retrace(apply_fn, kwargs), nn.intercept_methods(record):
            return apply_fn(v, *args, **kwargs)

    jax.eval_shape(run, variables)
    return found


__all__ = ["infer_kernel_axes", "lora", "register_dense_like"]
