"""Model families: what the Hugging Face formats need to know about a model, by ``model_type``.

A :class:`ModelFamily` ties one of our model implementations to Hugging Face's names: its config
class and how to build it from a transformers config, its abstract parameters, the map between
our module paths and HF module names, the Linear modules (our path -> HF names per stacked
layer, ``d_in``, ``d_out``), and what PEFT's ``"all-linear"`` covers. The checkpoint and PEFT
code in :mod:`rslora_jax.hf` looks the family up instead of naming a model.

Registered families (each a config class, an HF name map, its projection groups and its
sharding policy; every one runs on the shared decoder, :mod:`rslora_jax.models.decoder`):

====== ===================================== ==========================================
family model types                           config class
====== ===================================== ==========================================
llama  ``llama``, ``mistral``, ``qwen2``     :class:`~rslora_jax.models.llama.LlamaConfig`
gemma  ``gemma2``, ``gemma3_text``           :class:`~rslora_jax.models.gemma.GemmaConfig`
qwen3  ``qwen3``                             :class:`~rslora_jax.models.qwen3.Qwen3Config`
phi3   ``phi3``                              :class:`~rslora_jax.models.phi3.Phi3Config`
====== ===================================== ==========================================

A family's config class must provide ``from_hf`` (as the ``from_hf`` field), ``to_hf()``,
``replace(**changes)`` and the attributes ``model_type``, ``scan_layers`` and
``tie_word_embeddings``, as :class:`~rslora_jax.models.architecture.DecoderConfig` does.

Name mapping (see :func:`hf_module_name` and :func:`flax_module_path`): our module names are
Hugging Face's, so the map only moves the layer index::

    model/embed_tokens                  <-> model.embed_tokens
    model/layers/self_attn/q_proj [i]   <-> model.layers.{i}.self_attn.q_proj   (scanned)
    model/layers/{i}/mlp/up_proj        <-> model.layers.{i}.mlp.up_proj        (not scanned)
    model/norm                          <-> model.norm
    lm_head                             <-> lm_head

Fused modules (:class:`FusedModule`): where a checkpoint stores several of our projections as
one Linear (Phi-3's ``self_attn.qkv_proj`` = q, k, v rows; ``mlp.gate_up_proj`` = gate, up
rows), the family lists them; :mod:`rslora_jax.hf` splits them on load and joins them on
export (weights and PEFT adapters), and :meth:`ModelFamily.fused_view` is the family as
Hugging Face sees it (its Linear modules are the fused ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import numpy as np

from rslora_jax._types import Params, PRNGKey
from rslora_jax.models import sharding
from rslora_jax.models.decoder import DecoderForCausalLM, init_params
from rslora_jax.models.gemma import GemmaConfig
from rslora_jax.models.llama import LlamaConfig
from rslora_jax.models.phi3 import Phi3Config
from rslora_jax.models.qwen3 import Qwen3Config

_LAYERS = ("model", "layers")


# ---------------------------------------------------------------------------- name mapping
def hf_module_name(path: str, layer: int | None = None) -> str:
    """Maps one of our module paths to Hugging Face's dotted module name (``model.layers`` layout).

    Args:
        path: '/'-joined path of the dict holding a ``kernel`` (or ``scale``/``embedding``),
            scanned (``model/layers/self_attn/q_proj``) or not (``model/layers/3/self_attn/q_proj``).
        layer: the layer index for a scanned path; must be None otherwise.

    Returns:
        The dotted name, e.g. ``model.layers.3.self_attn.q_proj``.

    Raises:
        ValueError: if a scanned layer path has no ``layer``, or ``layer`` is given for a path
            that already names its layer or is outside the layers.

    Example:
        >>> hf_module_name("model/layers/self_attn/q_proj", 3)
        'model.layers.3.self_attn.q_proj'
        >>> hf_module_name("model/layers/3/self_attn/q_proj")
        'model.layers.3.self_attn.q_proj'
        >>> hf_module_name("lm_head")
        'lm_head'
    """
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError(f"hf_module_name: path={path!r} is empty")
    in_layers = len(parts) >= 2 and tuple(parts[:2]) == _LAYERS
    if in_layers and len(parts) > 2 and parts[2].isdigit():
        if layer is not None:
            raise ValueError(
                f"hf_module_name: path={path!r} already names its layer; got layer={layer!r}"
            )
    elif in_layers:
        if layer is None:
            raise ValueError(f"hf_module_name: scanned path={path!r} needs a layer index")
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or layer < 0:
            raise ValueError(f"hf_module_name: layer={layer!r} must be an int >= 0")
        parts = [*parts[:2], str(int(layer)), *parts[2:]]
    elif layer is not None:
        raise ValueError(f"hf_module_name: path={path!r} is not a layer path; got layer={layer!r}")
    return ".".join(parts)


def flax_module_path(name: str, scan_layers: bool = True) -> tuple[str, int | None]:
    """Inverse of :func:`hf_module_name`: a dotted HF module name to ``(path, layer)``.

    Args:
        name: e.g. ``model.layers.3.self_attn.q_proj``.
        scan_layers: True for our scanned layout (layer index returned separately), False for
            the unscanned one (layer index kept in the path, ``layer`` None).

    Returns:
        ``(path, layer)`` such that ``hf_module_name(path, layer) == name``.

    Raises:
        ValueError: for a layer name without a numeric index.

    Example:
        >>> flax_module_path("model.layers.3.self_attn.q_proj")
        ('model/layers/self_attn/q_proj', 3)
        >>> flax_module_path("model.layers.3.self_attn.q_proj", scan_layers=False)
        ('model/layers/3/self_attn/q_proj', None)
    """
    parts = [p for p in name.split(".") if p]
    if len(parts) >= 2 and tuple(parts[:2]) == _LAYERS:
        if len(parts) < 3 or not parts[2].isdigit():
            raise ValueError(f"flax_module_path: name={name!r} has no layer index")
        if scan_layers:
            return "/".join([*parts[:2], *parts[3:]]), int(parts[2])
    return "/".join(parts), None


# ---------------------------------------------------------------------------- families
@dataclasses.dataclass(frozen=True)
class LinearModule:
    """A Linear module of a model: our path, its HF names (one per stacked layer), features.

    Attributes:
        path: our '/'-joined path of the dict holding the kernel.
        names: the HF module names, one per layer of a stacked (scanned) kernel, else one.
        d_in: input features.
        d_out: output features.
        stacked: whether the kernel has a leading layer axis.
    """

    path: str
    names: tuple[str, ...]
    d_in: int
    d_out: int
    stacked: bool


def _path_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


@dataclasses.dataclass(frozen=True)
class FusedModule:
    """Several of our Linear modules that a checkpoint stores as one (outputs stacked in order).

    Attributes:
        parent: the dict holding them in a layer (e.g. ``self_attn``).
        name: the fused module's name there (e.g. ``qkv_proj``).
        members: our modules, in the order of the fused output rows (e.g. q, k, v).

    Example:
        >>> f = FusedModule("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj"))
        >>> f.fused_path("model/layers/3/self_attn/k_proj")
        ('model/layers/3/self_attn/qkv_proj', 1)
        >>> f.fused_path("model/layers/3/mlp/up_proj") is None
        True
    """

    parent: str
    name: str
    members: tuple[str, ...]

    def fused_path(self, path: str) -> tuple[str, int] | None:
        """``(fused module path, member index)`` if `path` is a member under the layers."""
        parts = path.split("/")
        if len(parts) < 4 or tuple(parts[:2]) != _LAYERS or parts[-2] != self.parent:
            return None
        if parts[-1] not in self.members:
            return None
        return "/".join([*parts[:-1], self.name]), self.members.index(parts[-1])

    def member_paths(self, fused: str) -> tuple[str, ...]:
        """Our member module paths of the fused module path `fused`."""
        head = fused.rsplit("/", 1)[0]
        return tuple(f"{head}/{m}" for m in self.members)


def fuse_params(fused: Iterable[FusedModule], params: Params) -> Params:
    """The base tree as the checkpoint lays it out: each fused module's members replaced by one
    holder whose kernel (and bias) concatenates theirs along the output axis.

    Works on arrays and tracers (under `jax.eval_shape` on shapes only). Adapter leaves are
    refused (the PEFT format fuses adapters itself).

    Raises:
        ValueError: a member holds adapter leaves, or only some members exist.
    """
    groups = tuple(fused)

    def walk(node: Any, keys: tuple[str, ...]) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v, (*keys, str(k))) for k, v in node.items()}
        in_layers = tuple(keys[:2]) == _LAYERS
        for g in groups:
            if not in_layers or not keys or keys[-1] != g.parent:
                continue
            present = [m for m in g.members if m in out]
            if not present:
                continue
            where = "/".join(keys)
            if len(present) != len(g.members):
                raise ValueError(
                    f"{where}: {g.name} fuses {list(g.members)}, but only {present} exist"
                )
            holders = [out.pop(m) for m in g.members]
            extra = sorted({k for h in holders for k in h} - {"kernel", "bias"})
            if extra:
                raise ValueError(f"{where}: cannot fuse {list(g.members)} holding {extra}")
            fused_holder = {
                "kernel": jax.numpy.concatenate([h["kernel"] for h in holders], axis=-1)
            }
            if "bias" in holders[0]:
                fused_holder["bias"] = jax.numpy.concatenate([h["bias"] for h in holders], -1)
            out[g.name] = fused_holder
        return out

    return walk(params, ())


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the HF checkpoint and PEFT formats need to know about one of our models.

    Attributes:
        name: the family's name.
        architectures: ``(model_type, transformers class name)`` pairs this family serves,
            e.g. ``("llama", "LlamaForCausalLM")``.
        config_class: our config class (see the module docstring for what it must provide).
        from_hf: ``(transformers_config, **runtime) -> config``.
        init_params: ``(config, key) -> params``; traced only (see :meth:`abstract_params`).
        hf_module_name: ``(path, layer) -> HF module name`` (see :func:`hf_module_name`).
        flax_module_path: ``(name, scan_layers) -> (path, layer)``, its inverse.
        layers_path: the keys of the dict holding the layers (stacked when scanned).
        embedding_name: HF name of the token embedding (adapters there are not supported).
        output_name: HF name of the output layer ("all-linear" leaves it out, as PEFT does).
        ignored_tensor_suffixes: tensors some checkpoints carry that the model recomputes.
        fused: the modules the checkpoint stores fused (:class:`FusedModule`).
        module: ``config -> flax module`` of the causal LM (``apply(..., input_ids)``).
        param_specs: the sharding policy, ``(abstract params, mesh axes) -> PartitionSpecs``.

    Example:
        >>> fam = family("qwen2")
        >>> fam.name, fam.architecture("qwen2")
        ('llama', 'Qwen2ForCausalLM')
        >>> m = fam.linear_modules(LlamaConfig.tiny())["model/layers/self_attn/k_proj"]
        >>> m.names, m.d_in, m.d_out, m.stacked
        (('model.layers.0.self_attn.k_proj', 'model.layers.1.self_attn.k_proj'), 32, 16, True)
    """

    name: str
    architectures: tuple[tuple[str, str], ...]
    config_class: type
    from_hf: Callable[..., Any]
    init_params: Callable[[Any, PRNGKey], Params]
    hf_module_name: Callable[[str, int | None], str] = hf_module_name
    flax_module_path: Callable[[str, bool], tuple[str, int | None]] = flax_module_path
    layers_path: tuple[str, ...] = _LAYERS
    embedding_name: str = "model.embed_tokens"
    output_name: str = "lm_head"
    ignored_tensor_suffixes: tuple[str, ...] = ()
    fused: tuple[FusedModule, ...] = ()
    module: Callable[[Any], Any] = DecoderForCausalLM
    param_specs: Callable[..., Any] = sharding.param_specs

    @property
    def model_types(self) -> tuple[str, ...]:
        """The HF ``model_type`` values this family serves."""
        return tuple(t for t, _ in self.architectures)

    def architecture(self, model_type: str) -> str:
        """The transformers class name (``...ForCausalLM``) of `model_type`."""
        return dict(self.architectures)[model_type]

    def config(self, model_config: Any, *, scan_layers: bool, where: str) -> Any:
        """Our config from our config or a transformers config, with the given layout.

        Raises:
            ValueError: `model_config` is neither.
        """
        if isinstance(model_config, self.config_class):
            return model_config.replace(scan_layers=scan_layers)
        if hasattr(model_config, "to_json_string") and hasattr(model_config, "model_type"):
            return self.from_hf(model_config, scan_layers=scan_layers)
        raise ValueError(
            f"{where}: model_config must be a rslora_jax {self.config_class.__name__} or a "
            f"transformers config, got {type(model_config).__name__}"
        )

    def abstract_params(self, config: Any) -> Params:
        """The params tree of `config` as ``jax.ShapeDtypeStruct`` leaves (nothing computed)."""
        return jax.eval_shape(lambda key: self.init_params(config, key), jax.random.key(0))

    def is_stacked(self, keys: tuple[str, ...], scanned: bool) -> bool:
        """Whether the leaf at `keys` has a leading layer axis in this layout."""
        return scanned and tuple(keys[: len(self.layers_path)]) == self.layers_path

    def is_scanned(self, params: Any, where: str) -> bool:
        """Whether `params` have the scanned layout (layers stacked, not keyed by index).

        Raises:
            ValueError: the params have no non-empty layers dict.
        """
        layers = params
        try:
            for key in self.layers_path:
                layers = layers[key]
        except (KeyError, TypeError):
            raise ValueError(
                f"{where}: params have no {'/'.join(self.layers_path)!r} entry"
            ) from None
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError(f"{where}: {'/'.join(self.layers_path)!r} is not a non-empty dict")
        return not all(str(k).isdigit() for k in layers)

    def linear_modules(self, config: Any) -> dict[str, LinearModule]:
        """The model's Linear modules (dicts holding a ``kernel``), keyed by our path."""
        modules = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.abstract_params(config))[0]:
            *module, leaf_name = _path_keys(path)
            if leaf_name != "kernel":
                continue
            joined = "/".join(module)
            if self.is_stacked(tuple(module), config.scan_layers):
                names = tuple(self.hf_module_name(joined, i) for i in range(leaf.shape[0]))
                d_in, d_out = leaf.shape[1:]
                stacked = True
            else:
                names = (self.hf_module_name(joined, None),)
                d_in, d_out = leaf.shape
                stacked = False
            modules[joined] = LinearModule(joined, names, int(d_in), int(d_out), stacked)
        return modules

    def fused_path(self, path: str) -> tuple[FusedModule, str, int] | None:
        """``(fused module, its path, member index)`` if our module `path` is stored fused."""
        for g in self.fused:
            found = g.fused_path(path)
            if found is not None:
                return g, *found
        return None

    def fused_view(self) -> ModelFamily:
        """This family as the checkpoint names it: its params (and Linear modules) hold the
        fused modules instead of their members (itself when nothing is fused).

        Example:
            >>> from rslora_jax.models.phi3 import Phi3Config
            >>> view = family("phi3").fused_view()
            >>> sorted(view.linear_modules(Phi3Config.tiny()))[-2:]
            ['model/layers/self_attn/o_proj', 'model/layers/self_attn/qkv_proj']
        """
        if not self.fused:
            return self
        base_init, groups = self.init_params, self.fused

        def init(config: Any, key: PRNGKey) -> Params:
            return fuse_params(groups, base_init(config, key))

        return dataclasses.replace(self, init_params=init, fused=())

    def all_linear(self, names: Iterable[str]) -> list[str]:
        """What PEFT's ``target_modules="all-linear"`` expands to among these HF module names.

        The last name components of every Linear module but the output layer.

        Example:
            >>> family("llama").all_linear(["model.layers.0.mlp.up_proj", "lm_head"])
            ['up_proj']
        """
        return sorted({n.rsplit(".", 1)[-1] for n in names if n != self.output_name})


