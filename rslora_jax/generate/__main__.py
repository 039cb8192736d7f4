"""``python -m rslora_jax.generate``: the generation command (`rslora_jax.cli.generate`)."""

import sys

from rslora_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
