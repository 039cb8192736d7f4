#!/usr/bin/env bash
# The test suite, from a fresh machine: makes the environments, installs the project from
# pyproject.toml, runs every test. This is the README's test command and what CI runs.
#
#   .venv      newest transformers (5.x), torch (CPU) + peft for the PyTorch parity tests
#   .venv-tf4  transformers 4.x, whose Flax model classes (FlaxLlama, FlaxGPT2) the tests
#              marked hf_flax need; transformers 5 dropped them
#   .venv-tunix google-tunix (no torch), whose NNX Llama 3 / Qwen 3 / Gemma 3 tests/test_tunix.py
#              adapts (its own environment: tunix pins its own transformers); about 3 min to make
#              and 4 min to run on the 2-core CI machine
# Google's gemma library (Python 3.12, tensorflow) is not installed here: scripts/gemma_env.sh
# makes its environment for tests/test_gemma_lib.py, run by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${TEST_JOBS:-2}

make_env() {  # make_env DIR EXTRA_PIP_ARGS...
    local dir=$1
    shift
    [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
    # torch==2.13.0 first: on our machines that pin takes the local CPU build.
    "$dir/bin/python" -m pip install -q "torch==2.13.0"
    "$dir/bin/python" -m pip install -q -e ".[test]" "$@"
}

make_env .venv
make_env .venv-tf4 "transformers>=4.57,<5"
[ -x .venv-tunix/bin/python ] || "$PY" -m venv .venv-tunix
.venv-tunix/bin/python -m pip install -q --upgrade pip
.venv-tunix/bin/python -m pip install -q -e . "google-tunix==0.1.7" "pytest>=8"

.venv/bin/ruff check rslora_jax tests examples benchmarks scripts
.venv/bin/ruff format --check rslora_jax tests examples benchmarks scripts
.venv/bin/python -m pytest -n "$JOBS" --dist loadfile rslora_jax tests
# Exit status 5 (no tests collected) fails the run too: hf_flax tests must exist and run.
.venv-tf4/bin/python -m pytest -n "$JOBS" --dist loadfile -m hf_flax tests
# The tunix models' tests; RSLORA_REQUIRE_TUNIX turns a missing tunix into a failure, not a skip.
RSLORA_REQUIRE_TUNIX=1 .venv-tunix/bin/python -m pytest -m tunix tests/test_tunix.py
