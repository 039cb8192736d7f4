"""One property suite over adapter methods x frontends x forward modes.

Every registered method (`rslora_jax.core.protocol.methods()`, LoRA-FA from `tests/_lora_fa.py`
included) runs through every property on every frontend, each against an independent reference:

- forward (factored, fused, auto) == the plain model on ``rl.merge(params)``;
- the initialised adapters leave the model unchanged (``merge(init(base)) == base``);
- merge / unmerge round trip, and the merged kernel against a formula written here from the
  method's leaves (`MERGE_FORMULAS`; a method without one is checked by merge-vs-forward only);
- ``rl.optimizer`` updates exactly the trained adapter leaves (`Leaf.trainable`), and Adam keeps
  exactly two moments per trained adapter element (plus step counts);
- a training step sharded over a (2, 4) mesh of fake CPU devices == the one-device reference
  step: the plain model's loss and gradient pulled back through ``rl.merge`` (so this also
  checks the adapted forward's gradients, every leaf, base included);
- checkpoint round trip (`rl.save_adapters` / `rl.load_adapters`);
- PEFT round trip (`rslora_jax.hf.export_peft` / `import_peft`) where the method has a PEFT
  format (`Method.peft_fields`), a clear refusal where it has none; built-in models only.

A method added later runs through all of it by being registered (and importable here); a
frontend is one entry of `FRONTENDS` (NNX can be added as one). To stay fast: each frontend's
model and each (method, frontend) case are built once per module; each computation is one
program, compiled once per (method, frontend) without LLVM optimisation (`FAST_COMPILE`), and
the plain model's gradient once per frontend.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax.core import is_adapter_key, protocol
from rslora_jax.core.tree import adapted_holders, get, weight_at
from rslora_jax.hf import export_peft, import_peft
from rslora_jax.methods import Kaiming, PiSSA
from rslora_jax.models import LlamaConfig, LlamaForCausalLM, causal_lm_loss, init_params
from rslora_jax.models import param_specs as llama_specs
from tests import _lora_fa
from tests._reference import gamma

MODES = ("factored", "fused", "auto")
RANK, ALPHA = 4, 8.0
SHARDED_MODE = "auto"  # on these shapes "auto" fuses some projections and factors others
TOL = 2e-5  # relative-norm tolerance of float32 results
#: XLA options of the suite's programs: no LLVM optimisation halves the compile time of these
#: tiny programs (the numerics are the same operations; tolerances cover the rounding).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# ============================================================================ helpers
def _name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def _flat(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for every array leaf."""
    return {
        "/".join(_name(k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _rel(x: Any, ref: Any) -> float:
    """``||x - ref|| / ||ref||`` in float64 (``||x||`` if ``ref`` is zero)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = np.linalg.norm(ref) or np.linalg.norm(x) or 1.0
    return float(np.linalg.norm(x - ref) / scale)


def _compile(fn: Callable[..., Any], *args: Any, **jit_kwargs: Any) -> Any:
    """`fn` compiled for `args` (one program, `FAST_COMPILE`)."""
    return jax.jit(fn, **jit_kwargs).lower(*args).compile(FAST_COMPILE)


def _run(fn: Callable[..., Any], *args: Any, **jit_kwargs: Any) -> Any:
    """`fn(*args)`, compiled once."""
    return _compile(fn, *args, **jit_kwargs)(*args)


#: Compiled programs by (frontend, program, config without its initialiser): variants of one
#: method differ in their initialiser only, which no program after `init` reads.
_PROGRAMS: dict[tuple[str, str, rl.LoraConfig], Any] = {}


def _run_shared(case: Case, program: str, fn: Callable[..., Any], *args: Any, **jit_kw: Any):
    """`fn(*args)` with the program compiled once per (frontend, method)."""
    key = (case.frontend.name, program, case.cfg.replace(init=Kaiming()))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _compile(fn, *args, **jit_kw)
    return _PROGRAMS[key](*args)


def _assert_trees_close(got: Any, want: Any, tol: float, what: str) -> None:
    g, w = _flat(got), _flat(want)
    assert g.keys() == w.keys(), f"{what}: tree structures differ"
    bad = {k: _rel(g[k], w[k]) for k in w if _rel(g[k], w[k]) > tol}
    assert not bad, f"{what}: relative errors above {tol}: {bad}"


# ============================================================================ variants
#: Initialisers run besides the default one, per method name: base-modifying ones change the
#: base and start B away from zero, so they matter where a method adopts given factors.
EXTRA_INITS: dict[str, tuple[protocol.Initialiser, ...]] = {"lora": (PiSSA(),)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A method (default-constructed) with an initialiser."""

    method: protocol.Method
    init: protocol.Initialiser

    @property
    def id(self) -> str:
        extra = "" if isinstance(self.init, Kaiming) else f"-{self.init.spec}"
        return f"{self.method.name}{extra}"


VARIANTS = [
    Variant(cls(), init)
    for name, cls in sorted(protocol.methods().items())
    for init in (Kaiming(), *EXTRA_INITS.get(name, ()))
]
assert _lora_fa.LoRAFA.name in {v.method.name for v in VARIANTS}


# ============================================================================ frontends
@dataclasses.dataclass(frozen=True)
class Built:
    """One frontend's model, built once.

    Attributes:
      apply: the plain model, ``apply(variables, inputs) -> outputs``.
      base: its parameters (no adapters).
      inputs: a batch (batch axis first).
      loss: ``loss(outputs) -> scalar``.
      lora: `LoraConfig` keywords this model needs (targets, kernel axes).
      specs: ``specs(base, mesh_axis_names)``: PartitionSpecs of the base.
      model_config: the built-in model's config, for PEFT interop (None: none).
    """

    apply: Callable[..., Any]
    base: dict
    inputs: Any
    loss: Callable[[Any], jax.Array]
    lora: Mapping[str, Any]
    specs: Callable[[Any, tuple[str, ...]], Any]
    model_config: Any = None

    @functools.cached_property
    def plain(self) -> Callable[[Any, Any], Any]:
        """The plain model on a params tree, compiled once (every method's merge fits it)."""
        return _compile(lambda p, x: self.apply({"params": p}, x), self.base, self.inputs)

    @functools.cached_property
    def plain_grad(self) -> Callable[[Any, Any], Any]:
        """``((loss, outputs), grads)`` of the plain model, compiled once per frontend."""

        def loss(p, x):
            out = self.apply({"params": p}, x)
            return self.loss(out), out

        return _compile(jax.value_and_grad(loss, has_aux=True), self.base, self.inputs)


def _linen_forward(built: Built, cfg: rl.LoraConfig, mode: str) -> Callable[[Any, Any], Any]:
    apply = rl.lora(built.apply, cfg, mode)
    return lambda p, x: apply({"params": p}, x)


@dataclasses.dataclass(frozen=True)
class Frontend:
    """How a model family is built and run with adapters.

    Attributes:
      name: test id.
      build: builds the model (called once per module).
      forward: ``forward(built, config, mode) -> f(params, inputs)``, the adapted forward.
      peft: whether PEFT interop applies (built-in models with a HF module map).
      sharded: whether the sharded-step property runs here (it compiles a second training
        step per method, the suite's largest cost).
      skip_methods: methods that do not apply to this frontend (tested for their refusal
        elsewhere).
    """

    name: str
    build: Callable[[], Built]
    forward: Callable[[Built, rl.LoraConfig, str], Callable[[Any, Any], Any]] = _linen_forward
    peft: bool = False
    sharded: bool = True
    skip_methods: tuple[str, ...] = ()


class _Heads(nn.Module):
    """Unscanned layer: DenseGeneral kernels with split output ('ioo') and input ('iio') axes."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.DenseGeneral((2, 8), name="heads")(x))
        return x + nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="merge")(h)


class _Layers(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = _Heads(name=str(i))(x)
        return x


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = jnp.tanh(nn.Dense(24, name="up")(x))
        return x + nn.Dense(x.shape[-1], name="down")(h), None


class _LinenNet(nn.Module):
    """``layers/<i>/{heads,merge}`` (unscanned) then ``stack/{up,down}`` (nn.scan, 'lio')."""

    @nn.compact
    def __call__(self, x):
        x = _Layers(name="layers")(x)
        stack = nn.scan(
            _ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        x, _ = stack(name="stack")(x, None)
        return x


def _linen_specs(base: Any, axes: tuple[str, ...]) -> Any:
    rules = {  # module -> kernel spec: FSDP on one feature axis, TP on the other
        "heads": P("fsdp", None, "model"),
        "merge": P(None, "model", "fsdp"),
        "up": P(None, "fsdp", "model"),
        "down": P(None, "model", "fsdp"),
    }

    def spec(path: tuple, _: Any) -> P:
        keys = [_name(k) for k in path]
        return rules[keys[-2]] if keys[-1] == "kernel" else P()

    return jax.tree_util.tree_map_with_path(spec, base)


def _random_params(shapes: Any, seed: int) -> Any:
    """Parameters of the given shapes without compiling an initialiser: kernels and embeddings
    ~ N(0, 0.15^2), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple, s: jax.ShapeDtypeStruct) -> jax.Array:
        name = _name(path[-1])
        x = rng.standard_normal(s.shape) * (0.15 if name in ("kernel", "embedding") else 0.1)
        return jnp.asarray(x + (name == "scale"), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _linen() -> Built:
    model = _LinenNet()
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    target = jax.random.normal(jax.random.key(1), (2, 8, 32))
    base = _random_params(jax.eval_shape(model.init, jax.random.key(2), x)["params"], seed=2)
    axes = {r"layers/\d+/heads": "ioo", r"layers/\d+/merge": "iio", r"stack/\w+": "lio"}
    return Built(
        apply=model.apply,
        base=base,
        inputs=x,
        loss=lambda out: jnp.mean(jnp.square(out - target)),
        lora={"kernel_axes": axes},
        specs=_linen_specs,
    )


def _llama(scan: bool) -> Built:
    config = LlamaConfig.tiny(scan_layers=scan)
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, config.vocab_size)
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(1))
    return Built(
        apply=LlamaForCausalLM(config).apply,
        base=_random_params(shapes, seed=1),
        inputs=ids[:, :-1],
        loss=lambda logits: causal_lm_loss(logits, ids[:, 1:]),
        lora={"kernel_axes": "lio"} if scan else {},
        specs=llama_specs,
        model_config=config,
    )


def _einsum() -> Built:
    """gemma-style einsum layers (weights ``w``, ``gating_einsum``, ``linear``; stacked k/v and
    gate/up members; two weights in one scope), registered as `tests/test_einsum_layers.py`
    does."""
    from tests import test_einsum_layers as einsum_layers

    model = einsum_layers.LayeredModel()
    tokens = einsum_layers.TOKENS
    shapes = jax.eval_shape(model.init, jax.random.key(2), tokens)["params"]
    base = _random_params(shapes, seed=5)
    return Built(
        apply=model.apply,
        base=base,
        inputs=tokens,
        loss=lambda out: jnp.mean(jnp.square(out)),
        lora={"kernel_axes": rl.infer_kernel_axes(model.apply, {"params": base}, tokens)},
        specs=lambda base, axes: jax.tree.map(lambda _: P(), base),
    )


FRONTENDS = [
    Frontend("linen", _linen),  # through the interceptor, incl. an nn.scan stack
    # Weights not named "kernel": einsum layers with stacked members (one adapter per member).
    # RaSA groups layers by path index or by layer axes, and stacked members are layer axes of
    # the factors: it refuses them (tests/test_einsum_layers.py checks the message).
    Frontend("einsum", _einsum, sharded=False, skip_methods=("rasa",)),
    # The built-in Llama claims its projections and computes q/k/v and gate/up grouped.
    Frontend("llama", functools.partial(_llama, True), peft=True),
    # Unscanned: per-layer paths (RaSA groups by layer index, PEFT names per layer). Its
    # sharding is the 2-D rule the other two frontends' and test_sharding.py's cases cover.
    Frontend("llama-unscanned", functools.partial(_llama, False), peft=True, sharded=False),
]


# ============================================================================ cases
def _perturb(tree: Any, seed: int) -> Any:
    """Adds noise to every adapter leaf (B starts at zero, which would hide most bugs)."""
    rng = np.random.default_rng(seed)

    def bump(path: tuple, x: Any) -> Any:
        if not rl.is_adapter_path(path):
            return x
        rms = float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))
        noise = rng.standard_normal(x.shape) * (0.2 * rms if rms > 0 else 0.05)
        return (x + noise).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(bump, tree)


