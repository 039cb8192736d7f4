"""The command line of ``rslora-generate``: the parser and `parse_args`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from rslora_jax.cli.common import (
    DTYPES,
    ArgumentParser,
    HelpFormatter,
    float_in,
    int_at_least,
    nonnegative_int,
    positive_int,
)

PROG = "rslora-generate"
#: The built-in base model (the fine-tuning command's default).
DEFAULT_MODEL: Path = Path(__file__).resolve().parents[2] / "assets" / "base"


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (its errors raise `rslora_jax.cli.common.UsageError`)."""
    p = ArgumentParser(
        prog=PROG,
        description="Generate text with a causal LM and its rsLoRA / PEFT adapters, in JAX "
        "(key/value cache, adapters applied factored, no merged copy).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Hugging Face checkpoint directory (config.json + safetensors); default: the "
        "built-in base model",
    )
    g.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer directory; default: --model"
    )
    g.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="an adapter checkpoint written by rslora-finetune (<run>/adapters, or the run "
        "directory itself) or a PEFT adapter directory (adapter_config.json + "
        "adapter_model.safetensors); default: none (the base, or a merged model, alone)",
    )
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
    g.add_argument(
        "--param-dtype", choices=DTYPES, default="float32", help="dtype the weights are kept in"
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="a prompt (repeatable); its text is encoded as is, as fine-tuning encodes text",
    )
    g.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help="prompts from a file: one per line, or JSON Lines (.jsonl) with 'prompt' (text as "
        "is) or 'messages' (a chat, rendered with the tokenizer's chat template and the "
        "generation prompt, as fine-tuning renders chats)",
    )
    g.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="Jinja chat template for 'messages' prompts (a template file, or a JSON file with "
        "'chat_template'); default: the tokenizer's, else rslora_jax.data.DEFAULT_CHAT_TEMPLATE",
    )
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="most new tokens per prompt"
    )
    g.add_argument(
        "--temperature",
        type=float_in(0.0, math.inf, low_open=False, high_open=True),
        default=0.0,
        help="sampling temperature; 0 = greedy",
    )
    g.add_argument("--top-k", type=nonnegative_int, default=0, help="top-k filter (0: off)")
    g.add_argument(
        "--top-p", type=float_in(0.0, 1.0), default=1.0, help="nucleus filter in (0, 1] (1: off)"
    )
    g.add_argument("--seed", type=int_at_least(0, "an integer >= 0"), default=0, help="seed")
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="do not stop at the tokenizer's end-of-sequence token",
    )
    g = p.add_argument_group("running")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="prompts generated together (one batch of at most this many)",
    )
    g.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. 'data=2,model=4' (axes data, fsdp, model): prompts split over "
        "data/fsdp, the model tensor-parallel over model, as in fine-tuning",
    )
    g.add_argument(
        "--cpu-devices",
        type=positive_int,
        default=None,
        help="run on this many (virtual) CPU devices (testing meshes without accelerators)",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="write JSON Lines: prompt, completion, token counts, timing",
    )
    g.add_argument(
        "--no-stream",
        action="store_true",
        help="print a single prompt's completion at the end instead of as it is generated",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Raises:
      UsageError: for bad arguments (argparse's own errors included).

    Example:
      >>> parse_args(["--prompt", "def f(", "--max-new-tokens", "8"]).max_new_tokens
      8
    """
    return build_parser().parse_args(argv)


__all__ = ["DEFAULT_MODEL", "PROG", "build_parser", "parse_args"]
