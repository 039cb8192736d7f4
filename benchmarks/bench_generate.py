"""Generation benchmark: `rslora_jax.generate` (key/value cache, one compiled decode loop) against
transformers' ``generate`` (PyTorch, its dynamic cache) on the same model and machine (issue 16).

The model is a random Llama built from a config (nothing is downloaded), saved once as a Hugging
Face checkpoint and loaded by both sides. For each batch size (1 and 32 by default) and each
side, greedy decoding of ``--new`` tokens after prompts of ``--prompt`` tokens is timed:

- **time to first token** (TTFT): one call with ``max_new_tokens=1`` (the prefill and the first
  token), median of the timed repeats;
- **decode tokens/s**: ``batch * (new - 1) / (T(new) - T(1))``, the rate of the token-by-token
  loop after the prefill, with ``T`` the median time of a call (``min_new_tokens`` = ``new`` on
  the transformers side and no stop token on ours, so both decode exactly ``new`` tokens).

Variants: ``jax`` (the base), ``jax+lora`` (rank-16 rsLoRA adapters on every linear layer,
``rslora_jax.lora(mode="auto")``: fused prefill, factored decode), ``torch`` (the base, eager
attention or SDPA) and ``torch+peft`` (the same adapters through PEFT). JAX compiles once per
shape (before timing; the compile time is reported). Every variant is set up (compiled, warmed
up) first; then each repeat times every variant and batch once, in turn (interleaved, so that a
change in the machine's load touches them all alike), and the medians are reported. The KV
cache's memory is reported from its
shape: ``2 * layers * batch * (prompt + new) * kv_heads * head_dim * bytes``.

Run (CPU, a few minutes)::

    python benchmarks/bench_generate.py --json benchmarks/results/bench_generate_cpu.json

or, on a GPU, the TinyLlama-1.1B shape in bf16::

    python benchmarks/bench_generate.py --size tinyllama --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = {
    # hidden, layers, MLP, heads, KV heads, vocab
    "cpu": dict(
        hidden_size=512,
        num_hidden_layers=8,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
    ),
    "tinyllama": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _checkpoint(args: argparse.Namespace, directory: Path) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        **SIZES[args.size], max_position_embeddings=args.prompt + args.new + 16, rms_norm_eps=1e-5
    )
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=args.attn)
    model.save_pretrained(directory)
    return model


def _prompts(args: argparse.Namespace, batch: int, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(args.seed + batch)
    return rng.integers(0, vocab, (batch, args.prompt)).tolist()


def bench_jax(args: argparse.Namespace, directory: Path, adapters: bool) -> list[Any]:
    """``(row, run)`` per batch size: `row` holds what is known before timing (compile time,
    cache size), ``run(new)`` generates `new` tokens."""
    import jax
    import numpy as np

    import rslora_jax as rl
    from rslora_jax.generate import SamplingConfig, generate
    from rslora_jax.hf import load_pretrained
    from rslora_jax.models import LlamaForCausalLM
    from rslora_jax.models.cache import init_cache

    dtype = {"f32": "float32", "bf16": "bfloat16"}[args.dtype]
    config, params = load_pretrained(directory, param_dtype=dtype, dtype=dtype)
    lora_config = None
    if adapters:
        lora_config = rl.LoraConfig(
            rank=16, alpha=16.0, targets="all-linear", kernel_axes={"model/layers/.*": "lio"}
        )
        params = rl.init(params, lora_config, jax.random.key(1))
        rng = np.random.default_rng(0)  # B != 0: the adapters change the output
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: (
                x + 0.01 * rng.standard_normal(x.shape).astype(x.dtype)
                if "lora_b" in jax.tree_util.keystr(p)
                else x
            ),
            params,
        )
    model = LlamaForCausalLM(config)
    cases = []
    for batch in args.batch:
        prompts = _prompts(args, batch, config.vocab_size)

        def run(new: int, prompts=prompts) -> Any:
            out = generate(
                model, params, prompts, SamplingConfig(max_new_tokens=new), lora_config=lora_config
            )
            return out.tokens

        compile_s = _time(lambda run=run: (run(1), run(args.new)))
        cache = jax.eval_shape(lambda b=batch: init_cache(config, b, args.prompt + args.new))
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
        row = {
            "variant": "jax+lora" if adapters else "jax",
            "batch": batch,
            "compile_s": compile_s,
            "kv_cache_mib": nbytes / 2**20,
        }
        cases.append((row, run))
    return cases


def bench_torch(args: argparse.Namespace, model: Any, adapters: bool) -> list[Any]:
    """``(row, run)`` per batch size, as `bench_jax`."""
    import copy

    import torch

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = copy.deepcopy(model).to(dtype=dtype, device=args.device).eval()
    if adapters:
        import peft

        lora = peft.LoraConfig(
            r=16,
            lora_alpha=16,
            use_rslora=True,
            target_modules="all-linear",
            init_lora_weights=False,
        )
        model = peft.get_peft_model(model, lora).eval()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = []
    for batch in args.batch:
        ids = torch.as_tensor(_prompts(args, batch, model.config.vocab_size), device=args.device)
        mask = torch.ones_like(ids)

        def run(new: int, ids=ids, mask=mask) -> Any:
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )
            if args.device == "cuda":
                torch.cuda.synchronize()
            return out

        run(2)  # warm-up
        cases.append(({"variant": "torch+peft" if adapters else "torch", "batch": batch}, run))
    return cases


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--batch", type=int, action="append", default=None, help="default: 1 and 32")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens")
    p.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch's device")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--variants", default="jax,jax+lora,torch,torch+peft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.batch = args.batch or [1, 32]
    variants = args.variants.split(",")
    import jax
    import torch
    import transformers

    cases: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = _checkpoint(args, Path(tmp))
        for v in variants:
            if v.startswith("jax"):
                cases += bench_jax(args, Path(tmp), adapters=v == "jax+lora")
            else:
                cases += bench_torch(args, model, adapters=v == "torch+peft")
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in cases]
    for r in range(args.repeats):  # interleaved: every case once per repeat
        for (row, run), (firsts, fulls) in zip(cases, times):
            firsts.append(_time(lambda run=run: run(1)))
            fulls.append(_time(lambda run=run: run(args.new)))
            print(f"repeat {r + 1}: {row['variant']} batch {row['batch']}: "
                  f"{firsts[-1]:.3f} s, {fulls[-1]:.3f} s", flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for (row, _), (firsts, fulls) in zip(cases, times):
        first, full = statistics.median(firsts), statistics.median(fulls)
        rows.append(
            {
                **row,
                "time_to_first_token_ms": first * 1e3,
                "decode_tokens_per_s": row["batch"] * (args.new - 1) / (full - first),
                "total_ms": full * 1e3,
            }
        )
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shape": SIZES[args.size],
        "versions": {
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "machine": {
            "platform": platform.platform(),
            "jax_devices": [str(d) for d in jax.devices()],
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "results": rows,
    }
    print(f"\n{'variant':<12}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}{'cache MiB':>11}")
    for r in rows:
        cache = f"{r['kv_cache_mib']:.1f}" if "kv_cache_mib" in r else "-"
        print(
            f"{r['variant']:<12}{r['batch']:>6}{r['time_to_first_token_ms']:>10.1f}"
            f"{r['decode_tokens_per_s']:>14.1f}{cache:>11}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