@dataclasses.dataclass
class Case:
    """One (variant, frontend): the adapted params, and what the tests check, computed once."""

    variant: Variant
    frontend: Frontend
    built: Built
    cfg: rl.LoraConfig
    fresh: Any  # `rl.init` output
    base: Any  # its base (PiSSA: the residual kernels)
    params: Any  # `fresh` with perturbed adapters

    @functools.cached_property
    def outs(self) -> dict[str, Any]:
        """``{mode: outputs}``: the adapted forward of every mode, one compiled program."""
        fwd = {m: self.frontend.forward(self.built, self.cfg, m) for m in MODES}
        with jax.numpy_dtype_promotion("strict"):
            return _run_shared(
                self,
                "outs",
                lambda p, x: {m: f(p, x) for m, f in fwd.items()},
                self.params,
                self.built.inputs,
            )

    @functools.cached_property
    def trees(self) -> dict[str, Any]:
        """Tree operations, compiled once per case: ``merged_fresh`` (``merge(init(base))``),
        ``merged``, ``scales`` (column scales of methods that rescale), ``unmerged``."""
        cfg = self.cfg

        def run(fresh, p):
            merged, scales = rl.merge(p, cfg, return_column_scales=True)
            kw = {"column_scales": scales} if cfg.method.rescales_columns else {}
            return {
                "merged_fresh": rl.merge(fresh, cfg),
                "merged": merged,
                "scales": scales,
                "unmerged": rl.unmerge(merged, rl.split(p)[0], cfg, **kw),
            }

        with jax.numpy_dtype_promotion("strict"):
            return _run_shared(self, "trees", run, self.fresh, self.params)

    @functools.cached_property
    def step(self) -> dict[str, Any]:
        """The one-device reference step, independent of the adapted forward: ``loss``,
        ``merged_out`` (the plain model on ``rl.merge(params)``), ``grads`` (the plain model's
        gradient, pulled back through ``rl.merge`` to the whole tree: base, adapters, frozen
        leaves) and ``updates`` (one `rl.optimizer` Adam step on them)."""
        cfg = self.cfg
        opt = rl.optimizer(optax.adam(1e-2), self.params)
        with jax.numpy_dtype_promotion("strict"):
            (loss, out), g_merged = self.built.plain_grad(self.trees["merged"], self.built.inputs)

        def pull_back(p, g):
            _, vjp = jax.vjp(lambda q: rl.merge(q, cfg), p)
            (grads,) = vjp(g)
            with jax.numpy_dtype_promotion("standard"):  # optax Adam's bias correction
                updates, _ = opt.update(grads, opt.init(p), p)
            return grads, updates

        with jax.numpy_dtype_promotion("strict"):
            grads, updates = _run_shared(self, "step", pull_back, self.params, g_merged)
        return {"loss": loss, "merged_out": out, "grads": grads, "updates": updates}


