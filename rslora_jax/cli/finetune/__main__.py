"""``python -m rslora_jax.cli.finetune``: the fine-tuning command."""

import sys

from rslora_jax.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
