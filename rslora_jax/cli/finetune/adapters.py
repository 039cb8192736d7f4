"""The adapters of a run from its flags: `lora_config` (method, init, targets, patterns) and the
layer selection of ``--layers`` (`LayerSelection`).

Layer selection on scanned layers. The command runs the decoder layers as one ``nn.scan``: each
projection is one stacked kernel ``(layers, in, out)`` with one stacked adapter, and a path such
as ``model/layers/mlp/down_proj`` names all layers at once, so a path regex (``--targets``,
``--rank-pattern``) cannot pick a slice of the stack. ``--layers 0-7`` is therefore a mask over
the stack's leading axis: the other layers' adapter entries get zero gradient and zero update
(frozen at their initial values, so AdamW's weight decay does not move them either). With the
default initialisers B starts at zero, so those layers stay exactly the base model; with
PiSSA/OLoRA they keep ``W - gamma*A0@B0 + gamma*A0@B0 = W``; with RaSA their private factors
and diagonal start at zero, so the shared pool, trained by the selected layers, adds nothing to
them. The pool keeps the width ``L*k`` of the whole stack. Every layer still computes its (zero)
adapter: the cost is that of adapting all layers. Ranks and alphas stay per module type.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import rslora_jax as rl
from rslora_jax._types import PyTree
from rslora_jax.cli.common import UsageError
from rslora_jax.cli.finetune.options import parse_init, parse_pattern, parse_targets

#: Kernel axes of the scanned Llama: every kernel under the layer stack is (layer, in, out).
SCANNED_AXES = {"model/layers/.*": "lio"}


def _method(args: argparse.Namespace) -> Any:
    if args.rasa_k is not None and args.method != "rasa":
        raise UsageError(f"--rasa-k {args.rasa_k} needs --method rasa (got --method {args.method})")
    if args.method == "rasa":
        if args.rasa_k is not None and args.rasa_k >= args.rank:
            raise UsageError(
                f"--rasa-k {args.rasa_k} must be smaller than --rank {args.rank} (each layer keeps "
                "rank - k private ranks)"
            )
        return rl.RaSA(k=args.rasa_k, init=args.rasa_init)
    if args.method == "dora":
        return rl.DoRA()
    if args.method == "lora":
        return rl.LoRA()
    raise UsageError(f"--method {args.method!r}: expected one of lora, rasa, dora")


def lora_config(args: argparse.Namespace, *, rank: int | None = None) -> rl.LoraConfig:
    """The `rslora_jax.LoraConfig` the flags describe (checked against no model yet).

    Raises:
      UsageError: naming the flag, for an unknown method or init, a malformed pattern or
        regex, or ``--rasa-k`` without ``--method rasa``.
    """
    try:
        return rl.LoraConfig(
            rank=args.rank if rank is None else rank,
            alpha=args.alpha,
            targets=parse_targets(args.targets),
            scaling=args.scaling,
            rank_pattern=parse_pattern("--rank-pattern", args.rank_pattern, int),
            alpha_pattern=parse_pattern("--alpha-pattern", args.alpha_pattern, float),
            init=parse_init(args.init),
            dropout=args.lora_dropout,
            kernel_axes=SCANNED_AXES,
            method=_method(args),
        )
    except ValueError as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"--method {args.method} / --init {args.init}: {err}") from None


def adapted_paths(abstract_adapters: PyTree) -> list[str]:
    """The paths of the kernels that got adapters (the holders of ``lora_a``), in tree order."""
    paths = []
    for path, _ in jax.tree_util.tree_leaves_with_path(abstract_adapters):
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] != "lora_shared" and keys[-1] == "lora_a":
            paths.append("/".join(keys[:-1]))
    return paths


def check_patterns(args: argparse.Namespace, config: rl.LoraConfig, paths: list[str]) -> None:
    """Every ``--rank-pattern`` / ``--alpha-pattern`` key must select an adapted layer.

    Raises:
      UsageError: naming the key and listing the adapted paths.
    """
    patterns = (("--rank-pattern", config.rank_pattern), ("--alpha-pattern", config.alpha_pattern))
    for flag, pattern in patterns:
        for key, _ in pattern:
            # PEFT's rule, as LoraConfig.rank_for: the key matches a '/'-bounded suffix.
            if not any(re.match(rf"(.*/)?({key})$", p) for p in paths):
                raise UsageError(
                    f"{flag}: {key!r} matches no adapted layer; the adapted paths are "
                    f"{', '.join(paths)} (a key matches the end of a path; scanned layers have "
                    "no layer index in their paths: use --layers to choose layers)"
                )


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """``--layers``: which entries of the stacked adapters train (see the module docstring).

    Attributes:
      layers: the selected layer indices.
      num_layers: the stack's length.
    """

    layers: tuple[int, ...]
    num_layers: int

    def vector(self) -> np.ndarray:
        """A float32 (num_layers,) vector: 1 for selected layers, 0 for the others."""
        out = np.zeros(self.num_layers, np.float32)
        out[list(self.layers)] = 1.0
        return out

    def masks(self, adapters: PyTree) -> PyTree:
        """Per adapter leaf, a multiplier broadcastable to it: the layer vector on the stacked
        leaves (those under ``model/layers``), 1 on the others (RaSA's shared pools)."""
        vec = self.vector()

        def mask(path: tuple, leaf: Any) -> Any:
            keys = [str(getattr(k, "key", k)) for k in path]
            if keys[:2] == ["model", "layers"] and leaf.ndim >= 1 and leaf.shape[0] == len(vec):
                return jnp.asarray(vec.reshape((-1,) + (1,) * (leaf.ndim - 1)))
            return jnp.ones((), jnp.float32)

        return jax.tree_util.tree_map_with_path(mask, adapters)

    def apply(self, tree: PyTree, masks: PyTree) -> PyTree:
        """`tree` (gradients, updates, adapters) with the unselected layers' entries zeroed."""
        return jax.tree.map(lambda x, m: (x * m.astype(x.dtype)).astype(x.dtype), tree, masks)

    def describe(self) -> str:
        """'layers 0-1 of 4'-style text."""
        runs: list[str] = []
        start = prev = None
        for i in (*self.layers, None):
            if i is not None and prev is not None and i == prev + 1:
                prev = i
                continue
            if start is not None:
                runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = i
        return f"layers {','.join(runs)} of {self.num_layers}"