@functools.cache
def _built(frontend: Frontend) -> Built:
    return frontend.build()


@functools.cache
def _case(variant: Variant, frontend: Frontend) -> Case:
    built = _built(frontend)
    cfg = rl.LoraConfig(
        rank=RANK, alpha=ALPHA, method=variant.method, init=variant.init, **built.lora
    )
    # `init` as one compiled program (eager `init` is tested elsewhere; compiling it is quicker).
    with jax.numpy_dtype_promotion("strict"):
        fresh = _run(lambda b, k: rl.init(b, cfg, k), built.base, jax.random.key(3))
    _, base = rl.split(fresh)
    return Case(variant, frontend, built, cfg, fresh, base, _perturb(fresh, seed=4))


@pytest.fixture(scope="module", autouse=True)
def _release_cases():
    yield
    _case.cache_clear()
    _built.cache_clear()
    _PROGRAMS.clear()


def _cases(where: Callable[[Frontend], bool] = lambda f: True) -> Any:
    """Parametrizes a test over every variant x every frontend where `where` holds."""
    return pytest.mark.parametrize(
        "variant, frontend",
        [
            pytest.param(v, f, id=f"{v.id}-{f.name}")
            for v in VARIANTS
            for f in FRONTENDS
            if where(f) and v.method.name not in f.skip_methods
        ],
    )


