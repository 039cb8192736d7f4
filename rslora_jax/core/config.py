"""`LoraConfig`: what to adapt, at which rank, and how to scale it.

The config is a frozen, hashable dataclass, so it can be a static argument of `jax.jit`. Every
value is validated when the config is built: a bad field raises `ValueError` naming the field and
the value.

Paths. A *path* is the '/'-joined chain of dict keys that leads to the dict holding a kernel, e.g.
``model/layers/3/self_attn/q_proj``. Targets, exclusions, rank/alpha patterns and kernel-axes
overrides are all matched against that string.

Kernel axes. A kernel may have more than two axes: scanned layers stack a leading layer axis,
``DenseGeneral``/``Einsum`` kernels split the input or output features over several axes. The
adapter needs to know which axes are which; it is written as a string with one letter per kernel
axis:

- ``l``: a layer (batch) axis: each index gets its own adapter (``nn.scan`` stacks, per-head
  einsum kernels);
- ``i``: an input axis, contracted with the activations;
- ``o``: an output axis.

A 2-D kernel is ``"io"`` (or ``"oi"`` where `fan_in_fan_out` says it is stored (out, in), as
GPT-2's Conv1D). For kernels with more axes, give ``kernel_axes``: one string for all kernels of
that rank, or a mapping from path regex (full match) to string; `rslora_jax.infer_kernel_axes`
reads them off a linen model. The adapter factors are over the flattened input and output axes:
``lora_a`` has shape ``(*l, prod(i), r)`` and ``lora_b`` ``(*l, r, prod(o))``, the input/output
axes flattened in kernel order.

Method and initialiser. `LoraConfig.method` holds the adapter method (`rslora_jax.methods`:
``LoRA()`` by default, ``RaSA(...)``, ``DoRA()``) and `LoraConfig.init` the initialiser
(``Kaiming()`` by default, ``Gaussian()``, ``PiSSA(niter=...)``, ``OLoRA()``; strings such as
``"pissa_niter_4"`` are accepted). The old flat keywords (``rasa=True, rasa_k=...``,
``use_dora=True``) still build the same config, and old flat config dicts still load.

Beyond the adapters (`rslora_jax.core.extras`, PEFT's semantics): ``modules_to_save`` (modules
trained in full, as copies), ``trainable_token_indices`` (rows of the embedding / output layer
trained), ``bias`` (``"none"``, ``"all"``, ``"lora_only"``: biases trained) and ``lora_bias`` (a
bias on B); embedding tables named by ``targets`` get LoRA on the lookup.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from rslora_jax.core import protocol
from rslora_jax.core.protocol import Initialiser, Method

TargetSpec = str | Sequence[str] | Callable[[str, Any], bool]

SCALINGS = ("rslora", "lora")
BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"
# Output layers that "all-linear" leaves alone (as PEFT does).
OUTPUT_LAYER_NAMES = ("lm_head",)
_AXIS_LETTERS = frozenset("lio")


def _freeze_mapping(field: str, value: Any, value_type: type) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        items = value
    elif isinstance(value, Mapping):
        items = tuple(value.items())
    else:
        raise ValueError(
            f"LoraConfig.{field} must be a mapping of path regex -> value, got {value!r}"
        )
    out = []
    for key, val in items:
        if not isinstance(key, str):
            raise ValueError(f"LoraConfig.{field} keys must be strings, got {key!r}")
        _compile(field, key)
        out.append((key, val))
    del value_type
    return tuple(out)


def _compile(field: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig.{field}: invalid regex {pattern!r}: {err}") from None


def _check_spec(field: str, spec: Any, *, allow_none: bool) -> Any:
    if spec is None:
        if allow_none:
            return None
        raise ValueError(f"LoraConfig.{field} must not be None")
    if isinstance(spec, str):
        if spec != ALL_LINEAR:
            _compile(field, spec)
        return spec
    if callable(spec):
        return spec
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        names = tuple(spec)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"LoraConfig.{field} must be a regex string, a non-empty list of module names, "
                f"or a callable (path, kernel) -> bool; got {spec!r}"
            )
        return names
    raise ValueError(
        f"LoraConfig.{field} must be a regex string, a list of module names, or a callable "
        f"(path, kernel) -> bool; got {spec!r}"
    )


def _check_axes(where: str, axes: Any) -> str:
    if not isinstance(axes, str) or not axes or not set(axes) <= _AXIS_LETTERS:
        raise ValueError(
            f"LoraConfig.kernel_axes{where}: expected a string of 'l' (layer), 'i' (input) and "
            f"'o' (output) letters, one per kernel axis, got {axes!r}"
        )
    if "i" not in axes or "o" not in axes:
        raise ValueError(
            f"LoraConfig.kernel_axes{where}: {axes!r} needs at least one input ('i') and one "
            "output ('o') axis"
        )
    return axes


def _suffix_match(pattern: str, path: str) -> bool:
    # PEFT's rank_pattern / alpha_pattern rule: the key matches a suffix of the module name that
    # starts at a name boundary ('.' in PEFT, '/' here).
    return re.match(rf"(.*/)?({pattern})$", path) is not None


def matches(spec: TargetSpec, path: str, kernel: Any) -> bool:
    """Whether `spec` (a targets/exclude value of `LoraConfig`) selects `path`."""
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            return path.rsplit("/", 1)[-1] not in OUTPUT_LAYER_NAMES
        return re.fullmatch(spec, path) is not None
    if callable(spec):
        return bool(spec(path, kernel))
    return any(path == name or path.endswith("/" + name) for name in spec)


@dataclasses.dataclass(frozen=True, init=False)
class LoraConfig:
    """Configuration of rank-stabilised LoRA adapters.

    Args:
      rank: adapter rank r (a positive int).
      alpha: scale numerator; the adapter output is multiplied by ``alpha / sqrt(rank)``
        (rsLoRA) or ``alpha / rank`` (LoRA).
      targets: which kernels get adapters: ``"all-linear"`` (every kernel except output layers
        named ``lm_head``), a regex fullmatched against the path, a list of names matched
        against the end of the path (PEFT's ``target_modules`` list rule: ``q_proj`` matches
        ``.../q_proj``), or a callable ``(path, kernel) -> bool``.
      exclude: same forms as `targets` (no ``"all-linear"``); a match removes the path.
      scaling: ``"rslora"`` (default, ``alpha / sqrt(r)``) or ``"lora"`` (``alpha / r``).
      rank_pattern: per-path rank overrides, ``{regex: rank}``, PEFT semantics: a key matches
        when it matches a '/'-bounded suffix of the path; the first matching key wins.
      alpha_pattern: per-path alpha overrides, same matching rule.
      init: the initialiser (`rslora_jax.methods.inits`), an object or its name:
        ``"kaiming_uniform"`` (default, PEFT's: ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``, B zero),
        ``"gaussian"`` (``A ~ N(0, 1/d_in)``: unlike PEFT's ``gaussian``, whose std is ``1/r``,
        the variance does not depend on the rank, as the rsLoRA theorem assumes), or a
        base-modifying one as PEFT's ``init_lora_weights``: ``"pissa"`` (exact SVD),
        ``"pissa_niter_<n>"`` (randomized SVD with ``n`` subspace iterations), ``"olora"`` (QR);
        `rslora_jax.init` then also changes the targeted kernels to ``W - gamma * A @ B``, so the
        model's output is unchanged.
      fan_in_fan_out: ``True`` if 2-D kernels are stored (out, in) (GPT-2's Conv1D), or a path
        regex (full match) selecting those kernels.
      dropout: dropout rate on the adapter input (active when the apply call passes an
        ``rngs={"lora_dropout": key}`` stream; such calls use the factored forward).
      dtype: dtype of the adapter factors (default float32).
      kernel_axes: axis roles of kernels with more than two axes (see the module docstring):
        a string for all kernels of that many axes, or ``{path regex: string}``.
      method: the adapter method (`rslora_jax.methods`): ``LoRA()`` (default), ``RaSA(k=...,
        layer_pattern=..., init=...)`` or ``DoRA()``, an object, its name or its `to_dict`.
      modules_to_save: PEFT's ``modules_to_save``: names of modules (dicts of the params tree)
        trained in full beside the adapters, as trained copies that replace the base's (see
        `rslora_jax.core.extras`). PEFT's matching rule: a module is selected when its path
        ends with a name (``'.'`` or ``'/'`` separated: ``"lm_head"``, ``"model.norm"``).
      trainable_token_indices: PEFT's ``trainable_token_indices``: a list of token ids whose
        rows of the (only) embedding table are trained (and thereby those of a tied output
        layer), or ``{module name: ids}`` for several tables (e.g. an untied ``lm_head``,
        whose columns are the token rows). Only those rows are stored and trained.
      bias: PEFT's ``bias``: ``"none"`` (default), ``"all"`` (every ``bias`` leaf trained) or
        ``"lora_only"`` (the biases of adapted layers), as trained copies.
      lora_bias: PEFT's ``lora_bias``: a trainable bias on B (``lora_bias`` ``(*l, d_out)``,
        zeros), so the adapted layer computes ``y + gamma * ((x @ A) @ B + b)``. LoRA only;
        merging folds it into the layer's bias, which must exist.
      **legacy: the old flat keywords, still accepted: ``use_dora=True`` (= ``method=DoRA()``),
        ``rasa=True`` with ``rasa_k``, ``rasa_layer_pattern``, ``rasa_init`` (=
        ``method=RaSA(k, layer_pattern, init)``). They can also be read as attributes
        (``config.rasa``, ``config.use_dora``).

    Raises:
      ValueError: for any invalid field, naming the field and the value.

    Example:
      >>> cfg = LoraConfig(rank=16, alpha=16.0, targets=["q_proj", "v_proj"])
      >>> cfg.scale_for("model/layers/0/self_attn/q_proj")
      4.0
      >>> LoraConfig(rank=16, alpha=16.0, scaling="lora").scale_for("any")
      1.0
      >>> LoraConfig(rank=16, rasa=True).method.name
      'rasa'
    """

    rank: int
    alpha: float
    targets: TargetSpec
    exclude: TargetSpec | None
    scaling: Literal["rslora", "lora"]
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    init: Initialiser
    fan_in_fan_out: bool | str
    dropout: float
    dtype: Any
    kernel_axes: str | tuple[tuple[str, str], ...] | None
    method: Method
    modules_to_save: tuple[str, ...]
    trainable_token_indices: tuple[int, ...] | tuple[tuple[str, tuple[int, ...]], ...] | None
    bias: Literal["none", "all", "lora_only"]
    lora_bias: bool

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 8.0,
        targets: TargetSpec = ALL_LINEAR,
        exclude: TargetSpec | None = None,
        scaling: Literal["rslora", "lora"] = "rslora",
        rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...] = (),
        alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...] = (),
        init: Initialiser | str | None = None,
        fan_in_fan_out: bool | str = False,
        dropout: float = 0.0,
        dtype: Any = jnp.float32,
        kernel_axes: str | Mapping[str, str] | tuple[tuple[str, str], ...] | None = None,
        method: Method | str | Mapping[str, Any] | None = None,
        modules_to_save: Sequence[str] | None = None,
        trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        bias: Literal["none", "all", "lora_only"] = "none",
        lora_bias: bool = False,
        **legacy: Any,
    ) -> None:
        set_ = object.__setattr__
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {rank!r}")
        set_(self, "rank", int(rank))
        set_(self, "alpha", _check_alpha("alpha", alpha))
        set_(self, "targets", _check_spec("targets", targets, allow_none=False))
        set_(self, "exclude", _check_spec("exclude", exclude, allow_none=True))
        if self.exclude == ALL_LINEAR:
            raise ValueError("LoraConfig.exclude cannot be 'all-linear'")
        if scaling not in SCALINGS:
            raise ValueError(f"LoraConfig.scaling must be one of {SCALINGS}, got {scaling!r}")
        set_(self, "scaling", scaling)
        ranks = _freeze_mapping("rank_pattern", rank_pattern, int)
        for key, val in ranks:
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(
                    f"LoraConfig.rank_pattern[{key!r}] must be a positive int, got {val!r}"
                )
        set_(self, "rank_pattern", tuple((k, int(v)) for k, v in ranks))
        alphas = _freeze_mapping("alpha_pattern", alpha_pattern, float)
        set_(
            self,
            "alpha_pattern",
            tuple((k, _check_alpha(f"alpha_pattern[{k!r}]", v)) for k, v in alphas),
        )
        parsed = protocol.default_init() if init is None else protocol.parse_init(init)
        if parsed is None:
            raise ValueError(
                f"LoraConfig.init must be one of {protocol.init_names()} (or an Initialiser), "
                f"got {init!r}"
            )
        set_(self, "init", parsed)
        if not isinstance(fan_in_fan_out, bool):
            if not isinstance(fan_in_fan_out, str):
                raise ValueError(
                    "LoraConfig.fan_in_fan_out must be a bool or a path regex, "
                    f"got {fan_in_fan_out!r}"
                )
            _compile("fan_in_fan_out", fan_in_fan_out)
        set_(self, "fan_in_fan_out", fan_in_fan_out)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ValueError(f"LoraConfig.dropout must be a float in [0, 1), got {dropout!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be a float in [0, 1), got {dropout!r}")
        set_(self, "dropout", float(dropout))
        try:
            dt = jnp.dtype(dtype)
        except TypeError:
            raise ValueError(f"LoraConfig.dtype must be a float dtype, got {dtype!r}") from None
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"LoraConfig.dtype must be a float dtype, got {dtype!r}")
        set_(self, "dtype", dt)
        axes = kernel_axes
        if axes is not None:
            if isinstance(axes, str):
                _check_axes("", axes)
            else:
                frozen = _freeze_mapping("kernel_axes", axes, str)
                for key, val in frozen:
                    _check_axes(f"[{key!r}]", val)
                axes = frozen
        set_(self, "kernel_axes", axes)
        set_(self, "method", _resolve_method(method, legacy))
        self.method.check(self)
        set_(self, "modules_to_save", _check_names("modules_to_save", modules_to_save))
        set_(self, "trainable_token_indices", _check_tokens(trainable_token_indices))
        if bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {bias!r}")
        set_(self, "bias", bias)
        if not isinstance(lora_bias, bool):
            raise ValueError(f"LoraConfig.lora_bias must be true or false, got {lora_bias!r}")
        if lora_bias and (self.method.rescales_columns or self.method.shared_key is not None):
            raise ValueError(
                f"LoraConfig.lora_bias=True works with LoRA only, not with "
                f"{self.method.title or self.method.name} (as PEFT refuses it with DoRA)"
            )
        if lora_bias and self.init.modifies_base:
            raise ValueError(
                f"LoraConfig.lora_bias=True cannot be combined with init={self.init.spec!r} "
                "(as in PEFT: the base-modifying initialisers leave no room for a bias on B)"
            )
        set_(self, "lora_bias", lora_bias)

    def __getattr__(self, name: str) -> Any:
        # The old flat fields (config.rasa, config.use_dora, config.rasa_k ...), read off the
        # method object by the method that declares them.
        owner = protocol.legacy_attributes().get(name)
        if owner is None or name.startswith("__"):
            raise AttributeError(f"'LoraConfig' object has no attribute {name!r}")
        return owner.legacy_value(self.method, name)

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (``dataclasses.replace``).

        Example:
          >>> LoraConfig(rank=4).replace(rank=8).rank
          8
        """
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ per-path values
    def rank_for(self, path: str) -> int:
        """The rank of the adapter at `path` (`rank_pattern` first, then `rank`)."""
        for key, val in self.rank_pattern:
            if _suffix_match(key, path):
                return val
        return self.rank

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at `path` (`alpha_pattern` first, then `alpha`)."""
        for key, val in self.alpha_pattern:
            if _suffix_match(key, path):
                return val
        return self.alpha

    def scale_for(self, path: str) -> float:
        """gamma_r for `path`: ``alpha / sqrt(r)`` (rsLoRA) or ``alpha / r`` (LoRA)."""
        r = self.rank_for(path)
        alpha = self.alpha_for(path)
        return alpha / math.sqrt(r) if self.scaling == "rslora" else alpha / r

    def is_target(self, path: str, kernel: Any) -> bool:
        """Whether the kernel at `path` gets an adapter (targets minus exclude)."""
        if not matches(self.targets, path, kernel):
            return False
        return self.exclude is None or not matches(self.exclude, path, kernel)

    def axes_for(self, path: str, shape: Sequence[int]) -> str:
        """The axis roles (letters ``l``/``i``/``o``) of the kernel at `path` with `shape`.

        Raises:
          ValueError: if the roles of a kernel with more than two axes are not given, or do
            not fit its shape.
        """
        ndim = len(shape)
        axes: str | None = None
        if isinstance(self.kernel_axes, str):
            if len(self.kernel_axes) == ndim:
                axes = self.kernel_axes
        elif self.kernel_axes:
            for key, val in self.kernel_axes:
                if re.fullmatch(key, path):
                    axes = val
                    break
        if axes is None:
            if ndim == 2:
                return "oi" if self.is_fan_in_fan_out(path) else "io"
            raise ValueError(
                f"kernel at {path!r} has shape {tuple(shape)}: with {ndim} axes, say which are "
                "layer ('l'), input ('i') and output ('o') axes with "
                f"LoraConfig(kernel_axes={{{path!r}: ...}}) (e.g. 'lio' for a scanned Dense), "
                "or read them off the model with rslora_jax.infer_kernel_axes"
            )
        if len(axes) != ndim:
            raise ValueError(
                f"LoraConfig.kernel_axes gives {axes!r} for {path!r}, but its kernel has shape "
                f"{tuple(shape)} ({ndim} axes)"
            )
        return axes

    @property
    def base_modifying_init(self) -> bool:
        """Whether `init` changes the base kernels (PiSSA, OLoRA)."""
        return self.init.modifies_base

    def pissa_niter(self) -> int | None:
        """``n`` of ``init="pissa_niter_<n>"`` (randomized SVD), else None (kept for old code:
        read ``config.init.niter``)."""
        return getattr(self.init, "niter", None)

    def token_indices_for(self, path: str) -> tuple[int, ...] | None:
        """The token ids whose rows `trainable_token_indices` trains in the table at `path`
        (dict form: the first name that `path` ends with), or None. The list form names no
        table: it applies to the model's input embedding (see `rslora_jax.core.extras`).

        Example:
          >>> LoraConfig(trainable_token_indices={"lm_head": [3, 1]}).token_indices_for("lm_head")
          (3, 1)
        """
        spec = self.trainable_token_indices
        if not spec or isinstance(spec[0], int):
            return None
        for name, ids in spec:
            if path.endswith(name):
                return ids
        return None

    def is_fan_in_fan_out(self, path: str) -> bool:
        if isinstance(self.fan_in_fan_out, bool):
            return self.fan_in_fan_out
        return re.fullmatch(self.fan_in_fan_out, path) is not None

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (callable targets cannot be serialised).

        Raises:
          ValueError: if `targets` or `exclude` is a callable.

        Example:
          >>> LoraConfig(rank=4, rasa=True).to_dict()["method"]["name"]
          'rasa'
        """
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            val = getattr(self, field.name)
            if field.name in ("targets", "exclude") and callable(val):
                raise ValueError(
                    f"LoraConfig.{field.name} is a callable ({val!r}) and cannot be serialised; "
                    "use a regex or a list of names"
                )
            if field.name in ("method", "init"):
                val = val.to_dict()
            elif field.name == "trainable_token_indices":
                if val is not None and val and not isinstance(val[0], int):
                    val = {name: list(ids) for name, ids in val}
                elif val is not None:
                    val = list(val)
            elif isinstance(val, tuple) and field.name in (
                "rank_pattern",
                "alpha_pattern",
                "kernel_axes",
            ):
                val = dict(val)
            elif isinstance(val, tuple):
                val = list(val)
            elif field.name == "dtype":
                val = jnp.dtype(val).name
            out[field.name] = val
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Inverse of `to_dict`; also reads the old flat dicts (``rasa``, ``use_dora``, ...,
        ``init`` as a string) of checkpoints written before methods were objects.

        Raises:
          ValueError: for unknown keys or invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)} | set(protocol.legacy_fields())
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"LoraConfig.from_dict: unknown fields {unknown}")
        return cls(**dict(data))


