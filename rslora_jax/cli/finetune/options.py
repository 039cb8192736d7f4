"""The instruction-tuning and adapter-method flags of ``rslora-finetune``, and their parsers.

`add_data_options`, `add_method_options`, `add_training_options` and `add_output_options` add
argument groups to the command's parser (`rslora_jax.cli.finetune.args.build_parser`); the
parsers here turn ``--rank-pattern``, ``--targets`` and ``--layers`` values into what
`rslora_jax.LoraConfig` takes, raising `UsageError` that names the flag.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

from rslora_jax.cli.common import UsageError, float_in, positive_int
from rslora_jax.core.config import ALL_LINEAR

#: ``--data`` entries naming a built-in data set start with this.
BUILTIN_PREFIX = "builtin:"
#: What ``--data`` means when it is not given.
DEFAULT_DATA = "builtin:instruct"
METHODS = ("lora", "rasa", "dora")
INITS = ("kaiming", "gaussian", "pissa", "olora")
DATA_FORMATS = ("auto", "text", "completion", "alpaca", "chat")
TRACKERS = ("tensorboard", "wandb", "none")
_REGEX_CHARS = set("\\^$.|?*+()[]{}")


def _checked(parse: Any) -> Any:
    """An argparse ``type`` from a parser that raises `UsageError`: argparse then names the flag
    (and ``--config`` the file and line)."""

    def check(text: str) -> Any:
        try:
            return parse(text)
        except UsageError as err:
            message = str(err)  # "--flag 'value': what is wrong" -> "'value': what is wrong"
            if message.startswith("--"):
                message = message.split(" ", 1)[-1]
            raise argparse.ArgumentTypeError(message) from None

    return check


def add_data_options(g: argparse._ArgumentGroup) -> None:
    """Data format, chat template, prompt masking and packing flags."""
    g.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default="auto",
        help="row format of structured files (auto: per row, 'messages' -> chat, "
        "'prompt'+'completion', 'instruction'+'output' (Alpaca, trained as a chat), else text)",
    )
    g.add_argument(
        "--chat-template",
        metavar="FILE",
        type=Path,
        default=None,
        help="Jinja chat template for chat and Alpaca rows (a template file, or a JSON file with "
        "a 'chat_template' entry); default: the tokenizer's own, or a built-in Zephyr-style "
        "template (rslora_jax.data.DEFAULT_CHAT_TEMPLATE) when it has none",
    )
    g.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="count every token in the loss (default: only completions / outputs / assistant "
        "turns; plain text always counts)",
    )
    g.add_argument(
        "--no-packing",
        action="store_true",
        help="one example per row (default: several short examples share a row, each attending "
        "only to itself, positions restarting)",
    )


def add_method_options(g: argparse._ArgumentGroup) -> None:
    """Adapter method, initialiser, LoRA+, per-layer ranks and layer selection."""
    g.add_argument(
        "--method",
        choices=METHODS,
        default="lora",
        help="adapter method: lora (with --scaling rslora: rsLoRA), rasa (rank sharing across "
        "layers, He et al. 2025; no PEFT format: the merged model is the export), dora",
    )
    g.add_argument(
        "--rasa-k",
        type=positive_int,
        default=None,
        help="RaSA: ranks each layer shares (default max(rank // 8, 1))",
    )
    g.add_argument(
        "--rasa-init",
        choices=("paper", "rslora"),
        default="paper",
        help="RaSA's diagonal at init: alpha/(2(r-k)) (paper) or alpha/(2 sqrt(r-k)) "
        "(rank-stabilised, ours)",
    )
    g.add_argument(
        "--init",
        type=_checked(parse_init),
        default="kaiming",
        help="adapter init: kaiming (PEFT's default), gaussian (A ~ N(0, 1/d_in)), pissa, "
        "pissa_niter_N (randomized SVD), olora (the last three change the base to W - "
        "gamma*A@B; the exports account for it)",
    )
    g.add_argument(
        "--lora-plus-ratio",
        type=float_in(0.0, math.inf, high_open=True),
        default=None,
        help="LoRA+: learning rate of B (and DoRA's magnitude, RaSA's diagonal) over A's",
    )
    g.add_argument(
        "--rank-pattern",
        metavar="REGEX=R,...",
        type=_checked(lambda t: (parse_pattern("--rank-pattern", t, int), t)[1]),
        default=None,
        help="per-layer ranks, PEFT's rule (a regex matching the end of a path such as "
        "model/layers/mlp/down_proj), e.g. 'down_proj=32,self_attn/.*=8'",
    )
    g.add_argument(
        "--alpha-pattern",
        metavar="REGEX=ALPHA,...",
        type=_checked(lambda t: (parse_pattern("--alpha-pattern", t, float), t)[1]),
        default=None,
        help="per-layer alphas, same rule as --rank-pattern",
    )
    g.add_argument(
        "--layers",
        metavar="SPEC",
        default=None,
        help="adapt only these decoder layers, e.g. '0-7' or '0,2,5-6' (default: all). The "
        "layers are scanned (one stacked kernel per projection): the others keep their initial "
        "adapter, frozen (zero for kaiming/gaussian)",
    )


def add_training_options(g: argparse._ArgumentGroup) -> None:
    """Gradient accumulation."""
    g.add_argument(
        "--grad-accum",
        type=positive_int,
        default=1,
        help="micro-batches of --batch-size rows per optimizer step (the loss is the mean over "
        "the counted tokens of all of them, as one step on the whole batch)",
    )


def add_output_options(g: argparse._ArgumentGroup) -> None:
    """Experiment tracking and the configuration file."""
    g.add_argument(
        "--report-to",
        type=_checked(lambda t: (parse_trackers(t), t)[1]),
        default="tensorboard",
        help="experiment trackers, comma-separated: tensorboard (event files in --out/tb, "
        "needs tensorboardX), wandb (needs wandb installed), none",
    )
    g.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=None,
        help="read flags from a YAML (.yaml/.yml) or TOML (.toml) file of 'flag: value' "
        "entries (e.g. 'rank: 32', 'data: [a.jsonl]'); flags on the command line override it",
    )


# --------------------------------------------------------------------------------------------
# Parsers


def parse_targets(text: str) -> Any:
    """``--targets``: ``'all-linear'``, a comma list of module names, or a regex.

    A value with regex characters (``.*()[]|`` ...) is a regex fullmatched against paths such
    as ``model/layers/self_attn/q_proj``; otherwise it is a list of names matched against the
    end of the path (PEFT's ``target_modules`` rule).

    Example:
      >>> parse_targets("q_proj, v_proj"), parse_targets(".*self_attn/(q|v)_proj")
      (('q_proj', 'v_proj'), '.*self_attn/(q|v)_proj')
    """
    text = text.strip()
    if text == ALL_LINEAR:
        return ALL_LINEAR
    if set(text) & _REGEX_CHARS:
        try:
            re.compile(text)
        except re.error as err:
            raise UsageError(f"--targets {text!r}: invalid regex: {err}") from None
        return text
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise UsageError(f"--targets {text!r}: give 'all-linear', module names or a regex")
    return names


def parse_pattern(flag: str, text: str | None, kind: type) -> dict[str, Any]:
    """``--rank-pattern`` / ``--alpha-pattern``: ``'regex=value,...'`` as a dict.

    A comma inside a regex (``{1,2}``) stays with it: a piece without ``=`` joins the previous.

    Example:
      >>> parse_pattern("--rank-pattern", "down_proj=32,self_attn/.*=8", int)
      {'down_proj': 32, 'self_attn/.*': 8}
    """
    if text is None or not text.strip():
        return {}
    pieces: list[str] = []
    for piece in text.split(","):
        if "=" not in piece and pieces:
            pieces[-1] += "," + piece
        else:
            pieces.append(piece)
    out: dict[str, Any] = {}
    for piece in pieces:
        key, sep, value = piece.rpartition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{flag} {text!r}: expected REGEX=VALUE,...; got {piece!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise UsageError(f"{flag} {text!r}: invalid regex {key!r}: {err}") from None
        try:
            parsed = kind(value.strip())
        except ValueError:
            parsed = None
        if parsed is None or not (parsed > 0) or (kind is float and not math.isfinite(parsed)):
            what = "a positive integer" if kind is int else "a positive number"
            raise UsageError(f"{flag} {text!r}: the value of {key!r} must be {what}, got {value!r}")
        out[key] = parsed
    return out


def parse_layers(text: str | None, num_layers: int) -> tuple[int, ...] | None:
    """``--layers``: ``'0-7'``, ``'0,2,5-6'`` -> sorted layer indices (None: all layers).

    Raises:
      UsageError: for a malformed spec or an index the model does not have.

    Example:
      >>> parse_layers("0,2,5-6", 8)
      (0, 2, 5, 6)
    """
    if text is None:
        return None
    chosen: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(
                f"--layers {text!r}: expected indices and ranges such as '0-7' or '0,2,5-6', "
                f"got {part!r}"
            )
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"--layers {text!r}: range {part.strip()!r} is empty")
        chosen.update(range(lo, hi + 1))
    if max(chosen) >= num_layers:
        raise UsageError(
            f"--layers {text!r}: the model has {num_layers} layers (0-{num_layers - 1})"
        )
    return tuple(sorted(chosen))


def parse_init(text: str) -> str:
    """``--init`` as `rslora_jax.LoraConfig` spells it.

    Example:
      >>> parse_init("kaiming"), parse_init("pissa_niter_4")
      ('kaiming_uniform', 'pissa_niter_4')
    """
    name = text.strip().lower()
    if name in ("kaiming", "kaiming_uniform"):
        return "kaiming_uniform"
    if name in ("gaussian", "pissa", "olora") or re.fullmatch(r"pissa_niter_\d+", name):
        return name
    raise UsageError(
        f"--init {text!r}: unknown initialiser; expected one of {', '.join(INITS)} or pissa_niter_N"
    )


def parse_trackers(text: str) -> tuple[str, ...]:
    """``--report-to``: the trackers, without ``none``.

    Example:
      >>> parse_trackers("tensorboard,wandb"), parse_trackers("none")
      (('tensorboard', 'wandb'), ())
    """
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UsageError(
            f"--report-to {text!r}: unknown tracker {unknown[0]!r}; expected "
            f"{', '.join(TRACKERS)} (comma-separated)"
        )
    return tuple(n for n in names if n != "none")


def data_entry(text: str) -> Any:
    """An argparse ``type`` for ``--data``: ``builtin:NAME`` stays a string, files are paths.

    Example:
      >>> data_entry("builtin:instruct"), data_entry("train.jsonl").name
      ('builtin:instruct', 'train.jsonl')
    """
    return text if text.startswith(BUILTIN_PREFIX) else Path(text)