both = _cases()


def _leaf_role(method: protocol.Method, path: str) -> protocol.Leaf | None:
    """The `Leaf` the method declares for an adapter leaf's path (None: a base leaf)."""
    keys = path.split("/")
    if not any(is_adapter_key(k) for k in keys):
        return None
    table = method.shared_leaves if keys[0] == method.shared_key else method.leaves
    return table[keys[-1]]


# ============================================================================ forward
@both
@pytest.mark.parametrize("mode", MODES)
def test_forward_equals_merged_forward(variant, frontend, mode):
    case = _case(variant, frontend)
    ref = case.step["merged_out"]
    assert _rel(case.outs[mode], ref) < TOL
    # The adapters matter: the plain model on the base gives something else.
    assert _rel(case.built.plain(case.base, case.built.inputs), ref) > 1e-3


@both
def test_initial_adapters_keep_the_model(variant, frontend):
    case = _case(variant, frontend)
    _assert_trees_close(case.trees["merged_fresh"], case.built.base, 1e-5, "merge(init(base))")


# ============================================================================ merge
@both
def test_merge_unmerge_round_trip(variant, frontend):
    case = _case(variant, frontend)
    _assert_trees_close(case.trees["unmerged"], case.base, 1e-5, "unmerge(merge(params))")
    if variant.method.rescales_columns:  # the merged kernel alone does not determine the base
        assert case.trees["scales"]
        with pytest.raises(ValueError, match="column scales"):
            rl.unmerge(case.trees["merged"], rl.split(case.params)[0], case.cfg)
    else:
        assert not case.trees["scales"]


