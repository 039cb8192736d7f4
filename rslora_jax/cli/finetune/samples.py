"""Sample completions of held-out prompts, before and after training (``--samples N``).

The prompts come from the held-out rows: the first example of each of the first ``N`` rows,
cut where its answer starts (instruction data: the rendered prompt; plain text: its first half,
at most `PROMPT_TOKENS` tokens), and the rest of the example is the reference. The completions
are greedy (`rslora_jax.generate.generate`, the adapters applied factored, on the run's mesh), so
the two sets differ only by what training changed.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import rslora_jax as rl
from rslora_jax import data
from rslora_jax._types import PyTree
from rslora_jax.generate import SamplingConfig, generate
from rslora_jax.models.families import family_of

#: At most this many tokens of a plain-text example make its prompt.
PROMPT_TOKENS = 32
#: New tokens per sample.
NEW_TOKENS = 32


def held_out_prompts(rows: np.ndarray, n: int) -> list[tuple[list[int], list[int]]]:
    """``(prompt, reference)`` token lists from the first `n` held-out rows.

    Args:
      rows: packed rows ``(N, 5, seq_len)`` (`rslora_jax.data.FIELDS`).
      n: how many.

    Returns:
      Up to `n` pairs (rows whose first example is too short to split are skipped).

    Example:
      >>> row = np.zeros((1, 5, 6), np.int32)
      >>> row[0, 0] = [1, 2, 3, 4, 5, 0]; row[0, 1] = [2, 3, 4, 5, 6, 0]  # inputs, targets
      >>> row[0, 2] = [0, 0, 1, 1, 1, 0]; row[0, 3] = [1, 1, 1, 1, 1, 0]  # answer, segment
      >>> held_out_prompts(row, 1)
      [([1, 2, 3], [4, 5, 6])]
    """
    out = []
    for row in rows:
        f = data.fields(np.asarray(row))
        first = f["segment_ids"] == 1
        inputs, targets, weights = f["inputs"][first], f["targets"][first], f["weights"][first]
        if inputs.size < 2:
            continue
        counted = np.flatnonzero(weights)
        start = int(counted[0]) if counted.size else 0
        if start == 0:  # plain text: every token counts; prompt with its first half
            start = min(max(inputs.size // 2, 1), PROMPT_TOKENS) - 1
        prompt = [int(t) for t in inputs[: start + 1]]
        reference = [int(t) for t in targets[start:]]
        out.append((prompt, reference))
        if len(out) == n:
            break
    return out


def complete(
    plan: Any, adapters: PyTree, base: PyTree, prompts: list[tuple[list[int], list[int]]]
) -> list[str]:
    """Greedy completions (text) of `prompts` by the base with `adapters`."""
    config = plan.model_config
    limit = config.max_position_embeddings
    longest = max(len(p) for p, _ in prompts)
    sampling = SamplingConfig(
        max_new_tokens=max(1, min(NEW_TOKENS, limit - longest)),
        stop_tokens=_stops(plan.tokenizer, config.vocab_size),
    )
    out = generate(
        family_of(config).module(config),
        rl.combine(adapters, base),
        [p for p, _ in prompts],
        sampling,
        lora_config=plan.lora_config,
        mesh=plan.mesh,
    )
    return [_text(plan.tokenizer, c, sampling.stop_tokens) for c in out.completions()]


def _stops(tokenizer: Any, vocab: int) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return (int(eos),) if eos is not None and eos < vocab else ()


def _text(tokenizer: Any, tokens: list[int], stops: tuple[int, ...]) -> str:
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


class Samples:
    """The samples of a run: `before` (at the adapters' initial values), `after`, and
    `records` for ``metrics.json``. Nothing is done with ``--samples 0`` or several processes
    (the completions would have to be gathered; the held-out loss still compares the runs)."""

    def __init__(self, plan: Any, n: int) -> None:
        self.plan = plan
        active = n > 0 and jax.process_count() == 1
        self.prompts = held_out_prompts(plan.eval_rows, n) if active else []
        self.before: list[str] = []
        self.after: list[str] = []

    def run_before(self, adapters: PyTree, base: PyTree) -> None:
        if self.prompts:
            self.before = complete(self.plan, adapters, base, self.prompts)

    def run_after(self, adapters: PyTree, base: PyTree) -> None:
        if self.prompts:
            self.after = complete(self.plan, adapters, base, self.prompts)

    def records(self) -> list[dict[str, str]]:
        tok = self.plan.tokenizer
        return [
            {
                "prompt": tok.decode(p, skip_special_tokens=False),
                "reference": tok.decode(r, skip_special_tokens=True),
                "before": b,
                "after": a,
            }
            for (p, r), b, a in zip(self.prompts, self.before, self.after)
        ]


def summary_lines(records: list[dict[str, str]], width: int = 76) -> list[str]:
    """The summary's sample lines: each prompt's end and the completions before and after.

    Example:
      >>> summary_lines([{"prompt": "def f(", "reference": "x)", "before": "(", "after": "x)"}])
      ['  sample 1: ...def f(', '    before: (', '    after:  x)']
    """

    def one_line(text: str, tail: bool = False) -> str:
        text = text.replace("\n", "\\n")
        if len(text) <= width:
            return text
        return "..." + text[-width + 3 :] if tail else text[: width - 3] + "..."

    lines = []
    for i, r in enumerate(records, 1):
        lines += [
            f"  sample {i}: ...{one_line(r['prompt'][-40:], tail=True)}",
            f"    before: {one_line(r['before'])}",
            f"    after:  {one_line(r['after'])}",
        ]
    return lines


__all__ = [
    "NEW_TOKENS",
    "PROMPT_TOKENS",
    "Samples",
    "complete",
    "held_out_prompts",
    "summary_lines",
]
