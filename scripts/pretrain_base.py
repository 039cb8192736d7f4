"""Pretrains the small built-in base model shipped in ``rslora_jax/assets/base``.

A 4-layer Llama (hidden 256, 4 heads, 4 key/value heads, SwiGLU 688, tied embeddings, 3.7M
parameters) with the built-in 2048-token tokenizer, trained from scratch on text every CPython
carries:

* CPython's help topics (``rslora_jax.data.stdlib_docs_documents()``: the language reference
  behind ``help("if")``), and
* the source of the standard-library modules in `PRETRAIN_MODULES` (Python code), none of which
  is in ``rslora_jax.data.FINETUNE_MODULES``: the default fine-tuning corpus stays held out.

Full-parameter training in float32 with AdamW (warmup, cosine decay, global-norm clipping);
the result is written in bfloat16 with `rslora_jax.hf.save_pretrained` (a Hugging Face
checkpoint that ``transformers.AutoModelForCausalLM`` loads), together with the tokenizer files,
so the fine-tuning command loads the default model with the same code as any ``--model`` dir.

Deterministic: the same arguments on the same Python and JAX version give the same bytes on a
given device type. Runs on any JAX backend (CPU by default; a GPU if JAX sees one)::

    python scripts/pretrain_base.py                        # the shipped run (CPU, ~15 min)
    python scripts/pretrain_base.py --steps 3000 --batch 64  # longer, on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rslora_jax import data  # noqa: E402
from rslora_jax.hf import save_pretrained  # noqa: E402
from rslora_jax.models import LlamaConfig, LlamaForCausalLM, causal_lm_loss, init_params  # noqa: E402

DEFAULT_OUT = REPO / "rslora_jax" / "assets" / "base"

#: Standard-library modules whose source is added to the pretraining text: pure Python, present
#: with source from CPython 3.10 to 3.13, disjoint from ``data.FINETUNE_MODULES``.
PRETRAIN_MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "base64",
    "collections",
    "dis",
    "enum",
    "gettext",
    "glob",
    "inspect",
    "logging",
    "pickle",
    "shutil",
    "subprocess",
    "tempfile",
    "threading",
    "tokenize",
    "traceback",
    "typing",
    "urllib.parse",
    "warnings",
    "weakref",
)

#: The architecture of the shipped base. MHA (4 K/V heads), so every projection is at least
#: 256 wide and rank 256 adapters are allowed on all of them.
BASE_CONFIG = LlamaConfig(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def hf_config(tokenizer: Any) -> Any:
    """The transformers config written with the model: `BASE_CONFIG` + the tokenizer's ids."""
    config = BASE_CONFIG.to_hf()
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def module_source(name: str) -> str:
    """The source text of a standard-library module (never imported when the source exists)."""
    spec = importlib.util.find_spec(name)
    source = spec.loader.get_source(name) if spec and spec.loader else None
    if not source:
        raise RuntimeError(f"no source for standard-library module {name!r} on this Python")
    return source


def pretrain_documents(docs_only: bool = False) -> list[str]:
    """The pretraining documents: the help topics, then the `PRETRAIN_MODULES` sources."""
    overlap = set(PRETRAIN_MODULES) & set(data.FINETUNE_MODULES)
    if overlap:
        raise RuntimeError(f"PRETRAIN_MODULES overlaps the fine-tuning corpus: {sorted(overlap)}")
    documents = data.stdlib_docs_documents()
    if not docs_only:
        documents += [module_source(name) for name in PRETRAIN_MODULES]
    return documents


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup", type=int, default=40, help="linear warmup steps (default 40)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="init and shuffling seed (default 0)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps")
    p.add_argument("--docs-only", action="store_true", help="pretrain on the help topics only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq > BASE_CONFIG.max_position_embeddings:
        p.error(f"--seq {args.seq} exceeds max_position_embeddings=512")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    return args


def make_optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=min(args.warmup, args.steps // 2),
        decay_steps=args.steps,
        end_value=args.lr * 0.1,
    )
    # Weight decay on matrices only (not on norm scales).
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    config = BASE_CONFIG
    model = LlamaForCausalLM(config)

    tokenizer = data.load_tokenizer()
    documents = pretrain_documents(args.docs_only)
    rows = data.tokenize_and_pack(documents, tokenizer, args.seq)
    # Hold out a slice spread over the corpus (every 50th row) to watch generalisation.
    held = np.arange(rows.shape[0]) % 50 == 49
    train_rows, eval_rows = rows[~held], rows[held][:32]
    print(
        f"corpus: {len(documents)} documents, {sum(map(len, documents)):,} characters, "
        f"{rows.size:,} tokens in {rows.shape[0]} rows of {args.seq + 1}; "
        f"{len(train_rows)} train rows, {len(eval_rows)} held-out rows"
    )
    print(f"device: {jax.devices()[0].platform} x{len(jax.devices())}")

    params = init_params(config, jax.random.key(args.seed))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"model: {n_params:,} parameters")
    tx = make_optimizer(args)
    opt_state = tx.init(params)

    def loss_fn(params: Any, batch: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, batch[:, :-1])
        return causal_lm_loss(logits, batch[:, 1:])

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)

    def evaluate(params: Any) -> float:
        losses = [
            float(eval_loss(params, jnp.asarray(eval_rows[i : i + 8])))
            for i in range(0, len(eval_rows), 8)
        ]
        return float(np.mean(losses))

    batches = data.batch_iterator(train_rows, args.batch, seed=args.seed)
    history: list[float] = []
    evals: list[tuple[int, float]] = [(0, evaluate(params))]
    print(f"step     0  eval {evals[-1][1]:.4f}  (uniform: {math.log(config.vocab_size):.4f})")
    t_train = time.perf_counter()
    for step in range(1, args.steps + 1):
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(next(batches)))
        history.append(float(loss))
        if step % 10 == 0 or step == args.steps:
            recent = float(np.mean(history[-10:]))
            elapsed = time.perf_counter() - t_train
            line = f"step {step:5d}  loss {recent:.4f}  {elapsed:7.1f}s"
            if step % args.eval_every == 0 or step == args.steps:
                evals.append((step, evaluate(params)))
                line += f"  eval {evals[-1][1]:.4f}"
            print(line, flush=True)
    train_seconds = time.perf_counter() - t_train

    out = Path(args.out)
    save_pretrained(out, params, hf_config(tokenizer), dtype="bfloat16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data.BUILTIN_TOKENIZER_DIR / name, out / name)
    info = {
        "description": "rslora_jax built-in base model; made by scripts/pretrain_base.py",
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "corpus": {
            "help_topics": "pydoc_data.topics (sorted keys)",
            "modules": [] if args.docs_only else list(PRETRAIN_MODULES),
            "characters": sum(map(len, documents)),
            "tokens": int(rows.size),
        },
        "parameters": n_params,
        "final_train_loss": float(np.mean(history[-10:])),
        "eval_loss": evals,
        "train_seconds": round(train_seconds, 1),
        "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(
        f"final train loss {info['final_train_loss']:.4f} (mean of last 10 steps), held-out "
        f"{evals[-1][1]:.4f}; training {train_seconds:.0f}s, total "
        f"{time.perf_counter() - t_start:.0f}s; wrote {out} ({size / 2**20:.2f} MiB)"
    )
    return info


if __name__ == "__main__":
    main()
