#!/usr/bin/env bash
# Makes .venv-gemma: Google's gemma library (4.0.1, Python 3.12) for tests/test_gemma_lib.py.
# Not part of scripts/test.sh (CI): gemma's import pulls tensorflow and kauldron's stack (about
# 3 GB, several minutes); a plain `pip install gemma` backtracks for a long time, so gemma and
# kauldron go in without their dependencies and the modules their import needs are listed here.
# The same module shapes (q_einsum, kv_einsum, qkv_einsum, attn_vec_einsum) are tested in CI
# through google-tunix's Gemma 3 (tests/test_tunix.py).
#
#   bash scripts/gemma_env.sh && .venv-gemma/bin/python -m pytest -m gemma_lib tests/test_gemma_lib.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PYTHON312:-python3.12}
"$PY312" --version >/dev/null 2>&1 || PY312=/root/.pyenv/versions/3.12.1/bin/python
[ -x .venv-gemma/bin/python ] || "$PY312" -m venv .venv-gemma
.venv-gemma/bin/python -m pip install -q --upgrade pip
.venv-gemma/bin/python -m pip install -q --no-deps "gemma==4.0.1" "kauldron==1.4.4"
.venv-gemma/bin/python -m pip install -q -e . "pytest>=8" etils einops jaxtyping sentencepiece \
    treescope ml_collections immutabledict typeguard tqdm lark clu tensorflow tensorboard pandas \
    mediapy grain tensorflow-datasets chex dialog
.venv-gemma/bin/python -c "from gemma import gm; gm.nn.Transformer"
