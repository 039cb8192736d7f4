"""Checkpoints on orbax-checkpoint: adapters alone (small), or adapters + optimizer state + step.

Only adapter leaves are written; the base is never duplicated. Each checkpoint carries a JSON
manifest (adapter paths, shapes, dtypes, the kernel shape each adapter belongs to, the
`LoraConfig`), checked against the base before any array is read, so restoring into a model whose
paths or shapes differ fails with a clear error. Writes are atomic: orbax writes into a temporary
directory and renames it when complete, and `save_adapters` swaps a finished directory into place
in one step (`rslora_jax._files.swap_directory`), so an interrupted save never damages the last
good checkpoint and a reader never sees a mix of two.

Every checkpoint also records the size and SHA-256 of each file it wrote (``checksums.json``),
verified before a restore reads any array: a truncated file or a flipped byte is refused with
the file's name instead of restoring other values. `CheckpointManager.restore` then falls back
to the newest step that verifies and says which steps it skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rslora_jax import _files
from rslora_jax._types import PyTree
from rslora_jax.core.config import LoraConfig
from rslora_jax.core.tree import KERNEL, combine, iter_weights, join_path, split

FORMAT = "rslora_jax.adapters/1"
#: The file in each checkpoint directory that records its files' sizes and SHA-256.
CHECKSUMS_NAME = "checksums.json"
CHECKSUMS_FORMAT = "rslora_jax.checksums/1"


class CheckpointError(ValueError):
    """A checkpoint does not fit the parameters it is restored into, or is damaged."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint step was skipped (`CheckpointManager.restore` fell back)."""


# ---------------------------------------------------------------------------- checksums
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_files(directory: Path) -> list[Path]:
    files = [
        p
        for p in directory.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name != CHECKSUMS_NAME
    ]
    return sorted(files)


def write_checksums(directory: str | os.PathLike) -> None:
    """Records the size and SHA-256 of every file under `directory` in its ``checksums.json``.

    Example:
      >>> import tempfile
      >>> d = Path(tempfile.mkdtemp())
      >>> _ = (d / "a").write_bytes(b"data")
      >>> write_checksums(d); verify_checksums(d) is None
      True
    """
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _data_files(directory)
    }
    text = json.dumps({"format": CHECKSUMS_FORMAT, "files": files}, indent=1, sort_keys=True)
    _files.write_file(
        directory / CHECKSUMS_NAME,
        lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"),
        who="write_checksums",
    )


def verify_checksums(directory: str | os.PathLike) -> str | None:
    """Checks the files under `directory` against its ``checksums.json``.

    Returns:
      None if every recorded file is there with its size and SHA-256; otherwise what is wrong
      (the first damaged file). A directory without ``checksums.json`` (written before
      checksums were recorded) gives ``"no checksums"``.

    Example:
      >>> import tempfile
      >>> d = Path(tempfile.mkdtemp())
      >>> _ = (d / "a").write_bytes(b"data")
      >>> write_checksums(d)
      >>> _ = (d / "a").write_bytes(b"dat")
      >>> verify_checksums(d)
      'a is 3 bytes long, 4 were saved (truncated?)'
    """
    directory = Path(directory)
    record = directory / CHECKSUMS_NAME
    if not record.is_file():
        return "no checksums"
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        files = saved["files"]
        if saved.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{CHECKSUMS_NAME} is damaged"
    for name, info in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != info.get("size"):
            return f"{name} is {size} bytes long, {info.get('size')} were saved (truncated?)"
        if _sha256(path) != info.get("sha256"):
            return f"{name} does not have the SHA-256 it was saved with (damaged)"
    return None


# ---------------------------------------------------------------------------- manifest
def _leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
        out.append((join_path(tuple(keys)), leaf))
    return out


def _weight_shapes(base: PyTree) -> dict[str, tuple[int, ...]]:
    """``{where a weight's adapter leaves go: the weight's shape}`` for every weight (any name)."""
    return {join_path(ref.leaf_keys): tuple(h[KERNEL].shape) for ref, h in iter_weights(base)}