def _as_matrix(kernel: Any, axes: str) -> np.ndarray:
    """The kernel as ``(*l, d_in, d_out)`` float64 (axes in kernel order, flattened)."""
    k = np.asarray(kernel, np.float64)
    order = [i for r in "lio" for i, a in enumerate(axes) if a == r]
    k = k.transpose(order)
    n_l = axes.count("l")
    d_in = int(np.prod([s for s, a in zip(kernel.shape, axes) if a == "i"]))
    return k.reshape(*k.shape[:n_l], d_in, -1)


def _lora_formula(leaves, w, scale, ctx):
    return w + scale * leaves["lora_a"] @ leaves["lora_b"]


def _lora_fa_formula(leaves, w, scale, ctx):
    return w + scale * leaves["lora_fa_a"] @ leaves["lora_b"]


def _dora_formula(leaves, w, scale, ctx):
    v = w + scale * leaves["lora_a"] @ leaves["lora_b"]
    return leaves["lora_magnitude"][..., None, :] * v / np.linalg.norm(v, axis=-2, keepdims=True)


def _rasa_formula(leaves, w, scale, ctx):
    module = re.sub(r"(^|/)layers/\d+(/|$)", r"\1layers\2", ctx["path"])
    pool = ctx["shared"]
    for k in module.split("/"):
        pool = pool[k]
    p = leaves["lora_a"].shape[-1]  # private ranks r - k
    d = leaves["lora_d"]
    private = leaves["lora_a"] @ (d[..., :p, None] * leaves["lora_b"])
    shared = np.asarray(pool["lora_a"], np.float64) @ (
        d[..., p:, None] * np.asarray(pool["lora_b"], np.float64)
    )
    return w + private + shared


#: The merged kernel as ``(*l, d_in, d_out)``, written from the method's leaves (float64).
MERGE_FORMULAS = {
    "lora": _lora_formula,
    "lora_fa": _lora_fa_formula,
    "dora": _dora_formula,
    "rasa": _rasa_formula,
}


