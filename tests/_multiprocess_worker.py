"""One process of the multi-process test (tests/test_multiprocess.py), and its shared pieces.

Run as a script, it joins a ``jax.distributed`` runtime of CPU processes on localhost (gloo
collectives, 2 CPU devices per process), builds a global (2, 2) mesh, and either trains a few
steps and checkpoints (``--phase train``) or restores and continues (``--phase resume``).
Imported, it gives the test the same `Run` to compute the single-process reference.

Everything that decides the numbers (model, data, config, optimizer, shardings) is here, so the
multi-process and the single-process runs compute the same global program.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

D_IN, HIDDEN, MID, D_OUT = 16, 32, 16, 8
GLOBAL_BATCH = 8
FIRST_STEPS, TOTAL_STEPS = 3, 6
DATA_SEED = 1234
MESH_SHAPE, MESH_AXES = (2, 2), ("data", "model")
# FSDP: every kernel's input axis split over all four devices (both processes).
FSDP = P(("data", "model"), None)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(HIDDEN, name="up")(x))
        h = nn.gelu(nn.Dense(MID, name="mid")(h))
        return nn.Dense(D_OUT, name="down")(h)


def config():
    import rslora_jax as rl

    return rl.LoraConfig(rank=4, alpha=8.0, rank_pattern={"down": 2})


LR = 2e-2


def tx():
    return optax.adamw(LR, weight_decay=0.01)


def rows(step: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows start:stop of the global batch of `step`: each row has its own generator, so a
    process builds its own rows without the others'."""
    xs, ys = [], []
    for i in range(start, stop):
        rng = np.random.default_rng([DATA_SEED, step, i])
        x = rng.standard_normal(D_IN).astype(np.float32)
        xs.append(x)
        ys.append(np.tanh(x[:D_OUT] * 2.0 - x[D_OUT:]).astype(np.float32))
    return np.stack(xs), np.stack(ys)


