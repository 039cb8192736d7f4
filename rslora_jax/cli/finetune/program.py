"""The compiled program of a run: optimizer and schedule, the jitted training and evaluation
steps, and the shardings they take (`program` -> `Program`).

A batch is packed rows (`rslora_jax.data.FIELDS`: inputs, targets, weights, segment ids,
positions). The loss of an optimizer step is the sum of the counted targets' cross-entropies
over all its micro-batches (``--grad-accum``) divided by the number of counted targets in all of
them: one step on the whole batch, whatever the micro-batching or packing. The micro-batches
run in a `jax.lax.scan`, each adding its share of the gradient, so memory is that of one.
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
from rslora_jax.cli.finetune.adapters import LayerSelection
from rslora_jax.cli.finetune.args import SCHEDULES
from rslora_jax.cli.finetune.layout import accum_sharding, batch_sharding, named, run_specs
from rslora_jax.models.decoder import init_params
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
    lora_plus_ratio: float | None = None

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
            lora_plus_ratio=getattr(args, "lora_plus_ratio", None),
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
    """AdamW (with global-norm clipping) on the adapters, through `rslora_jax.optimizer`
    (LoRA+ when ``s.lora_plus_ratio`` is set)."""
    clip = optax.clip_by_global_norm(s.max_grad_norm) if s.max_grad_norm else optax.identity()
    return rl.optimizer(
        optax.chain(clip, optax.adamw(make_schedule(s), weight_decay=s.weight_decay)),
        lora_plus_ratio=s.lora_plus_ratio,
    )


@dataclasses.dataclass(frozen=True)
class Program:
    """The jitted functions of a run and the shardings they take (see `program`)."""

    init_state: Any  # adapters -> optimizer state
    # (adapters, state, base, batch (accum, rows, 5, S), key, step, stop flags)
    #   -> (adapters, state, loss, gradient norm, any stop)
    train_step: Any
    eval_sums: Any  # (adapters, base, rows (rows, 5, S)) -> (summed loss, counted targets)
    # (adapters, base, batch (accum, rows, 5, S), key) -> (loss, gradient): what a step follows
    loss_and_grads: Any
    base: PyTree  # NamedShardings
    adapters: PyTree
    state: PyTree
    batch: NamedSharding  # rows (evaluation, and each micro-batch)
    train_batch: NamedSharding  # (accum, rows, 5, S)
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
    grad_accum: int = 1,
    layers: LayerSelection | None = None,
    loss_chunk: int = 0,
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
      grad_accum: micro-batches per optimizer step.
      layers: ``--layers``: gradients and updates of the other layers' adapter entries are
        zeroed (`rslora_jax.cli.finetune.adapters`).
      loss_chunk: ``--loss-chunk``: positions per chunk of the model's own loss
        (``labels=``, ``loss_chunk=``); 0: the logits whole, then the cross-entropy.

    Returns:
      The jitted functions and their shardings.
    """
    abstract_base = jax.eval_shape(lambda k: init_params(model_config, k), jax.random.key(0))
    # Shapes only (a base-modifying init, PiSSA or OLoRA, has the default one's shapes).
    shaped = (
        lora_config.replace(init="kaiming_uniform")
        if lora_config.base_modifying_init
        else lora_config
    )
    abstract_adapters = jax.eval_shape(  # the base as an argument: DoRA reads the kernels
        lambda b, k: rl.init_adapters(b, shaped, k), abstract_base, jax.random.key(0)
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
    train_sh = accum_sharding(mesh)
    apply = rl.lora(family_of(model_config).module(model_config).apply, lora_config, mode=forward)
    use_dropout = lora_config.dropout > 0
    masks = None if layers is None else layers.masks(abstract_adapters)

    def sums(adapters: PyTree, base: PyTree, rows: jax.Array, key: Any) -> tuple:
        """(sum of the counted targets' cross-entropies, their number) over packed rows."""
        rngs = {"lora_dropout": key} if key is not None and use_dropout else None
        variables = {"params": rl.combine(adapters, base)}
        inputs = dict(positions=rows[:, 4], segment_ids=rows[:, 3], rngs=rngs)
        weight = rows[:, 2].astype(jnp.float32)
        count = jnp.sum(weight)
        if loss_chunk:  # the model's mean over the counted targets, chunk by chunk
            mean = apply(
                variables,
                rows[:, 0],
                labels=rows[:, 1],
                loss_mask=weight,
                loss_chunk=loss_chunk,
                **inputs,
            )
            return mean * jnp.maximum(count, 1.0), count
        logits = apply(variables, rows[:, 0], **inputs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), rows[:, 1])
        return jnp.sum(ce * weight), count

    def loss_and_grads(adapters, base, batch, key):
        # The loss of `batch` (accum, rows, 5, S), the mean over the counted targets of all
        # micro-batches, and its gradient. Gradients of the adapters only: no base-sized
        # gradient is formed.
        denom = jnp.maximum(jnp.sum(batch[:, :, 2].astype(jnp.float32)), 1.0)

        def micro(adapters, rows, k):
            total, _ = sums(adapters, base, rows, k)
            return total / denom

        if batch.shape[0] == 1:
            loss, grads = jax.value_and_grad(micro)(adapters, batch[0], key)
        else:

            def body(carry, xs):
                loss, grads = carry
                rows, i = xs
                part, g = jax.value_and_grad(micro)(adapters, rows, jax.random.fold_in(key, i))
                return (loss + part, jax.tree.map(jnp.add, grads, g)), None

            zeros = jax.tree.map(jnp.zeros_like, adapters)
            steps = jnp.arange(batch.shape[0])
            (loss, grads), _ = jax.lax.scan(body, (jnp.float32(0.0), zeros), (batch, steps))
        return loss, grads

    def train_step(adapters, opt_state, base, batch, key, step, stop):
        # One optimizer step on `batch` (accum, rows, 5, S).
        loss, grads = loss_and_grads(adapters, base, batch, jax.random.fold_in(key, step))
        if masks is not None:
            grads = layers.apply(grads, masks)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        if masks is not None:
            updates = layers.apply(updates, masks)
        return optax.apply_updates(adapters, updates), opt_state, loss, grad_norm, jnp.any(stop)

    def eval_sums(adapters, base, rows):
        return sums(adapters, base, rows, None)

    return Program(
        init_state=jax.jit(opt.init, in_shardings=(adapter_sh,), out_shardings=state_sh),
        train_step=jax.jit(
            train_step,
            in_shardings=(adapter_sh, state_sh, base_sh, train_sh, replicated, replicated, flags),
            out_shardings=(adapter_sh, state_sh, replicated, replicated, replicated),
        ),
        loss_and_grads=jax.jit(
            loss_and_grads,
            in_shardings=(adapter_sh, base_sh, train_sh, replicated),
            out_shardings=(replicated, adapter_sh),
        ),
        eval_sums=jax.jit(
            eval_sums,
            in_shardings=(adapter_sh, base_sh, batch_sh),
            out_shardings=(replicated, replicated),
        ),
        base=base_sh,
        adapters=adapter_sh,
        state=state_sh,
        batch=batch_sh,
        train_batch=train_sh,
        replicated=replicated,
        flags=flags,
        load_base=named(mesh, load_specs),
    )
