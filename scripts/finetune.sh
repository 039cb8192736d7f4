#!/usr/bin/env bash
# The main job: fine-tune a causal LM with rsLoRA adapters. With no arguments: the built-in base
# model instruction-tuned on the built-in offline instruction set (questions about standard-library
# APIs answered from their docstrings; a few minutes on a CPU). Every argument is passed on to
#
#   python -m rslora_jax.finetune      (see --help)
#
# Makes the virtual environment .venv next to this repository if it is missing and installs the
# project into it (again only when pyproject.toml changed). Paths in the arguments are relative
# to the directory you run this from.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"
STAMP="$VENV/.rslora-jax-installed"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
WANT="$(cksum < "$ROOT/pyproject.toml")"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT"
    echo "$WANT" > "$STAMP"
fi
exec "$VENV/bin/python" -m rslora_jax.finetune "$@"
