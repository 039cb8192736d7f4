"""The generation command: ``python -m rslora_jax.generate`` (console script ``rslora-generate``).

Generates text with a causal LM (a Hugging Face checkpoint directory, default the built-in base)
and, optionally, an adapter (``--adapter``: a checkpoint written by ``rslora-finetune``, or a
PEFT adapter directory), in JAX: the prompts are prefilled into a key/value cache and decoded
in one compiled loop (`rslora_jax.generate.generate`), the adapter applied as trained
(factored at decode, no merged copy of the weights). Prompts come from ``--prompt TEXT``
(repeatable) or ``--prompts FILE`` (one per line, or JSON Lines with ``prompt`` or a
``messages`` chat, rendered with the tokenizer's chat template). A single prompt's completion
is streamed as it is generated; ``--out FILE`` writes JSON Lines with prompt, completion, token
counts and timing. Every input is checked before any weight is read (the adapter's fit to the
model when it is read), and nothing is compiled before all checks have passed: a bad one stops
the command with exit status 2 and a message that says what to fix.

The command's stages, one module each::

    args      the parser, `parse_args`
    plan      every input checked -> `Job`; `load`: weights and adapter
    command   `run` and `main`: generation batch by batch, printing, ``--out``
"""

from rslora_jax.cli.generate.args import DEFAULT_MODEL, PROG, build_parser, parse_args
from rslora_jax.cli.generate.command import main, run
from rslora_jax.cli.generate.plan import Job, Prompt, find_adapter, load, prepare

__all__ = [
    "DEFAULT_MODEL",
    "PROG",
    "Job",
    "Prompt",
    "build_parser",
    "find_adapter",
    "load",
    "main",
    "parse_args",
    "prepare",
    "run",
]