LLAMA = ModelFamily(
    name="llama",
    architectures=(
        ("llama", "LlamaForCausalLM"),
        ("mistral", "MistralForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
    ),
    config_class=LlamaConfig,
    from_hf=LlamaConfig.from_hf,
    init_params=init_params,
    ignored_tensor_suffixes=(".rotary_emb.inv_freq",),  # old Llama checkpoints carry it
)
GEMMA = ModelFamily(
    name="gemma",
    architectures=(("gemma2", "Gemma2ForCausalLM"), ("gemma3_text", "Gemma3ForCausalLM")),
    config_class=GemmaConfig,
    from_hf=GemmaConfig.from_hf,
    init_params=init_params,
)
QWEN3 = ModelFamily(
    name="qwen3",
    architectures=(("qwen3", "Qwen3ForCausalLM"),),
    config_class=Qwen3Config,
    from_hf=Qwen3Config.from_hf,
    init_params=init_params,
)
PHI3 = ModelFamily(
    name="phi3",
    architectures=(("phi3", "Phi3ForCausalLM"),),
    config_class=Phi3Config,
    from_hf=Phi3Config.from_hf,
    init_params=init_params,
    fused=(
        FusedModule("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
        FusedModule("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
    ),
)

#: HF ``model_type`` -> the family that serves it.
FAMILIES: Mapping[str, ModelFamily] = MappingProxyType(
    {t: fam for fam in (LLAMA, GEMMA, QWEN3, PHI3) for t in fam.model_types}
)


def family(model_type: Any, where: str = "family") -> ModelFamily:
    """The family serving a Hugging Face ``model_type``.

    Raises:
        ValueError: no family serves it.

    Example:
        >>> family("mistral").name
        'llama'
    """
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where}: model_type={model_type!r} is not supported; supported: {tuple(FAMILIES)}"
        )
    return FAMILIES[model_type]


def family_of(model_config: Any, where: str = "family_of") -> ModelFamily:
    """The family of our config object or of a transformers config (by its ``model_type``).

    Raises:
        ValueError: `model_config` is neither, or its model type is not supported.

    Example:
        >>> family_of(LlamaConfig.tiny()).name
        'llama'
    """
    for fam in dict.fromkeys(FAMILIES.values()):
        if isinstance(model_config, fam.config_class):
            return fam
    if hasattr(model_config, "to_json_string") and hasattr(model_config, "model_type"):
        return family(model_config.model_type, where)
    first, *others = [f.config_class.__name__ for f in dict.fromkeys(FAMILIES.values())]
    raise ValueError(
        f"{where}: model_config must be a rslora_jax {first} or a transformers config (other "
        f"families: {', '.join(others)}), got {type(model_config).__name__}"
    )


__all__ = [
    "FAMILIES",
    "GEMMA",
    "LLAMA",
    "PHI3",
    "QWEN3",
    "FusedModule",
    "LinearModule",
    "ModelFamily",
    "family",
    "family_of",
    "flax_module_path",
    "fuse_params",
    "hf_module_name",
]