def _resolve_method(method: Any, legacy: Mapping[str, Any]) -> Method:
    known = protocol.legacy_fields()
    unknown = sorted(set(legacy) - set(known))
    if unknown:
        raise TypeError(f"LoraConfig() got unexpected keyword arguments {unknown}")
    from_legacy = protocol.method_from_legacy(legacy)
    if method is None:
        return from_legacy if from_legacy is not None else protocol.default_method()
    parsed = protocol.parse_method(method)
    if parsed is None:
        raise ValueError(
            f"LoraConfig.method must be one of {sorted(protocol.methods())} (or a Method), "
            f"got {method!r}"
        )
    if from_legacy is not None and from_legacy != parsed:
        raise ValueError(
            f"LoraConfig: method={parsed!r} contradicts the flat keywords "
            f"{sorted(k for k, v in legacy.items() if v not in (None, False))}; give one of them"
        )
    return parsed


def _check_names(field: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"LoraConfig.{field} must be a list of module names (e.g. ['lm_head']), got {value!r}"
        )
    names = []
    for name in value:
        if not isinstance(name, str) or not name.strip("./"):
            raise ValueError(f"LoraConfig.{field}: {name!r} is not a module name")
        names.append(name.replace(".", "/"))
    return tuple(names)


def _check_ids(where: str, ids: Any) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids:
        raise ValueError(f"LoraConfig.{where} must be a non-empty list of token ids, got {ids!r}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"LoraConfig.{where}: {i!r} is not a token id (an int >= 0)")
        out.append(int(i))
    if len(set(out)) != len(out):
        dup = sorted({i for i in out if out.count(i) > 1})
        raise ValueError(f"LoraConfig.{where} lists token ids more than once: {dup}")
    return tuple(out)


def _check_tokens(value: Any) -> Any:
    field = "trainable_token_indices"
    if value is None:
        return None
    if isinstance(value, Mapping) or (
        isinstance(value, tuple) and value and all(isinstance(p, tuple) for p in value)
    ):
        items = value.items() if isinstance(value, Mapping) else value
        out = []
        for name, ids in items:
            if not isinstance(name, str) or not name.strip("./"):
                raise ValueError(f"LoraConfig.{field}: {name!r} is not a module name")
            out.append((name.replace(".", "/"), _check_ids(f"{field}[{name!r}]", ids)))
        if not out:
            raise ValueError(f"LoraConfig.{field} must not be empty (None: no trainable tokens)")
        return tuple(out)
    return _check_ids(field, value)


def _check_alpha(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"LoraConfig.{field} must be a positive number, got {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"LoraConfig.{field} must be a positive finite number, got {value!r}")
    return float(value)


__all__ = ["ALL_LINEAR", "BIAS_MODES", "LoraConfig", "matches"]