class Run:
    """Model, shardings, jitted step and data on a (2, 2) mesh."""

    def __init__(self, mesh: jax.sharding.Mesh):
        import rslora_jax as rl

        self.rl = rl
        self.mesh = mesh
        self.cfg = config()
        model = Net()
        sample = jnp.ones((1, D_IN), jnp.float32)
        abstract = jax.eval_shape(model.init, jax.random.key(0), sample)["params"]
        base_specs = jax.tree_util.tree_map_with_path(
            lambda path, _: FSDP if path[-1].key == "kernel" else P(), abstract
        )
        full = jax.eval_shape(lambda p, k: rl.init(p, self.cfg, k), abstract, jax.random.key(1))
        ad_specs, base_specs = rl.split(rl.partition_specs(full, base_specs, self.cfg))
        self.opt = rl.optimizer(tx())
        ad_abstract = rl.split(full)[0]
        st_specs = rl.opt_state_specs(self.opt, ad_abstract, ad_specs)

        def named(tree):
            return jax.tree.map(
                lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda s: isinstance(s, P)
            )

        self.ad_sh, self.base_sh, self.st_sh = named(ad_specs), named(base_specs), named(st_specs)
        self.batch_sh = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        # Every process computes its own shards of the same global values.
        self.base = jax.jit(lambda k: model.init(k, sample)["params"], out_shardings=self.base_sh)(
            jax.random.key(0)
        )
        self.adapters = jax.jit(
            lambda k: rl.init_adapters(abstract, self.cfg, k), out_shardings=self.ad_sh
        )(jax.random.key(1))
        self.opt_state = jax.jit(self.opt.init, out_shardings=self.st_sh)(self.adapters)
        self.state_template = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            jax.eval_shape(self.opt.init, ad_abstract),
            self.st_sh,
        )
        apply = rl.lora(model.apply, self.cfg)
        opt = self.opt

        def step(adapters, state, base, x, y):
            def loss(ad):
                out = apply({"params": rl.combine(ad, base)}, x)
                return jnp.mean((out - y) ** 2)

            value, grads = jax.value_and_grad(loss)(adapters)
            updates, state = opt.update(grads, state, adapters)
            return optax.apply_updates(adapters, updates), state, value

        self.step = jax.jit(
            step,
            in_shardings=(self.ad_sh, self.st_sh, self.base_sh, self.batch_sh, self.batch_sh),
            out_shardings=(self.ad_sh, self.st_sh, replicated),
        )

    def local_rows(self) -> slice:
        from rslora_jax.distributed import local_slice

        return local_slice(self.batch_sh, (GLOBAL_BATCH, D_IN))[0]

    def batch(self, step: int):
        from rslora_jax.distributed import make_global_batch

        r = self.local_rows()
        x, y = rows(step, r.start, r.stop)
        return make_global_batch((x, y), self.batch_sh, GLOBAL_BATCH)

    def train(self, start: int, stop: int) -> list[float]:
        losses = []
        for t in range(start, stop):
            x, y = self.batch(t)
            self.adapters, self.opt_state, value = self.step(
                self.adapters, self.opt_state, self.base, x, y
            )
            losses.append(float(value.addressable_data(0)))
        return losses

    def gathered_adapters(self) -> dict[str, np.ndarray]:
        from jax.experimental import multihost_utils

        full = multihost_utils.process_allgather(self.adapters, tiled=True)
        out = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(full):
            out["/".join(k.key for k in path)] = np.asarray(leaf)
        return out

    def save(self, directory: Path, step: int, losses: list[float]) -> None:
        rl = self.rl
        params = rl.combine(self.adapters, self.base)
        with rl.CheckpointManager(directory / "run", config=self.cfg) as mngr:
            mngr.save(step, params, self.opt_state, extra={"losses": losses})
        # The small adapter-only checkpoint, written by all processes together too.
        rl.save_adapters(directory / "adapters", params, self.cfg)

    def restore(self, directory: Path) -> tuple[int, list[float]]:
        rl = self.rl
        with rl.CheckpointManager(directory / "run", config=self.cfg) as mngr:
            params, state, step, extra = mngr.restore(
                self.base, self.state_template, shardings=self.ad_sh
            )
        self.adapters, self.opt_state = rl.split(params)[0], state
        alone, _ = rl.load_adapters(directory / "adapters", self.base, shardings=self.ad_sh)
        for a, b in zip(jax.tree.leaves(rl.split(alone)[0]), jax.tree.leaves(self.adapters)):
            if not bool(jnp.array_equal(a, b)):
                raise AssertionError("save_adapters/load_adapters differ from the manager's copy")
        return step, list(extra["losses"])


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """The (2, 2) mesh, over all devices of all processes unless `devices` is given.

    jax.make_mesh keeps each process's devices together: mesh row i holds process i's two
    devices, so the batch axis ('data') splits over processes and FSDP's ('data', 'model') over
    all four devices (the test checks both).
    """
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=auto, devices=devices)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("train", "resume"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(
        f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=300,  # JAX's default; busy machines start processes slowly
    )
    pid = jax.process_index()
    run = Run(make_mesh())
    kernel = run.base["up"]["kernel"]
    info = {
        "process_index": pid,
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "rows": [run.local_rows().start, run.local_rows().stop],
        "kernel_shape": list(kernel.shape),
        "kernel_local_shards": sorted(
            [list(s.data.shape), s.index[0].start or 0] for s in kernel.addressable_shards
        ),
        "kernel_fully_addressable": kernel.is_fully_addressable,
    }
    if args.phase == "train":
        losses = run.train(0, FIRST_STEPS)
        run.save(args.dir, FIRST_STEPS, losses)
        gathered = run.gathered_adapters()
        name = "first"
    else:
        step, losses = run.restore(args.dir)
        info["restored_step"] = step
        restored = run.gathered_adapters()
        losses = losses + run.train(step, TOTAL_STEPS)
        gathered = run.gathered_adapters()
        gathered.update({f"restored:{k}": v for k, v in restored.items()})
        name = "resumed"
    (args.dir / f"{name}-info-{pid}.json").write_text(json.dumps(info))
    if pid == 0:
        np.savez(args.dir / f"{name}.npz", losses=np.asarray(losses), **gathered)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
