"""Memory (first) and step time of a training step on a quantized frozen base (QLoRA).

For the TinyLlama shape (hidden 2048, 22 layers, MLP 5632, 32 heads, 4 KV heads, vocab 32000)
and the Llama-3-8B shape (hidden 4096, 32 layers, MLP 14336, 32 heads, 8 KV heads, vocab
128256), bf16 compute, ranks 16 and 256, with and without remat, compiles one training step
(`rslora_jax.lora` forward, loss, gradients of the adapters, Adam update) for a bf16 base, an
int8 base and an nf4 base (`rslora_jax.quantize`: every linear kernel but ``lm_head``) and reads
XLA's compile-time memory analysis: arguments (base + adapters + optimizer state + batch),
temporaries, and their sum (the step's peak, as XLA plans it). Everything is built from shapes
alone (`jax.ShapeDtypeStruct`): no weight is materialised, so the 8B shape runs on a laptop CPU.

With ``--time`` it also runs the steps on real (random) arrays and reports the median step time
(do this on a GPU: the goal is the nf4 step within 1.25x the bf16 step).

    python benchmarks/bench_quant.py                                  # CPU: both shapes, memory
    python benchmarks/bench_quant.py --shape tinyllama --time         # GPU: also step times
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    "tinyllama": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, head_dim=64,
    ),
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    ),
}  # fmt: skip
GIB = 2**30
# --remat modes: the layer is recomputed in the backward pass, keeping (on) the matmul outputs
# (the models' default policy, fastest on GPUs) or (full) nothing but the layer's input.
REMAT_POLICIES = {"on": "dots_with_no_batch_dims_saveable", "full": "nothing_saveable"}


def _step(shape: str, scheme: str, rank: int, remat: str, batch: int, seq: int, chunk: int = 0):
    """(jitted step, abstract args) for one configuration."""
    import jax
    import jax.numpy as jnp
    import optax

    import rslora_jax as rl
    from rslora_jax.models import LlamaConfig, LlamaForCausalLM, causal_lm_loss, init_params
    from rslora_jax.ops.quantize import abstract_quantize

    cfg = LlamaConfig(
        **SHAPES[shape],
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        scan_layers=True,
        remat=remat != "off",
        remat_policy=REMAT_POLICIES.get(remat, REMAT_POLICIES["on"]),
        tie_word_embeddings=False,
        max_position_embeddings=max(seq, 2048),
    )
    lora = rl.LoraConfig(rank=rank, alpha=16.0, kernel_axes={"model/layers/.*": "lio"})
    base = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    if scheme != "bf16":
        base = abstract_quantize(base, scheme, config=lora)
    adapters = jax.eval_shape(lambda k: rl.init_adapters(base, lora, k), jax.random.key(0))
    opt = optax.adam(1e-4)
    state = jax.eval_shape(opt.init, adapters)
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    apply = rl.lora(LlamaForCausalLM(cfg).apply, lora)

    def step(adapters, state, base, tokens):
        def loss(ad):
            v = {"params": rl.combine(ad, base)}
            if chunk:  # the model's chunked loss: no (B, S, vocab) logits held whole
                return apply(v, tokens[:, :-1], labels=tokens[:, 1:], loss_chunk=chunk)
            logits = apply(v, tokens[:, :-1])
            return causal_lm_loss(logits, tokens[:, 1:])

        value, grads = jax.value_and_grad(loss)(adapters)
        updates, state = opt.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, value

    jitted = jax.jit(step, donate_argnums=(0, 1))
    return jitted, (adapters, state, base, tokens)


def measure(shape, scheme, rank, remat, batch, seq, timed=False, steps=5, chunk=0) -> dict:
    import jax
    import numpy as np

    import rslora_jax as rl

    t0 = time.perf_counter()
    fn, args = _step(shape, scheme, rank, remat, batch, seq, chunk)
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    row = {
        "shape": shape,
        "base": scheme,
        "rank": rank,
        "remat": remat,
        "loss_chunk": chunk,
        "tokens": f"{batch}x{seq}",
        "base_GiB": rl.base_bytes(args[2]) / GIB,
        "arguments_GiB": mem.argument_size_in_bytes / GIB,
        "temporaries_GiB": mem.temp_size_in_bytes / GIB,
        "peak_GiB": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / GIB,
        "compile_s": time.perf_counter() - t0,
    }
    if timed:

        def real(x):
            if np.issubdtype(x.dtype, np.integer):
                return jax.numpy.zeros(x.shape, x.dtype)
            return 0.01 * jax.random.normal(jax.random.key(0), x.shape, x.dtype)

        adapters, state, base, tokens = jax.tree.map(real, args)
        times = []
        for _ in range(steps + 1):
            t = time.perf_counter()
            adapters, state, loss = compiled(adapters, state, base, tokens)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t)
        row["step_ms"] = statistics.median(times[1:]) * 1e3
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=(*SHAPES, "all"), default="all")
    p.add_argument("--bases", default="bf16,int8,nf4")
    p.add_argument("--ranks", default="16,256")
    p.add_argument(
        "--remat",
        default="on,off",
        help="comma list of off, on (matmul outputs saved), full (nothing saved)",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument(
        "--loss-chunk",
        type=int,
        default=0,
        help="positions per chunk of the model's own loss (0: logits, then causal_lm_loss)",
    )
    p.add_argument("--time", action="store_true", help="also run the steps (use a GPU)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    rows = []
    print(
        f"{'shape':10} {'base':5} {'rank':>4} {'remat':5} {'base GiB':>8} {'args GiB':>8} "
        f"{'temp GiB':>8} {'peak GiB':>8}" + (" step ms" if args.time else ""),
        flush=True,
    )
    for shape in shapes:
        for rank in (int(r) for r in args.ranks.split(",")):
            for remat in args.remat.split(","):
                if remat not in ("off", *REMAT_POLICIES):
                    p.error(f"--remat: {remat!r} is not one of off, on, full")
                for scheme in args.bases.split(","):
                    row = measure(
                        shape,
                        scheme,
                        rank,
                        remat,
                        args.batch,
                        args.seq,
                        args.time,
                        chunk=args.loss_chunk,
                    )
                    rows.append(row)
                    extra = f" {row['step_ms']:7.1f}" if args.time else ""
                    print(
                        f"{shape:10} {scheme:5} {rank:4d} {remat:5} "
                        f"{row['base_GiB']:8.2f} {row['arguments_GiB']:8.2f} "
                        f"{row['temporaries_GiB']:8.2f} {row['peak_GiB']:8.2f}{extra}",
                        flush=True,
                    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