def manifest(params: PyTree, config: LoraConfig | None) -> dict[str, Any]:
    """What a checkpoint of `params`' adapters holds, as JSON-able data."""
    adapters, base = split(params)
    kernels = _weight_shapes(base)
    leaves = {}
    for path, leaf in _leaves_with_paths(adapters):
        holder = path.rsplit("/", 1)[0] if "/" in path else ""
        leaves[path] = {
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "kernel_shape": list(kernels[holder]) if holder in kernels else None,
        }
    cfg = None
    if config is not None:
        try:
            cfg = config.to_dict()
        except ValueError:
            cfg = None  # callable targets: not serialisable, the arrays are still fine
    return {"format": FORMAT, "leaves": leaves, "config": cfg}


def _check_against(man: Mapping[str, Any], base: PyTree, where: str) -> None:
    if man.get("format") != FORMAT:
        raise CheckpointError(
            f"{where}: not an rslora_jax checkpoint (format {man.get('format')!r})"
        )
    kernels = _weight_shapes(base)
    problems = []
    for path, info in man["leaves"].items():
        holder = path.rsplit("/", 1)[0] if "/" in path else ""
        if info.get("kernel_shape") is None:
            continue
        if holder not in kernels:
            problems.append(f"{holder!r}: no such kernel in the base parameters")
        elif tuple(info["kernel_shape"]) != kernels[holder]:
            problems.append(
                f"{holder!r}: checkpoint was made for a kernel of shape "
                f"{tuple(info['kernel_shape'])}, the base has {kernels[holder]}"
            )
    if problems:
        shown = "; ".join(sorted(set(problems))[:10])
        raise CheckpointError(
            f"{where} does not fit these base parameters ({len(set(problems))} problem(s)): {shown}"
        )


def _abstract(man: Mapping[str, Any], base: PyTree, shardings: PyTree | None) -> PyTree:
    """The adapter tree as ShapeDtypeStructs with target shardings."""
    tree: dict[str, Any] = {}
    flat_shardings = dict(_leaves_with_paths(shardings)) if shardings is not None else {}
    for path, info in man["leaves"].items():
        sharding = flat_shardings.get(path)
        if shardings is not None and sharding is None:
            raise CheckpointError(f"shardings has no entry for adapter leaf {path!r}")
        if sharding is None:
            sharding = _default_sharding()
        leaf = jax.ShapeDtypeStruct(
            tuple(info["shape"]), np.dtype(info["dtype"]), sharding=sharding
        )
        node = tree
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    _rekey_like(tree, base)
    return tree


def _rekey_like(tree: dict, base: Any) -> None:
    """Manifest paths are strings; give the tree the base's own key types (e.g. ints)."""
    if not isinstance(base, Mapping):
        return
    by_str = {str(k): k for k in base}
    for key in list(tree):
        real = by_str.get(key, key)
        val = tree.pop(key)
        tree[real] = val
        if isinstance(val, dict):
            _rekey_like(val, base.get(real))


