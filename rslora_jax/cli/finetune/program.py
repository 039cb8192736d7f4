"""The compiled program of a run: optimizer and schedule, the jitted training and evaluation
steps, and the shardings they take (`program` -> `Program`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import rslora_jax as rl
from rslora_jax._types import PyTree
from rslora_jax.cli.finetune.args import SCHEDULES
from rslora_jax.cli.finetune.layout import batch_sharding, named, run_specs
from rslora_jax.models.decoder import causal_lm_loss, init_params
from rslora_jax.models.families import family_of
from rslora_jax.ops.quantize import abstract_quantize, quantized_specs


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """The optimizer's hyperparameters (hashable: compiled programs are cached on them)."""

    lr: float
    schedule: str
    warmup_steps: int
    decay_steps: int  # steps after the warmup (unused by the constant schedule)
    weight_decay: float
    max_grad_norm: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimSettings:
        decay = max(args.steps - args.warmup_steps, 1) if args.schedule != "constant" else 0
        return cls(
            lr=args.lr,
            schedule=args.schedule,
            warmup_steps=args.warmup_steps,
            decay_steps=decay,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
        )


def make_schedule(s: OptimSettings) -> optax.Schedule:
    """The learning-rate schedule: linear warmup, then constant, cosine or linear decay to 0.

    Example:
      >>> s = OptimSettings(1.0, "linear", 2, 4, 0.0, 1.0)
      >>> [round(float(make_schedule(s)(t)), 3) for t in range(7)]
      [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if s.schedule == "constant":
        main = optax.constant_schedule(s.lr)
    elif s.schedule == "cosine":
        main = optax.cosine_decay_schedule(s.lr, s.decay_steps)
    elif s.schedule == "linear":
        main = optax.linear_schedule(s.lr, 0.0, s.decay_steps)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {s.schedule!r}")
    if not s.warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, s.lr, s.warmup_steps)
    return optax.join_schedules([warmup, main], [s.warmup_steps])


def make_optimizer(s: OptimSettings) -> optax.GradientTransformation:
    """AdamW (with global-norm clipping) on the adapters, through `rslora_jax.optimizer`."""
    clip = optax.clip_by_global_norm(s.max_grad_norm) if s.max_grad_norm else optax.identity()
    return rl.optimizer(
        optax.chain(clip, optax.adamw(make_schedule(s), weight_decay=s.weight_decay))
    )


@dataclasses.dataclass(frozen=True)
class Program:
    """The jitted functions of a run and the shardings they take (see `program`)."""

    init_state: Any  # adapters -> optimizer state
    # (adapters, state, base, batch, key, step, stop flags) -> (adapters, state, loss, any stop)
    train_step: Any
    eval_sums: Any  # (adapters, base, batch, row weights) -> (summed loss, token count)
    base: PyTree  # NamedShardings
    adapters: PyTree
    state: PyTree
    batch: NamedSharding
    replicated: NamedSharding
    flags: NamedSharding  # one bool per device (`stop_flags`)
    load_base: PyTree = None  # NamedShardings of the plain base (before --quantize)

    def stop_flags(self, value: bool) -> jax.Array:
        """A global bool vector with one entry per device, `value` on this process's devices.

        `train_step` returns whether any entry is set: a Ctrl-C in one process stops all of
        them after the same step.
        """
        n = self.flags.mesh.size
        return jax.make_array_from_callback(
            (n,), self.flags, lambda index: np.full(len(range(n)[index[0]]), value, np.bool_)
        )


@functools.lru_cache(maxsize=8)
def program(
    model_config: Any,
    lora_config: rl.LoraConfig,
    optim: OptimSettings,
    mesh: Mesh,
    forward: str = "auto",
    quantize: str = "none",
) -> Program:
    """Builds (and caches) the jitted training and evaluation functions of a run.

    Runs with the same model, adapter, optimizer and mesh settings in one process share the
    compiled code (a resumed run, a sweep over seeds). The base parameters are an argument of
    every function (never a compile-time constant), sharded as
    `rslora_jax.models.sharding.param_specs` says; the adapters and the optimizer state follow
    the base (`rslora_jax.partition_specs`, `rslora_jax.opt_state_specs`); the gradient is taken
    with respect to the adapters only.

    Args:
      model_config: the model (any family's config, scanned layers).
      lora_config: the adapters.
      optim: the optimizer's hyperparameters.
      mesh: the device mesh.
      forward: the `rslora_jax.lora` mode of the training forward (``"auto"``, ``"fused"``,
        ``"factored"``); the evaluation uses the same.
      quantize: ``"none"`` or the scheme of a quantized base (`rslora_jax.quantize` of the
        kernels `lora_config` targets by default): the functions then take the quantized base,
        its codes and scales sharded like the kernels (`Program.load_base` keeps the plain
        base's shardings, for loading).

    Returns:
      The jitted functions and their shardings.
    """
    abstract_base = jax.eval_shape(lambda k: init_params(model_config, k), jax.random.key(0))
    abstract_adapters = jax.eval_shape(
        lambda k: rl.init_adapters(abstract_base, lora_config, k), jax.random.key(0)
    )
    base_specs, adapter_specs = run_specs(abstract_base, abstract_adapters, lora_config, mesh)
    load_specs = base_specs
    if quantize != "none":
        abstract_q = abstract_quantize(abstract_base, quantize, config=lora_config)
        base_specs = quantized_specs(base_specs, abstract_q, dict(mesh.shape))
    opt = make_optimizer(optim)
    replicated = NamedSharding(mesh, P())
    flags = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    base_sh, adapter_sh = named(mesh, base_specs), named(mesh, adapter_specs)
    state_sh = named(mesh, rl.opt_state_specs(opt, abstract_adapters, adapter_specs))
    batch_sh = batch_sharding(mesh)
    apply = rl.lora(family_of(model_config).module(model_config).apply, lora_config, mode=forward)
    use_dropout = lora_config.dropout > 0

    def loss_fn(adapters: PyTree, base: PyTree, batch: jax.Array, key: jax.Array) -> jax.Array:
        rngs = {"lora_dropout": key} if use_dropout else None
        logits = apply({"params": rl.combine(adapters, base)}, batch[:, :-1], rngs=rngs)
        return causal_lm_loss(logits, batch[:, 1:])

    def train_step(adapters, opt_state, base, batch, key, step, stop):
        # Gradients of the adapters only: no base-sized gradient is formed.
        loss, grads = jax.value_and_grad(loss_fn)(
            adapters, base, batch, jax.random.fold_in(key, step)
        )
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss, jnp.any(stop)

    def eval_sums(adapters, base, batch, weight):
        logits = apply({"params": rl.combine(adapters, base)}, batch[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch[:, 1:]
        )
        return jnp.sum(ce * weight[:, None]), jnp.sum(weight) * jnp.float32(ce.shape[1])

    return Program(
        init_state=jax.jit(opt.init, in_shardings=(adapter_sh,), out_shardings=state_sh),
        train_step=jax.jit(
            train_step,
            in_shardings=(adapter_sh, state_sh, base_sh, batch_sh, replicated, replicated, flags),
            out_shardings=(adapter_sh, state_sh, replicated, replicated),
        ),
        eval_sums=jax.jit(
            eval_sums,
            in_shardings=(adapter_sh, base_sh, batch_sh, batch_sh),
            out_shardings=(replicated, replicated),
        ),
        base=base_sh,
        adapters=adapter_sh,
        state=state_sh,
        batch=batch_sh,
        replicated=replicated,
        flags=flags,
        load_base=named(mesh, load_specs),
    )
