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
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

TargetSpec = str | Sequence[str] | Callable[[str, Any], bool]

SCALINGS = ("rslora", "lora")
INITS = ("kaiming_uniform", "gaussian", "pissa", "pissa_niter_<n>", "olora")  # for messages
_NAMED_INITS = ("kaiming_uniform", "gaussian", "pissa", "olora")
# Inits that read the base kernels and change them (the base becomes W - gamma * A @ B).
BASE_MODIFYING_INITS = ("pissa", "olora")
RASA_INITS = ("paper", "rslora")
# A path's layer index for RaSA grouping: ".../layers/<int>/..." (group 1 is the index).
DEFAULT_RASA_LAYER_PATTERN = r"(?:^|/)layers/(\d+)(?:/|$)"
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
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


@dataclasses.dataclass(frozen=True)
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
      init: initialisation of ``lora_a`` (``lora_b`` is zero): ``"kaiming_uniform"`` (PEFT's
        default, ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``) or ``"gaussian"``
        (``A ~ N(0, 1/d_in)``: unlike PEFT's ``gaussian``, whose std is ``1/r``, the variance
        does not depend on the rank, as the rsLoRA theorem assumes). Or a base-modifying
        initialisation as PEFT's ``init_lora_weights`` (see `rslora_jax.variants`):
        ``"pissa"`` (exact SVD), ``"pissa_niter_<n>"`` (randomized SVD with ``n`` subspace
        iterations) or ``"olora"`` (QR); `rslora_jax.init` then also returns the base kernels
        changed to ``W - gamma * A @ B``, so the model's output is unchanged.
      fan_in_fan_out: ``True`` if 2-D kernels are stored (out, in) (GPT-2's Conv1D), or a path
        regex (full match) selecting those kernels.
      dropout: dropout rate on the adapter input (factored forward only; active when the apply
        call passes an ``rngs={"lora_dropout": key}`` stream).
      dtype: dtype of the adapter factors (default float32).
      kernel_axes: axis roles of kernels with more than two axes (see the module docstring):
        a string for all kernels of that many axes, or ``{path regex: string}``.
      use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): each adapted kernel also
        gets a trainable magnitude vector ``lora_magnitude`` (one entry per output feature) and
        the layer computes ``m * (W + gamma*A@B) / ||W + gamma*A@B||`` (column norms over the
        input axes, detached from the gradient as in PEFT). See `rslora_jax.variants`.
      rasa: RaSA (rank-sharing LoRA, He et al. 2025): adapters of one module type across
        layers share a pool of ``L * rasa_k`` ranks; see `rslora_jax.rasa`. The per-layer
        diagonal ``lora_d`` carries the scale, so `scaling` is not used for RaSA adapters.
      rasa_k: ranks each layer contributes to its module type's shared pool (each layer keeps
        ``r - k`` private ranks); default ``max(r // 8, 1)`` (the paper's). Must be < r.
      rasa_layer_pattern: regex (searched in the path) with one group capturing a layer index;
        layers are grouped by module type, i.e. the path with that group removed
        (``model/layers/3/self_attn/q_proj`` -> ``model/layers/self_attn/q_proj``). Default:
        ``layers/<int>/``. A kernel with a leading layer axis (scanned layers, ``'l...'``) is
        a group on its own, of the stack's size.
      rasa_init: initial diagonal: ``"paper"`` (``alpha/(2(r-k))`` on private and
        ``alpha/(2Lk)`` on shared entries) or ``"rslora"`` (our rank-stabilised extension,
        not in the paper: ``alpha/(2 sqrt(r-k))`` and ``alpha/(2 sqrt(L k))``).

    Raises:
      ValueError: for any invalid field, naming the field and the value.

    Example:
      >>> cfg = LoraConfig(rank=16, alpha=16.0, targets=["q_proj", "v_proj"])
      >>> cfg.scale_for("model/layers/0/self_attn/q_proj")
      4.0
      >>> LoraConfig(rank=16, alpha=16.0, scaling="lora").scale_for("any")
      1.0
    """

    rank: int = 8
    alpha: float = 8.0
    targets: TargetSpec = ALL_LINEAR
    exclude: TargetSpec | None = None
    scaling: Literal["rslora", "lora"] = "rslora"
    rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
    init: str = "kaiming_uniform"
    fan_in_fan_out: bool | str = False
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernel_axes: str | Mapping[str, str] | tuple[tuple[str, str], ...] | None = None
    use_dora: bool = False
    rasa: bool = False
    rasa_k: int | None = None
    rasa_layer_pattern: str = DEFAULT_RASA_LAYER_PATTERN
    rasa_init: Literal["paper", "rslora"] = "paper"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)):
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        set_(self, "rank", int(self.rank))
        set_(self, "alpha", _check_alpha("alpha", self.alpha))
        set_(self, "targets", _check_spec("targets", self.targets, allow_none=False))
        set_(self, "exclude", _check_spec("exclude", self.exclude, allow_none=True))
        if self.exclude == ALL_LINEAR:
            raise ValueError("LoraConfig.exclude cannot be 'all-linear'")
        if self.scaling not in SCALINGS:
            raise ValueError(f"LoraConfig.scaling must be one of {SCALINGS}, got {self.scaling!r}")
        ranks = _freeze_mapping("rank_pattern", self.rank_pattern, int)
        for key, val in ranks:
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(
                    f"LoraConfig.rank_pattern[{key!r}] must be a positive int, got {val!r}"
                )
        set_(self, "rank_pattern", tuple((k, int(v)) for k, v in ranks))
        alphas = _freeze_mapping("alpha_pattern", self.alpha_pattern, float)
        set_(
            self,
            "alpha_pattern",
            tuple((k, _check_alpha(f"alpha_pattern[{k!r}]", v)) for k, v in alphas),
        )
        if not isinstance(self.init, str) or (
            self.init not in _NAMED_INITS and _PISSA_NITER.fullmatch(self.init) is None
        ):
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.fan_in_fan_out, bool):
            if not isinstance(self.fan_in_fan_out, str):
                raise ValueError(
                    "LoraConfig.fan_in_fan_out must be a bool or a path regex, "
                    f"got {self.fan_in_fan_out!r}"
                )
            _compile("fan_in_fan_out", self.fan_in_fan_out)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"LoraConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        set_(self, "dropout", float(self.dropout))
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(
                f"LoraConfig.dtype must be a float dtype, got {self.dtype!r}"
            ) from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"LoraConfig.dtype must be a float dtype, got {self.dtype!r}")
        set_(self, "dtype", dtype)
        axes = self.kernel_axes
        if axes is not None:
            if isinstance(axes, str):
                _check_axes("", axes)
            else:
                frozen = _freeze_mapping("kernel_axes", axes, str)
                for key, val in frozen:
                    _check_axes(f"[{key!r}]", val)
                axes = frozen
        set_(self, "kernel_axes", axes)
        self._check_variants()

    def _check_variants(self) -> None:
        for field in ("use_dora", "rasa"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"LoraConfig.{field} must be a bool, got {getattr(self, field)!r}")
        k = self.rasa_k
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(f"LoraConfig.rasa_k must be a positive int or None, got {k!r}")
            object.__setattr__(self, "rasa_k", int(k))
            if not self.rasa:
                raise ValueError(
                    f"LoraConfig.rasa_k={k!r} is set but rasa=False; set rasa=True or drop rasa_k"
                )
            if k >= self.rank:
                raise ValueError(
                    f"LoraConfig.rasa_k must be smaller than rank ({self.rank}): each layer keeps "
                    f"rank - rasa_k private ranks; got rasa_k={k!r}"
                )
        if not isinstance(self.rasa_layer_pattern, str):
            raise ValueError(
                "LoraConfig.rasa_layer_pattern must be a regex string, "
                f"got {self.rasa_layer_pattern!r}"
            )
        pattern = _compile("rasa_layer_pattern", self.rasa_layer_pattern)
        if pattern.groups != 1:
            raise ValueError(
                "LoraConfig.rasa_layer_pattern must have exactly one group (the layer index), "
                f"got {self.rasa_layer_pattern!r} with {pattern.groups} groups"
            )
        if self.rasa_init not in RASA_INITS:
            raise ValueError(
                f"LoraConfig.rasa_init must be one of {RASA_INITS}, got {self.rasa_init!r}"
            )
        if self.rasa and self.rank < 2:
            raise ValueError(
                f"LoraConfig.rank must be >= 2 with rasa=True (k >= 1 shared and >= 1 private "
                f"rank per layer), got {self.rank!r}"
            )
        if self.rasa and self.base_modifying_init:
            raise ValueError(
                f"LoraConfig.init={self.init!r} cannot be combined with rasa=True (RaSA draws "
                "its factors at random)"
            )
        if self.rasa and self.use_dora:
            raise ValueError("LoraConfig.use_dora=True cannot be combined with rasa=True")

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
        """Whether `init` is PiSSA or OLoRA (it changes the base kernels)."""
        return self.init in BASE_MODIFYING_INITS or _PISSA_NITER.fullmatch(self.init) is not None

    def pissa_niter(self) -> int | None:
        """``n`` of ``init="pissa_niter_<n>"`` (randomized SVD), else None."""
        m = _PISSA_NITER.fullmatch(self.init)
        return int(m.group(1)) if m else None

    def rasa_k_for(self, path: str) -> int:
        """RaSA's shared ranks per layer at `path`: `rasa_k`, or ``max(r // 8, 1)``.

        Example:
          >>> LoraConfig(rank=16, rasa=True).rasa_k_for("any")
          2
        """
        return self.rasa_k if self.rasa_k is not None else max(self.rank_for(path) // 8, 1)

    def rasa_module(self, path: str) -> tuple[str, int | None]:
        """RaSA's module type of `path` and its layer index (None if the path has none).

        The module type is the path with the layer index of `rasa_layer_pattern` removed.

        Example:
          >>> LoraConfig(rasa=True).rasa_module("model/layers/3/self_attn/q_proj")
          ('model/layers/self_attn/q_proj', 3)
          >>> LoraConfig(rasa=True).rasa_module("model/layers/self_attn/q_proj")
          ('model/layers/self_attn/q_proj', None)
        """
        m = re.search(self.rasa_layer_pattern, path)
        if m is None or m.group(1) is None:
            return path, None
        try:
            index = int(m.group(1))
        except ValueError:
            raise ValueError(
                f"LoraConfig.rasa_layer_pattern {self.rasa_layer_pattern!r} captured "
                f"{m.group(1)!r} in {path!r}, which is not a layer index (an int)"
            ) from None
        module = path[: m.start(1)] + path[m.end(1) :]
        module = re.sub("/+", "/", module).strip("/")
        return module, index

    def is_fan_in_fan_out(self, path: str) -> bool:
        if isinstance(self.fan_in_fan_out, bool):
            return self.fan_in_fan_out
        return re.fullmatch(self.fan_in_fan_out, path) is not None

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (callable targets cannot be serialised).

        Raises:
          ValueError: if `targets` or `exclude` is a callable.
        """
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            val = getattr(self, field.name)
            if field.name in ("targets", "exclude") and callable(val):
                raise ValueError(
                    f"LoraConfig.{field.name} is a callable ({val!r}) and cannot be serialised; "
                    "use a regex or a list of names"
                )
            if isinstance(val, tuple) and field.name in (
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
        """Inverse of `to_dict`.

        Raises:
          ValueError: for unknown keys or invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"LoraConfig.from_dict: unknown fields {unknown}")
        return cls(**dict(data))


def _check_alpha(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"LoraConfig.{field} must be a positive number, got {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"LoraConfig.{field} must be a positive finite number, got {value!r}")
    return float(value)


__all__ = ["ALL_LINEAR", "LoraConfig", "matches"]