# ---------------------------------------------------------------------------- adapters alone
def save_adapters(directory: str | os.PathLike, params: PyTree, config: LoraConfig | None = None):
    """Saves the adapters of `params` (not the base) to `directory`, atomically.

    The directory is written next to its final place and swapped in when complete; an existing
    checkpoint there is replaced only then.

    Args:
      directory: target directory (created; its parent must exist or is created).
      params: a tree with adapters (or the adapters alone).
      config: the adapter config, stored with the checkpoint (optional).

    Raises:
      ValueError: if `params` holds no adapters.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> from rslora_jax import LoraConfig, init
      >>> base = {"d": {"kernel": jnp.ones((4, 4))}}
      >>> cfg = LoraConfig(rank=2)
      >>> p = init(base, cfg, jax.random.key(0))
      >>> d = tempfile.mkdtemp() + "/ckpt"
      >>> save_adapters(d, p, cfg)
      >>> restored, restored_cfg = load_adapters(d, base)
      >>> bool((restored["d"]["lora_a"] == p["d"]["lora_a"]).all()), restored_cfg.rank
      (True, 2)
    """
    adapters, _ = split(params)
    if not jax.tree.leaves(adapters):
        raise ValueError(
            "save_adapters: params hold no adapter leaves (keys starting with 'lora_')"
        )
    target = Path(directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        _files.clean_staging(target)  # what a killed save left
    tmp = target.parent / _staging_name(target)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        checkpointer.save(
            tmp,
            args=ocp.args.Composite(
                adapters=ocp.args.StandardSave(adapters),
                manifest=ocp.args.JsonSave(manifest(params, config)),
            ),
        )
        checkpointer.wait_until_finished() if hasattr(checkpointer, "wait_until_finished") else None
        _barrier("rslora_jax.save_adapters: written")
        if jax.process_index() == 0:
            write_checksums(tmp)
        _swap_into_place(tmp, target)
        _barrier("rslora_jax.save_adapters")
    finally:
        checkpointer.close()
        if jax.process_index() == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _staging_name(target: Path) -> str:
    """The staging directory's name: the same in every process. With one process it carries
    the host and pid, so that a later save removes it if this process is killed
    (`rslora_jax._files.clean_staging`)."""
    token = _shared_token()
    if jax.process_count() == 1:
        return f"{_files.staging_prefix(target)}{token}"
    return f".{target.name}.tmp-{token}"


def _shared_token() -> str:
    """A random token that every process of a multi-process run agrees on."""
    token = np.int32(uuid.uuid4().int & 0x7FFFFFFF)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = multihost_utils.broadcast_one_to_all(token)
    return f"{int(token):08x}"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _default_sharding() -> jax.sharding.Sharding:
    """The first local device with one process; replicated over all devices otherwise."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Process 0 swaps the finished directory in (see `rslora_jax._files.swap_directory`)."""
    if jax.process_index() == 0:
        _files.swap_directory(tmp, target)


def load_adapters(
    directory: str | os.PathLike, params: PyTree, *, shardings: PyTree | None = None
) -> tuple[PyTree, LoraConfig | None]:
    """Restores adapters saved by `save_adapters` into `params`.

    Args:
      directory: the checkpoint directory.
      params: the base parameters (adapters already in it are replaced).
      shardings: optional tree of `jax.sharding.Sharding` for the adapter leaves (e.g. the
        adapter part of `partition_specs` as NamedShardings); default: the first device.

    Returns:
      ``(params_with_adapters, config)``; ``config`` is None if none was stored.

    Raises:
      CheckpointError: (a ValueError) if the directory is not an adapter checkpoint (empty, a
        PEFT adapter, a Hugging Face model, training checkpoints: the message says which and
        what reads it), if a file differs from what was saved (its checksum), or if the
        checkpoint's paths or kernel shapes do not match `params`; all checked before any
        array is read.
      FileNotFoundError: if `directory` does not exist.
    """
    path = Path(directory).absolute()
    _files.recover_directory(path)  # a save interrupted between two renames
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter checkpoint at {str(path)!r}")
    what = _not_an_adapter_checkpoint(path)
    if what:
        raise CheckpointError(f"load_adapters: {str(path)!r} {what}")
    problem = verify_checksums(path)
    if problem not in (None, "no checksums"):
        raise CheckpointError(f"load_adapters: adapter checkpoint {str(path)!r}: {problem}")
    _, base = split(params)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        man = checkpointer.restore(path, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))[
            "manifest"
        ]
        _check_against(man, base, f"adapter checkpoint {str(path)!r}")
        if shardings is not None:
            shardings, _ = split(shardings) if _has_adapter_keys(shardings) else (shardings, None)
        abstract = _abstract(man, base, shardings)
        restored = checkpointer.restore(
            path, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(abstract))
        )["adapters"]
    except CheckpointError:
        raise
    except Exception as err:  # orbax / tensorstore: pages of text; say which checkpoint
        raise CheckpointError(
            f"load_adapters: adapter checkpoint {str(path)!r} cannot be read "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from err
    finally:
        checkpointer.close()
    config = LoraConfig.from_dict(man["config"]) if man.get("config") else None
    return combine(restored, base), config


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def _not_an_adapter_checkpoint(path: Path) -> str | None:
    """What `path` is instead of an adapter checkpoint (a phrase), or None if it may be one."""
    names = {p.name for p in path.iterdir()}
    if not names:
        return "is empty: no adapter checkpoint there (rslora_jax.save_adapters writes one)"
    if "adapter_config.json" in names:
        return (
            "holds a PEFT adapter (adapter_config.json), not an rslora_jax adapter checkpoint: "
            "load it with rslora_jax.hf.import_peft(directory, base_params, model_config)"
        )
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return (
            "holds a Hugging Face model (config.json + safetensors), not an adapter checkpoint: "
            "load it with rslora_jax.hf.load_pretrained"
        )
    steps = sorted(int(n) for n in names if n.isdigit() and (path / n / "manifest").is_dir())
    if steps and "manifest" not in names:
        return (
            f"holds training checkpoints (steps {steps}), not one adapter checkpoint: restore "
            "them with rslora_jax.CheckpointManager(directory).restore(...), or load one "
            f"step's adapters with load_adapters(directory / '{steps[-1]}', ...)"
        )
    if "manifest" not in names:
        shown = sorted(names)[:8]
        return (
            f"is not an rslora_jax adapter checkpoint (no manifest; it holds {shown}): "
            "rslora_jax.save_adapters writes one"
        )
    return None


def _has_adapter_keys(tree: Any) -> bool:
    return isinstance(tree, Mapping) and bool(split(tree)[0])


# ---------------------------------------------------------------------------- training state
class CheckpointManager:
    """Periodic checkpoints of adapters + optimizer state + step (+ JSON extras) for resuming.

    A thin layer over `orbax.checkpoint.CheckpointManager`: keeps the last ``max_to_keep``
    steps, writes each step atomically with the checksums of its files, and restores onto the
    shardings of the templates it is given, falling back to an older step when the newest one
    is damaged. Under ``jax.distributed`` every process calls `save` and `restore` together.

    Args:
      directory: where step directories go.
      config: the adapter config, stored in each step's manifest.
      max_to_keep: how many steps to keep.
      save_interval_steps: `save` skips steps that are not multiples of this (unless forced).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> from rslora_jax import LoraConfig, init, optimizer, split
      >>> cfg = LoraConfig(rank=2)
      >>> p = init({"d": {"kernel": jnp.ones((4, 4))}}, cfg, jax.random.key(0))
      >>> opt = optimizer(optax.adam(1e-3), p)
      >>> state = opt.init(split(p)[0])
      >>> with CheckpointManager(tempfile.mkdtemp(), config=cfg) as mngr:
      ...     _ = mngr.save(10, p, state, extra={"seed": 0})
      ...     p2, state2, step, extra = mngr.restore(p, state)
      >>> step, extra
      (10, {'seed': 0})
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        config: LoraConfig | None = None,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
    ):
        if max_to_keep < 1:
            raise ValueError(f"CheckpointManager(max_to_keep=...) must be >= 1, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(
                f"CheckpointManager(save_interval_steps=...) must be >= 1, got {save_interval_steps}"
            )
        self.directory = Path(directory).absolute()
        self.config = config
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_interval_steps,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,  # what a killed save left behind
            ),
        )

    def step_directory(self, step: int) -> Path:
        """The directory of one step."""
        return self.directory / str(int(step))

    def save(
        self,
        step: int,
        params: PyTree,
        opt_state: PyTree,
        *,
        extra: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves the adapters of `params`, `opt_state` and `extra` (JSON) at `step`.

        Returns:
          Whether a checkpoint was written (False for steps skipped by ``save_interval_steps``).
        """
        adapters, _ = split(params)
        saved = self._manager.save(
            int(step),
            args=ocp.args.Composite(
                adapters=ocp.args.StandardSave(adapters),
                opt_state=ocp.args.StandardSave(opt_state),
                manifest=ocp.args.JsonSave(manifest(params, self.config)),
                extra=ocp.args.JsonSave(dict(extra or {})),
            ),
            force=force,
        )
        if saved:
            self._manager.wait_until_finished()
            _barrier("rslora_jax.CheckpointManager.save: written")
            if jax.process_index() == 0:
                write_checksums(self.step_directory(step))
            _barrier("rslora_jax.CheckpointManager.save: checksums")
        return saved

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps saved (complete ones), oldest first."""
        return sorted(self._manager.all_steps())

    def verify(self, step: int) -> str | None:
        """None if step `step`'s files are as they were saved; else what is wrong.

        A step saved before checksums were recorded gives ``"no checksums"``.
        """
        return verify_checksums(self.step_directory(step))

    def delete(self, step: int) -> None:
        """Deletes step `step` (e.g. a damaged one that `restore` skipped)."""
        self._manager.delete(int(step))

    def restore(
        self,
        params: PyTree,
        opt_state: PyTree,
        *,
        step: int | None = None,
        shardings: PyTree | None = None,
        on_skip: Callable[[int, str], None] | None = None,
    ) -> tuple[PyTree, PyTree, int, dict[str, Any]]:
        """Restores step `step` (default: the newest that verifies) into `params` and
        `opt_state`'s structure.

        Each step's files are checked against the checksums recorded when it was saved before
        any array is read. Without `step`, a damaged step (a truncated or changed file, or one
        orbax cannot read) is skipped and the next older one is tried; each skipped step is
        reported through `on_skip` (default: a `CheckpointWarning`). A step saved before
        checksums were recorded is restored unverified.

        Args:
          params: the base (or a tree with adapters, which are replaced).
          opt_state: a template for the optimizer state (arrays or `jax.ShapeDtypeStruct`,
            e.g. ``jax.eval_shape(opt.init, adapters)``); restored arrays take its shardings.
          step: which step; default the newest that verifies.
          shardings: shardings for the adapter leaves (default: those of the adapters in
            `params` if present, else the first device).
          on_skip: called with ``(step, what is wrong)`` for each damaged step skipped.

        Returns:
          ``(params_with_adapters, opt_state, step, extra)``.

        Raises:
          FileNotFoundError: if there is no checkpoint.
          CheckpointError: if the checkpoint does not fit `params`, if the given `step` is
            damaged, or if no step verifies (the message lists what is wrong with each).
        """
        if step is not None:
            problem = self._problem(int(step))
            if problem:
                raise CheckpointError(
                    f"checkpoint step {int(step)} in {str(self.directory)!r}: {problem}"
                )
            return self._restore(int(step), params, opt_state, shardings)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {str(self.directory)!r}")
        if on_skip is None:
            on_skip = _warn_skipped
        problems = self._agreed_problems(steps)
        skipped = []
        for candidate in reversed(steps):
            problem = problems[candidate]
            if not problem:
                try:
                    return self._restore(candidate, params, opt_state, shardings)
                except CheckpointError:
                    raise
                except Exception as err:  # orbax cannot read it (a damaged unverified step)
                    if jax.process_count() > 1:
                        raise
                    problem = f"orbax cannot read it ({type(err).__name__}: {_first_line(err)})"
            skipped.append(f"step {candidate}: {problem}")
            on_skip(candidate, problem)
        raise CheckpointError(
            f"no checkpoint under {str(self.directory)!r} can be restored: {'; '.join(skipped)}"
        )

    def _problem(self, step: int) -> str | None:
        problem = self.verify(step)
        return None if problem == "no checksums" else problem

    def _agreed_problems(self, steps: list[int]) -> dict[int, str | None]:
        """Each step's problem; with several processes, a step is damaged if any sees it so."""
        problems = {s: self._problem(s) for s in steps}
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            mine = np.array([problems[s] is not None for s in steps], np.int32)
            anyone = np.asarray(multihost_utils.process_allgather(mine)).max(axis=0)
            for s, bad in zip(steps, anyone):
                if bad and problems[s] is None:
                    problems[s] = "another process found it damaged"
        return problems

    def _restore(
        self, step: int, params: PyTree, opt_state: PyTree, shardings: PyTree | None
    ) -> tuple[PyTree, PyTree, int, dict[str, Any]]:
        current, base = split(params)
        man = self._manager.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))[
            "manifest"
        ]
        _check_against(man, base, f"checkpoint step {step} in {str(self.directory)!r}")
        if shardings is None and jax.tree.leaves(current):
            shardings = jax.tree.map(
                lambda x: x.sharding if hasattr(x, "sharding") else None, current
            )
        abstract = _abstract(man, base, shardings)
        state_abstract = jax.tree.map(_as_abstract, opt_state)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                adapters=ocp.args.StandardRestore(abstract),
                opt_state=ocp.args.StandardRestore(state_abstract),
                extra=ocp.args.JsonRestore(),
            ),
        )
        return combine(out["adapters"], base), out["opt_state"], step, dict(out["extra"] or {})

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _warn_skipped(step: int, problem: str) -> None:
    warnings.warn(
        f"checkpoint step {step} is damaged ({problem}); trying an older one",
        CheckpointWarning,
        stacklevel=3,
    )


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x


__all__ = [
    "CHECKSUMS_NAME",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointWarning",
    "load_adapters",
    "manifest",
    "save_adapters",
    "verify_checksums",
    "write_checksums",
]
