"""``python -m rslora_jax.cli.generate``: the generation command."""

import sys

from rslora_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