@both
def test_merged_kernels_match_the_method_formula(variant, frontend):
    formula = MERGE_FORMULAS.get(variant.method.name)
    if formula is None:
        pytest.skip(f"no merge formula for {variant.method.name!r}: checked by merge-vs-forward")
    case = _case(variant, frontend)
    shared = case.params.get(variant.method.shared_key or "", {})
    checked = 0
    for path, holder in adapted_holders(case.params):
        axes = case.cfg.axes_for(path, holder["kernel"].shape)
        leaves = {k: np.asarray(v, np.float64) for k, v in holder.items() if k.startswith("lora_")}
        scale = gamma(ALPHA, RANK, "rslora")
        want = formula(
            leaves, _as_matrix(holder["kernel"], axes), scale, {"path": path, "shared": shared}
        )
        got = _as_matrix(weight_at(case.trees["merged"], path), axes)
        assert _rel(got, want) < 1e-5, path
        checked += 1
    assert checked == len(rl.adapter_paths(case.params)) > 0


# ============================================================================ optimizer
def _kind(method: protocol.Method, path: str) -> str:
    role = _leaf_role(method, path)
    return "base" if role is None else ("trained" if role.trainable else "frozen")


@both
def test_optimizer_updates_exactly_the_trained_adapters(variant, frontend):
    case = _case(variant, frontend)
    grads, updates = case.step["grads"], case.step["updates"]  # every leaf has a gradient
    flat_g = _flat(grads)
    kinds = {"base": 0, "frozen": 0, "trained": 0}
    for path, u in _flat(updates).items():
        kind = _kind(variant.method, path)
        kinds[kind] += 1
        norm = np.linalg.norm(np.asarray(u))
        if kind == "trained":
            assert norm > 0, f"trained leaf {path} got no update"
        else:
            assert norm == 0, f"{kind} leaf {path} was updated"
            if path.endswith("kernel") or kind == "frozen":  # the zero is the optimizer's doing
                assert np.linalg.norm(np.asarray(flat_g[path])) > 0, path
    frozen = [n for n, leaf in variant.method.leaves.items() if not leaf.trainable]
    assert kinds["trained"] > 0 and kinds["base"] > 0 and (kinds["frozen"] > 0) == bool(frozen)


@both
def test_adam_state_is_twice_the_trained_adapters(variant, frontend):
    case = _case(variant, frontend)
    state = jax.eval_shape(rl.optimizer(optax.adam(1e-3)).init, case.params)
    trained = sum(
        x.size for path, x in _flat(case.params).items() if _kind(variant.method, path) == "trained"
    )
    leaves = jax.tree.leaves(state)
    counts = [x for x in leaves if x.ndim == 0]
    assert sum(x.size for x in leaves if x.ndim > 0) == 2 * trained
    assert counts and all(jnp.issubdtype(x.dtype, jnp.integer) for x in counts)


# ============================================================================ sharding
LR, MOMENTUM = 0.1, 0.9


@_cases(lambda f: f.sharded)
def test_sharded_step_equals_one_device_step(variant, frontend):
    case = _case(variant, frontend)
    built, cfg = case.built, case.cfg
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "model"))
    specs = rl.partition_specs(case.params, built.specs(case.base, mesh.axis_names), cfg)
    opt = rl.optimizer(optax.sgd(LR, momentum=MOMENTUM))
    state_specs = rl.opt_state_specs(opt, case.params, specs)

    def shard(tree):
        return jax.tree.map(
            lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda x: isinstance(x, P)
        )

    forward = case.frontend.forward(built, cfg, SHARDED_MODE)

    def step(p, state, x):
        loss, g = jax.value_and_grad(lambda q: built.loss(forward(q, x)))(p)
        updates, state = opt.update(g, state, p)
        return loss, g, optax.apply_updates(p, updates)

    p_sh, x_sh = shard(specs), NamedSharding(mesh, P("fsdp"))
    params = jax.device_put(case.params, p_sh)
    # SGD with momentum starts from a zero trace: no eager init needed.
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(opt.init, params))
    state = jax.device_put(zeros, shard(state_specs))
    loss, grads, new = _run_shared(
        case,
        "sharded",
        step,
        params,
        state,
        jax.device_put(built.inputs, x_sh),
        in_shardings=(p_sh, shard(state_specs), x_sh),
        out_shardings=(NamedSharding(mesh, P()), p_sh, p_sh),
    )

    # Something is split (adapters follow the base), so the test is not vacuous.
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(rl.split(p_sh)[0]))
    # One-device reference: the loss and gradient of the plain model on rl.merge(params) (an
    # independent path, so this also checks the gradients of the forward), and the first step
    # of SGD with momentum written out (the trace starts at zero: -LR * g on trained leaves).
    ref_loss, ref_grads = case.step["loss"], case.step["grads"]
    assert _rel(loss, ref_loss) < TOL
    _assert_trees_close(grads, ref_grads, 1e-4, f"sharded gradients ({SHARDED_MODE})")
    flat_g = _flat(ref_grads)
    want = {
        path: np.asarray(x) - LR * np.asarray(flat_g[path])
        if _kind(variant.method, path) == "trained"
        else x
        for path, x in _flat(case.params).items()
    }
    got = _flat(new)
    assert got.keys() == want.keys()
    bad = {k: _rel(got[k], want[k]) for k in want if _rel(got[k], want[k]) > 1e-5}
    assert not bad, f"sharded step's params differ: {bad}"


