"""The adapter-method protocol and its registry.

An adapter *method* (LoRA/rsLoRA, RaSA, DoRA, ...) is a frozen dataclass deriving from `Method`;
it lives in one module of `rslora_jax.methods` and owns everything that differs between methods:

- its **leaves**: the names of the entries it adds next to a kernel, each with a `Leaf` saying
  how it lies against the kernel (``"a"``: ``(*l, d_in, r)``, ``"b"``: ``(*l, r, d_out)``,
  ``"out"``: one entry per output feature ``(*l, d_out)``, ``"rank"``: ``(*l, n)``), whether it is
  trained, whether LoRA+ speeds it up, and its key suffix in PEFT's format;
- a top-level **shared entry** if it has one (RaSA's ``lora_shared`` pools);
- **initialisation** of its leaves (`Method.init_adapters`, `Method.adopt` for factors drawn by a
  base-modifying `Initialiser` such as PiSSA);
- the **factor pair** the forward pass uses (`Method.pair`: ``(A, B, scale)`` with
  ``delta W = scale * A @ B``; RaSA hands over ``[A_i | A_S], diag(d_i) [B_i ; B_S]`` with scale 1)
  and an optional **column rescale** of the adapted layer's output (`Method.column_scale`: DoRA's
  ``m / ||W + scale * A @ B||``). Merge, unmerge, the factored and the fused forward are written
  once over these two (`rslora_jax.ops.merge`, `rslora_jax.frontends.site`);
- **sharding** of its shared entry (`Method.shared_specs`; per-kernel leaves follow their `Leaf`
  layout);
- its **PEFT format** (`Method.peft_fields`: extra ``adapter_config.json`` fields, or None when
  PEFT has no equivalent).

The core (config, tree, checkpoints, optimizer, sharding, merge) calls this protocol and never
names a method. A method registers itself with `register_method`; `LoraConfig(method=...)` holds
an instance. Initialisers (`Initialiser`) are objects too, registered with `register_init`.
`docs/adding_a_method.md` walks through adding one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import jax

from rslora_jax._types import PRNGKey, PyTree
from rslora_jax.core.layout import KernelLayout

if TYPE_CHECKING:  # pragma: no cover
    from rslora_jax.core.config import LoraConfig

LeafLayout = Literal["a", "b", "out", "rank"]


@dataclasses.dataclass(frozen=True)
class Leaf:
    """How one adapter leaf lies against its kernel.

    Attributes:
      layout: ``"a"`` (``(*l, d_in, r)``), ``"b"`` (``(*l, r, d_out)``), ``"out"``
        (``(*l, d_out)``, one entry per output feature) or ``"rank"`` (``(*l, n)``).
      trainable: whether the optimizer updates it (`rslora_jax.optimizer`).
      fast: whether LoRA+ multiplies its learning rate (PEFT's rule: ``lora_B`` and 1-D leaves).
      peft: its key suffix in PEFT's ``adapter_model.safetensors`` (``"lora_A.weight"``), or None.
    """

    layout: LeafLayout
    trainable: bool = True
    fast: bool = False
    peft: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """One adapted kernel: where it is and what the config says about it.

    Attributes:
      path: the '/'-joined path of the kernel's dict.
      keys: the dict keys leading to it.
      layout: its `KernelLayout`.
      rank: ``config.rank_for(path)``.
      alpha: ``config.alpha_for(path)``.
      scale: ``config.scale_for(path)``.
    """

    path: str
    keys: tuple[Any, ...]
    layout: KernelLayout
    rank: int
    alpha: float
    scale: float


class Method:
    """Base class of adapter methods (see the module docstring). Subclasses are frozen
    dataclasses, so that a `LoraConfig` holding one stays hashable (a static `jax.jit` arg)."""

    #: Registry name, and the ``"name"`` of `to_dict`.
    name: ClassVar[str] = ""
    #: A human-readable name for messages.
    title: ClassVar[str] = ""
    #: The method a `LoraConfig` uses when none is given (exactly one registered method).
    default: ClassVar[bool] = False
    #: Leaf name -> `Leaf`, for the leaves next to each adapted kernel.
    leaves: ClassVar[Mapping[str, Leaf]] = {}
    #: Leaves of the top-level shared entry (e.g. pools), by name -> `Leaf`.
    shared_leaves: ClassVar[Mapping[str, Leaf]] = {}
    #: The top-level entry of the params holding state shared between kernels, or None.
    shared_key: ClassVar[str | None] = None
    #: Whether `column_scale` can return something (unmerge then needs the scales).
    rescales_columns: ClassVar[bool] = False
    #: Extra ``adapter_config.json`` fields of PEFT's format; None: PEFT has no equivalent.
    peft_fields: ClassVar[Mapping[str, Any] | None] = {}
    #: Old flat `LoraConfig` keywords this method reads (``rasa``, ``rasa_k``, ``use_dora``...).
    legacy_fields: ClassVar[tuple[str, ...]] = ()
    #: Old `LoraConfig` attributes (read only) this method answers (e.g. ``rasa_module``).
    legacy_reads: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ configuration
    def check(self, config: LoraConfig) -> None:
        """Checks the method against the rest of the config; raises ValueError."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, with ``"name"``."""
        return {"name": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> Method:
        """Inverse of `to_dict` (without ``"name"``)."""
        return cls(**dict(fields))

    @classmethod
    def from_legacy(cls, values: Mapping[str, Any]) -> tuple[Method, str] | None:
        """The method selected by old flat config keywords, with the flag that selected it, or
        None if `values` do not select this method. Raises ValueError for bad values."""
        return None

    @classmethod
    def legacy_value(cls, method: Method, field: str) -> Any:
        """The value an old flat config field (in `legacy_fields`) has for `method`."""
        raise AttributeError(field)

    # ------------------------------------------------------------------ adapters
    def init_adapters(
        self, params: PyTree, sites: list[Site], config: LoraConfig, key: PRNGKey
    ) -> PyTree:
        """The adapter tree (leaves of every site, and the shared entry) for `params`."""
        raise NotImplementedError

    def adopt(
        self, site: Site, a: jax.Array, b: jax.Array, kernel: jax.Array, config: LoraConfig
    ) -> dict[str, jax.Array]:
        """Leaves for given factors (drawn by a base-modifying initialiser), with `kernel` the
        already-changed base kernel as a ``(*l, d_in, d_out)`` float32 matrix."""
        raise ValueError(
            f"{self.title} cannot start from given factors (init={config.init.spec!r})"
        )

    def check_leaves(
        self, leaves: Mapping[str, Any], site: Site, config: LoraConfig, shared: Any
    ) -> None:
        """Checks one site's leaves (shapes, rank) against its kernel; raises ValueError."""

    # ------------------------------------------------------------------ forward and merge
    def pair(
        self, leaves: Mapping[str, Any], path: str, config: LoraConfig, shared: Any
    ) -> tuple[jax.Array, jax.Array, float]:
        """``(A, B, scale)``: the site's update is ``scale * A @ B``.

        `leaves` may be one layer's slice of stacked leaves (inside ``nn.scan``)."""
        raise NotImplementedError

    def column_scale(
        self,
        leaves: Mapping[str, Any],
        path: str,
        config: LoraConfig,
        w: jax.Array,
        a: jax.Array,
        b: jax.Array,
        scale: float,
    ) -> jax.Array | None:
        """A factor ``(*l, d_out)`` (float32) multiplying the adapted layer's output columns,
        or None. `w` is the kernel as ``(*l, d_in, d_out)``; `(a, b, scale)` from `pair`."""
        return None

    # ------------------------------------------------------------------ sharding
    def shared_specs(
        self, shared: PyTree, members: Mapping[str, tuple[Any, Any]], config: LoraConfig
    ) -> PyTree:
        """Specs of the shared entry, given ``{path: (input spec, output spec)}`` of every site
        (flattened input/output axes, layer axes dropped)."""
        raise ValueError(f"{self.title} has no sharding rule for {self.shared_key!r}")


class Initialiser:
    """Base class of initialisers (frozen dataclasses): how the first factors are drawn.

    A random initialiser draws ``A`` (``B`` is zero); a base-modifying one (PiSSA, OLoRA) computes
    both factors from the kernel and the base becomes ``W - scale * A @ B``.
    """

    name: ClassVar[str] = ""
    default: ClassVar[bool] = False
    modifies_base: ClassVar[bool] = False

    @property
    def spec(self) -> str:
        """The string form (``"kaiming_uniform"``, ``"pissa_niter_4"``), PEFT's naming."""
        return self.name

    @classmethod
    def parse(cls, text: str) -> Initialiser | None:
        """The initialiser `text` names, or None."""
        return cls() if text == cls.name else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def to_peft(self) -> bool | str:
        """PEFT's ``init_lora_weights`` value."""
        return self.spec

    def draw_a(self, key: PRNGKey, shape: tuple[int, ...], d_in: int, dtype: Any) -> jax.Array:
        raise ValueError(f"init={self.spec!r} does not draw A at random")

    def factors(
        self, w: jax.Array, r: int, scale: float, key: PRNGKey
    ) -> tuple[jax.Array, jax.Array]:
        """``(A, B)`` computed from the ``(..., d_in, d_out)`` kernel matrix `w` (float32)."""
        raise ValueError(f"init={self.spec!r} does not compute factors from the kernel")


# ---------------------------------------------------------------------------- registry
_METHODS: dict[str, type[Method]] = {}
_INITS: dict[str, type[Initialiser]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: makes a `Method` subclass known by its `name`.

    Raises:
      ValueError: if the name is taken, or a leaf name is already declared with another role.
    """
    if not cls.name or (cls.name in _METHODS and _METHODS[cls.name] is not cls):
        raise ValueError(f"register_method: name {cls.name!r} is empty or already registered")
    for name, leaf in {**cls.leaves, **cls.shared_leaves}.items():
        if not name.startswith("lora_"):
            raise ValueError(f"{cls.__name__}: leaf names start with 'lora_', got {name!r}")
        known = leaf_role(name)
        if known is not None and (known.trainable, known.fast) != (leaf.trainable, leaf.fast):
            raise ValueError(
                f"{cls.__name__}: leaf {name!r} is declared with another role by another method; "
                "give it its own name"
            )
    _METHODS[cls.name] = cls
    return cls


def register_init(cls: type[Initialiser]) -> type[Initialiser]:
    """Class decorator: makes an `Initialiser` subclass known by its `name`."""
    _INITS[cls.name] = cls
    return cls


def methods() -> dict[str, type[Method]]:
    """The registered methods by name."""
    return dict(_METHODS)


def default_method() -> Method:
    for cls in _METHODS.values():
        if cls.default:
            return cls()
    raise RuntimeError("no default adapter method is registered (import rslora_jax)")


def default_init() -> Initialiser:
    for cls in _INITS.values():
        if cls.default:
            return cls()
    raise RuntimeError("no default initialiser is registered (import rslora_jax)")


def init_names() -> tuple[str, ...]:
    """Accepted initialiser strings, for messages."""
    out = []
    for cls in _INITS.values():
        out.append(cls.name)
        out.extend(getattr(cls, "aliases", ()))
    return tuple(out)


def parse_init(value: Any) -> Initialiser | None:
    """An `Initialiser` from an instance, a string or a `to_dict` dict; None if unknown."""
    if isinstance(value, Initialiser):
        return value
    if isinstance(value, str):
        for cls in _INITS.values():
            found = cls.parse(value)
            if found is not None:
                return found
        return None
    if isinstance(value, Mapping) and value.get("name") in _INITS:
        fields = {k: v for k, v in value.items() if k != "name"}
        try:
            return _INITS[value["name"]](**fields)
        except TypeError:
            return None
    return None


def parse_method(value: Any) -> Method | None:
    """A `Method` from an instance, a registered name or a `to_dict` dict; None if unknown."""
    if isinstance(value, Method):
        return value
    if isinstance(value, str) and value in _METHODS:
        return _METHODS[value]()
    if isinstance(value, Mapping) and value.get("name") in _METHODS:
        cls = _METHODS[value["name"]]
        fields = {k: v for k, v in value.items() if k != "name"}
        try:
            return cls.from_fields(fields)
        except TypeError as err:
            raise ValueError(f"LoraConfig.method: bad fields for {cls.name!r}: {err}") from None
    return None


def legacy_fields() -> dict[str, type[Method]]:
    """Old flat config keyword -> the method class that reads it."""
    return {f: cls for cls in _METHODS.values() for f in cls.legacy_fields}


def legacy_attributes() -> dict[str, type[Method]]:
    """Old config attribute (keywords and read-only ones) -> the method class that answers it."""
    return {f: cls for cls in _METHODS.values() for f in (*cls.legacy_fields, *cls.legacy_reads)}


def method_from_legacy(values: Mapping[str, Any]) -> Method | None:
    """The method selected by old flat keywords (``rasa=True``, ``use_dora=True`` ...), or None.

    Raises:
      ValueError: for bad values, or two methods selected at once.
    """
    chosen: list[tuple[Method, str]] = []
    for cls in _METHODS.values():
        own = {k: v for k, v in values.items() if k in cls.legacy_fields}
        if own:
            found = cls.from_legacy(own)
            if found is not None:
                chosen.append(found)
    if len(chosen) > 1:
        (_, first), (_, second) = chosen[:2]
        raise ValueError(f"LoraConfig.{first}=True cannot be combined with {second}=True")
    return chosen[0][0] if chosen else None


def leaf_role(name: str) -> Leaf | None:
    """The `Leaf` a registered method declares under `name` (per-kernel or shared), or None."""
    for cls in _METHODS.values():
        for table in (cls.leaves, cls.shared_leaves):
            if name in table:
                return table[name]
    return None


def owner_of(name: str) -> type[Method] | None:
    """The first registered method declaring the leaf `name` that the default method lacks."""
    for cls in _METHODS.values():
        if name in cls.leaves and not cls.default:
            return cls
    return None


def check_leaf_names(method: Method, leaves: Mapping[str, Any], path: str) -> None:
    """Raises if `leaves` are not exactly the leaves `method` declares (e.g. a DoRA magnitude
    in a tree whose config says LoRA), naming the method that owns a stray leaf."""
    found, want = set(leaves), set(method.leaves)
    extra, missing = sorted(found - want), sorted(want - found)
    if extra:
        owner = owner_of(extra[0])
        what = f"a {owner.title} leaf" if owner is not None else "a leaf"
        raise ValueError(
            f"adapter at {path!r} has {what} ({extra[0]!r}), but the config's method is "
            f"{method.title or method.name} (leaves {sorted(want)}): build the config with the "
            "method the adapters were made with"
        )
    if missing:
        raise ValueError(
            f"adapter at {path!r} lacks {missing}, which the config's method "
            f"{method.title or method.name} needs (found {sorted(found)}): build the config with "
            "the method the adapters were made with"
        )


def shared_key_owner(key: str) -> type[Method] | None:
    for cls in _METHODS.values():
        if cls.shared_key == key:
            return cls
    return None


__all__ = [
    "Initialiser",
    "Leaf",
    "Method",
    "Site",
    "default_init",
    "default_method",
    "leaf_role",
    "methods",
    "parse_init",
    "parse_method",
    "register_init",
    "register_method",
]
