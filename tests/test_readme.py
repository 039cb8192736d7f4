"""The README's quickstart runs as written, and its API table covers the public API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import rslora_jax

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.loose_dtypes  # the quickstart runs optax Adam


def _block(title: str) -> str:
    text = README.read_text()
    section = text.split(f"## {title}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_is_short():
    code = _block("Quickstart")
    assert len(code.strip().splitlines()) < 25
    namespace: dict = {}
    exec(compile(code, "README.md:quickstart", "exec"), namespace)
    served, base = namespace["served"], namespace["base"]
    import jax

    assert jax.tree.structure(served) == jax.tree.structure(base)


def test_api_table_lists_every_public_name():
    text = README.read_text()
    missing = [name for name in rslora_jax.__all__ if f"`{name}" not in text]
    assert not missing, f"README API table lacks {missing}"