# ============================================================================ checkpoints
@both
def test_checkpoint_round_trip(variant, frontend, tmp_path):
    case = _case(variant, frontend)
    rl.save_adapters(tmp_path / "ckpt", case.params, case.cfg)
    restored, cfg = rl.load_adapters(tmp_path / "ckpt", case.base)
    assert cfg == case.cfg
    got, want = _flat(restored), _flat(case.params)
    assert got.keys() == want.keys()
    for path, x in want.items():
        assert got[path].dtype == x.dtype and np.array_equal(got[path], x), path


# ============================================================================ PEFT
def _by_peft_name(params: Any, method: protocol.Method) -> dict[tuple[str, str], np.ndarray]:
    """``{(module path, PEFT key suffix): array}`` of an adapted tree."""
    out = {}
    for path, holder in adapted_holders(params):
        for name, x in holder.items():
            if name.startswith("lora_"):
                out[(path, method.leaves[name].peft)] = np.asarray(x)
    return out


@_cases(lambda f: f.peft)
def test_peft_round_trip(variant, frontend, tmp_path):
    case = _case(variant, frontend)
    built = case.built
    if variant.method.peft_fields is None:
        with pytest.raises(ValueError, match="no PEFT format"):
            export_peft(tmp_path, case.params, case.cfg, built.model_config)
        return
    export_peft(tmp_path, case.params, case.cfg, built.model_config)
    if case.cfg.init.modifies_base:  # PEFT recomputes the residual base on load: refused
        with pytest.raises(ValueError, match="init_lora_weights"):
            import_peft(tmp_path, case.base, built.model_config)
        return
    params, cfg = import_peft(tmp_path, case.base, built.model_config)
    got, want = _by_peft_name(params, cfg.method), _by_peft_name(case.params, case.cfg.method)
    assert got.keys() == want.keys()
    for key, x in want.items():
        assert np.array_equal(got[key], x), key
    # Same logits (forward == merged forward is tested above).
    logits = built.plain(rl.merge(params, cfg), built.inputs)
    assert _rel(logits, case.step["merged_out"]) < 1e-6


# ============================================================================ LoRA-FA, the doc
@pytest.mark.loose_dtypes
def test_lora_fa_optimizer_keeps_a_at_its_initial_value():
    llama = next(f for f in FRONTENDS if f.name == "llama")
    case = _case(Variant(_lora_fa.LoRAFA(), Kaiming()), llama)
    grads = case.step["grads"]
    opt = rl.optimizer(optax.adam(1e-2), case.params)
    params, state = case.params, opt.init(case.params)
    for _ in range(2):  # A has a gradient (checked below); Adam would move it if it were trained
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    holders = adapted_holders(params)
    assert holders
    for path, holder in holders:
        keys = tuple(path.split("/"))
        before, grad = get(case.params, keys), get(grads, keys)
        assert np.linalg.norm(np.asarray(grad[_lora_fa.A])) > 0, path
        assert np.array_equal(holder[_lora_fa.A], before[_lora_fa.A]), path
        assert not np.array_equal(holder[_lora_fa.B], before[_lora_fa.B]), path


def test_adding_a_method_doc_shows_the_tested_code():
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "adding_a_method.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    source = (root / "tests" / "_lora_fa.py").read_text()
    assert source in blocks, "docs/adding_a_method.md must show tests/_lora_fa.py verbatim"
