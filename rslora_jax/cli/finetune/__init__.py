"""The fine-tuning command: ``python -m rslora_jax.finetune`` (console script ``rslora-finetune``).

Fine-tunes a causal LM of any registered family (a Hugging Face checkpoint directory in
safetensors: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3; see
`rslora_jax.models.families`) with rsLoRA adapters (or RaSA, DoRA; ``--method``) on instruction data
(chat, prompt/completion or Alpaca rows: the loss on the answers only, examples packed without
attending to each other) or plain text, and leaves in ``--out`` everything needed to serve the
result or to continue it::

    adapters/       the adapter checkpoint (`rslora_jax.load_adapters`)
    peft/           the adapter in PEFT's format (``peft.PeftModel.from_pretrained``; not RaSA)
    merged/         adapters merged into the base, with the tokenizer: a Hugging Face model dir
    checkpoints/    adapters + optimizer state + step, for ``--resume``
    loss.png        training and held-out loss curves
    metrics.json    losses, held-out losses, tokens/s, timings and the full configuration
    run.json        the arguments of the run (``--resume`` reads them back)
    tb/             TensorBoard events (``--report-to``)

With no arguments it runs offline on a CPU in a few minutes: the built-in base model
(``rslora_jax/assets/base``: a 3.7M-parameter Llama pretrained on CPython's help topics and
standard-library code, made by ``scripts/pretrain_base.py``) instruction-tuned on the built-in
instruction set (``builtin:instruct``: questions about standard-library APIs answered from their
docstrings, `rslora_jax.data.stdlib_instruct_records`; the last 5% are held out).
``--data builtin:code`` trains on standard-library source as plain text instead.

The training step runs ``rslora_jax.lora(model.apply, config)`` (``mode="auto"``: at training
batch sizes each projection is one matmul with ``W + gamma*A@B`` formed per step and low-rank
adapter gradients, `rslora_jax.fused`), differentiated with respect to the adapters only
(`split` / `combine`), with AdamW through
`rslora_jax.optimizer`. ``--mesh data=2,model=4`` runs on several devices: the batch is split
over ``data`` (and ``fsdp``) and the base is sharded FSDP-style over ``fsdp`` and
tensor-parallel over ``model``; the adapters follow the base (`rslora_jax.partition_specs`).

Batches are a function of (seed, step) (`rslora_jax.data.batch_iterator`) and the dropout key is
``fold_in(key, step)``, so ``--resume`` continues an interrupted run exactly where it stopped:
on CPU the adapters after resuming are bit-identical to those of an uninterrupted run. Ctrl-C
finishes the current step, saves a checkpoint and exits with status 130 (a second Ctrl-C aborts
at once). Every input is checked before any weight is read or anything is compiled (the model
files too: every safetensors header and tensor shape against config.json); a bad one stops the
command with exit status 2 and a message that says what to fix. A run that cannot go on (a
non-finite loss or gradient, a full disk, a damaged checkpoint that nothing older replaces)
stops with exit status 2 and a message naming the last good checkpoint; a Ctrl-C outside the
step loop says what was kept (status 130). ``--out`` is never one of the inputs, and what it
holds that this command did not write is replaced only with ``--overwrite``.

Several processes (hosts) run one job under JAX's distributed runtime: start the same command in
every process with ``--coordinator HOST:PORT --num-processes N --process-id I`` (or
``--distributed auto`` on TPU pods, SLURM and Open MPI). The mesh then spans the devices of all
processes, each process materialises only its own rows of every global batch, checkpoints are
written and restored by all processes together, and process 0 writes the exports, the metrics
and the progress bar. A Ctrl-C in any process stops all of them after the next step, with one
checkpoint. The numbers do not depend on the number of processes: a run on 2
processes x 2 devices computes the losses and adapters of a run on 1 process x 4 devices
(``docs/multihost.md``, "The fine-tuning command").

The command's stages, one module each::

    args        the parser, `parse_args` (``--resume`` reads run.json back)
    options     the instruction-tuning and method flags and their parsers
    config_file ``--config run.yaml``: a file's flags as command-line tokens
    runtime     joining jax.distributed, agreeing across processes
    plan        every input checked before any weight is read -> `Plan`
    guards      what --out may hold, restarting, failures as one line (full disk, NaN, Ctrl-C)
    dataset     ``--data`` -> records -> answer-masked examples -> packed rows
    adapters    the LoraConfig of the flags; ``--layers`` on scanned layers
    layout      shardings of base, adapters and batches; this process's rows of a batch
    program     optimizer and schedule, the jitted training and evaluation steps -> `Program`
    loop        `train`: steps, accumulation, evaluation, checkpoints, resume, Ctrl-C
    tracking    TensorBoard and wandb
    outputs     exports (by method), loss.png, metrics.json, the summary
    command     `finetune` and `main`: all of the above, and the exit status

The tensor-parallel policy is `rslora_jax.models.sharding.param_specs` (every family names its
projections alike, so one policy serves all; each family registers it); what a
second command would share (usage errors, argument types, ``--mesh``, the progress bar) is in
`rslora_jax.cli.common`.
"""

from rslora_jax.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, parse_mesh
from rslora_jax.cli.finetune.args import DEFAULT_MODEL, PROG, RUNS_DIR, build_parser, parse_args
from rslora_jax.cli.finetune.command import finetune, main
from rslora_jax.cli.finetune.loop import train
from rslora_jax.cli.finetune.outputs import plot_losses
from rslora_jax.cli.finetune.plan import Plan, checkpoint_steps, prepare
from rslora_jax.cli.finetune.program import (
    OptimSettings,
    Program,
    make_optimizer,
    make_schedule,
    program,
)

__all__ = [
    "DEFAULT_MODEL",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "PROG",
    "RUNS_DIR",
    "OptimSettings",
    "Plan",
    "Program",
    "UsageError",
    "build_parser",
    "checkpoint_steps",
    "finetune",
    "main",
    "make_optimizer",
    "make_schedule",
    "parse_args",
    "parse_mesh",
    "plot_losses",
    "prepare",
    "program",
    "train",
]
