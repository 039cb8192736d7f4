"""What the commands share: usage errors and exit codes, the parser, argument types, meshes,
the progress bar.

A command reports bad input by raising `UsageError` (argparse's own errors become one too, see
`ArgumentParser`); its ``main`` prints ``<prog>: error: <message>`` and returns `EXIT_USAGE`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

#: Exit status for bad input (as argparse's).
EXIT_USAGE = 2
#: Exit status after a Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130
#: The dtypes a command accepts for activations, parameters and exports.
DTYPES = ("float32", "bfloat16", "float16")
#: The device-mesh axes: batch (``data``), batch + FSDP-sharded base (``fsdp``), tensor
#: parallelism (``model``); see `rslora_jax.models.sharding`.
MESH_AXES = ("data", "fsdp", "model")


class UsageError(ValueError):
    """Bad input to a command: reported as ``<prog>: error: ...``, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults in the help, except ``None`` and ``False`` ones."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help  # no "(default: None)"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors raise `UsageError` instead of exiting."""

    def error(self, message: str) -> Any:  # argparse's own errors go through UsageError too
        raise UsageError(message)


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= low``; `what` names them in the error.

    Example:
      >>> int_at_least(1, "a positive integer")("3")
      3
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
nonnegative_int = int_at_least(0, "an integer >= 0")


def float_in(
    low: float, high: float, *, low_open: bool = True, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type`` for finite numbers in an interval (open or closed at each end).

    Example:
      >>> float_in(0.0, 1.0, high_open=True)("0.25")
      0.25
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(
                f"expected a number in {lo}{low}, {high}{hi}, got {text!r}"
            )
        return value

    return parse


def parse_mesh(spec: str | None) -> dict[str, int]:
    """Parses ``--mesh`` ("data=2,model=4") into ``{"data": 2, "model": 4}``.

    Raises:
      UsageError: for unknown axes, repeated axes or sizes that are not positive integers.

    Example:
      >>> parse_mesh("data=2,model=4")
      {'data': 2, 'model': 4}
    """
    if spec is None:
        return {}
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = (s.strip() for s in part.partition("="))
        if not sep or name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise UsageError(
                f"--mesh {spec!r}: expected AXIS=SIZE,... with AXIS in {', '.join(MESH_AXES)} "
                f"and SIZE a positive integer (e.g. 'data=2,model=4'); got {part!r}"
            )
        if name in axes:
            raise UsageError(f"--mesh {spec!r}: axis {name!r} is given twice")
        axes[name] = int(size)
    return axes


def check_model(model: Any, default: Any, **overrides: Any) -> tuple[Any, Any, Any]:
    """``(directory, transformers config, our model config)`` of ``--model``, every check made
    before any weight is read (the safetensors headers and index against the config).

    Args:
      model: the ``--model`` path, or None for `default`.
      default: the built-in base's directory.
      **overrides: runtime fields of the family's config (``dtype``, ``remat``, ...).

    Raises:
      UsageError: naming ``--model`` and what is wrong (no directory, no config.json, an
        unknown family, PyTorch pickles instead of safetensors, headers that do not fit).
    """
    from pathlib import Path

    from rslora_jax.hf import check_pretrained, load_config
    from rslora_jax.models.families import family

    model_dir = Path(model if model is not None else default).expanduser().absolute()
    what = f"--model {str(model_dir)!r}"
    if not model_dir.is_dir():
        raise UsageError(
            f"{what}: no such directory; give a Hugging Face checkpoint directory "
            "(config.json + model.safetensors)"
        )
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{what}: no config.json; is this a Hugging Face checkpoint directory?")
    try:
        hf_config = load_config(model_dir)
        config = family(hf_config.model_type, "--model").from_hf(hf_config, **overrides)
    except (ValueError, OSError, TypeError, KeyError) as err:
        raise UsageError(f"{what}: {err}") from None
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not any((model_dir / w).is_file() for w in weights):
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (
            f" (it has PyTorch pickles {pickles}: convert them to safetensors with "
            "transformers' save_pretrained(..., safe_serialization=True))"
            if pickles
            else ""
        )
        raise UsageError(f"{what}: no model.safetensors or model.safetensors.index.json{hint}")
    try:  # every header and the index against the config, before anything is created
        check_pretrained(model_dir)
    except (ValueError, OSError) as err:
        raise UsageError(f"{what}: {err}") from None
    return model_dir, hf_config, config


def check_tokenizer(tokenizer: Any, model_dir: Any) -> tuple[Any, Any]:
    """``(directory, tokenizer)`` of ``--tokenizer`` (default: the model's directory).

    Raises:
      UsageError: naming the flag and directory when it has no tokenizer files or the loader
        fails.
    """
    from pathlib import Path

    from rslora_jax.hf import load_tokenizer

    tok_dir = Path(tokenizer if tokenizer is not None else model_dir).expanduser().absolute()
    flag = "--tokenizer" if tokenizer is not None else "--model"
    files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not tok_dir.is_dir() or not any((tok_dir / f).is_file() for f in files):
        raise UsageError(
            f"{flag} {str(tok_dir)!r}: no tokenizer files (tokenizer.json, tokenizer.model, ...); "
            "pass --tokenizer DIR"
        )
    try:
        return tok_dir, load_tokenizer(tok_dir)
    except Exception as err:  # a third-party loader: report whatever it says
        raise UsageError(f"{flag} {str(tok_dir)!r}: the tokenizer does not load: {err}") from None


def check_divisible(tree: Any, specs: Any, mesh: Any, spec_text: str | None) -> None:
    """Raises `UsageError` naming the first leaf of `tree` whose sharded dimension (by the
    matching `PartitionSpec` of `specs`) is not divisible by its mesh axes' sizes.

    Args:
      tree: a pytree of arrays or shapes (`jax.ShapeDtypeStruct`).
      specs: the same structure of `PartitionSpec`s.
      mesh: a `jax.sharding.Mesh`.
      spec_text: the ``--mesh`` text, for the message.
    """
    import jax
    from jax.sharding import PartitionSpec

    flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(tree), flat):
        for dim, entry in zip(leaf.shape, spec):
            for name in (entry,) if isinstance(entry, str) else (entry or ()):
                if dim % mesh.shape[name]:
                    where = "/".join(str(getattr(k, "key", k)) for k in path)
                    raise UsageError(
                        f"--mesh {spec_text!r}: {where} has shape {tuple(leaf.shape)}; its "
                        f"dimension {dim} is not divisible by mesh axis {name!r} of size "
                        f"{mesh.shape[name]}: choose axis sizes that divide the model's widths"
                    )


def progress_bar(total: int, *, initial: int = 0, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr (tqdm is imported here, not with the package); None if disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        desc=desc,
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stderr,
    )


def log(bar: Any, message: str) -> None:
    """Prints `message` to stdout above the progress bar `bar` (or plainly, when it is None)."""
    if bar is not None:
        bar.write(message, file=sys.stdout)
    else:
        print(message, flush=True)
    sys.stdout.flush()
