"""The command-line programs: ``rslora-finetune`` (`rslora_jax.cli.finetune`).

Each command is a package of small modules (arguments, checks, program, loop, outputs);
`rslora_jax.cli.common` holds what commands share. Nothing in the library imports this package:
``import rslora_jax`` loads neither the commands nor their tqdm and matplotlib.
"""
