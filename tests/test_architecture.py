"""The house plan, checked from the source: which room may import which (function-level imports
included), no import cycles, nothing imports the CLI, and `import rslora_jax` stays light.

Rooms, lowest first (README, "Layout"): base (`_types`, `_files`) <- core <- methods;
execution (pure math, imports nothing of ours); ops <- frontends <- models <- hf <- cli;
`generate` (the sampler) sits over models and under cli. `data` and `distributed` are utilities
over the base; ``__main__`` modules (``python -m`` entry points) run commands. The re-export
modules kept at old paths (`config`, `checkpoint`, `fused`, `rasa`, `variants`, `nnx`, `finetune`) and the package's
`__init__` may import what they re-export, and no library module imports them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rslora_jax"
SHIMS = {"config", "checkpoint", "fused", "rasa", "variants", "nnx", "finetune"}
ALLOWED = {
    "base": {"base"},
    "core": {"base", "core"},
    "methods": {"base", "core", "methods"},
    "execution": {"execution"},
    "ops": {"base", "core", "execution", "ops"},
    "frontends": {"base", "core", "execution", "ops", "frontends"},
    "models": {"base", "core", "execution", "frontends", "models"},
    "data": {"base", "data"},
    "hf": {"base", "core", "ops", "models", "data", "hf"},
    "generate": {"base", "core", "execution", "ops", "frontends", "models", "generate"},
    "cli": {
        "base",
        "core",
        "methods",
        "execution",
        "ops",
        "frontends",
        "models",
        "data",
        "hf",
        "generate",
        "cli",
        "package",
    },
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[-1] == "__main__":
        return "package"  # the package, and `python -m` entry points (which run commands)
    head = parts[1]
    if head in ("_types", "_files"):
        return "base"
    if head in ("distributed", "data"):
        return "data"
    if head in SHIMS and len(parts) == 2:
        return "shim"
    return head


def _is_module(name: str) -> bool:
    where = PKG.parent / Path(*name.split("."))
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists()


def _runtime_nodes(tree: ast.AST):
    """All nodes except those under ``if TYPE_CHECKING:`` (not imported at run time)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None)
            if isinstance(child, ast.If) and getattr(test, "id", getattr(test, "attr", "")) == (
                "TYPE_CHECKING"
            ):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports(path: Path, module: str) -> set[str]:
    """Every `rslora_jax` module `path` imports, at module or function level."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from rslora_jax.x import y` imports the submodule y when there is one, else
            # takes the name y from rslora_jax.x
            subs = {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(base)
    return {m for m in found if m == "rslora_jax" or m.startswith("rslora_jax.")}


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(p): _imports(p, _module_name(p))
        for p in sorted(PKG.rglob("*.py"))
        if "assets" not in p.parts
    }


GRAPH = _graph()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_rooms_import_only_rooms_below(module):
    room = _room(module)
    if room in ("package", "shim"):
        return  # re-exports
    bad = []
    for target in sorted(GRAPH[module]):
        if target == "rslora_jax":
            continue  # the package itself (e.g. `import rslora_jax.x`)
        other = _room(target)
        if other == "shim" or other not in ALLOWED[room]:
            bad.append(f"{target} ({other})")
    assert not bad, f"{module} ({room}) may import only {sorted(ALLOWED[room])}; imports {bad}"


def test_no_import_cycles():
    graph = {m: {t for t in ts if t in GRAPH and t != "rslora_jax"} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_nothing_imports_the_cli():
    users = sorted(
        m
        for m, targets in GRAPH.items()
        if _room(m) != "cli" and m != "rslora_jax.finetune" and not m.endswith(".__main__")
        if any(t.startswith("rslora_jax.cli") for t in targets)
    )
    assert not users, (
        f"only rslora_jax.finetune and `python -m` entry points may import the CLI: {users}"
    )


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from rslora_jax.cli import common\n\ndef g():\n    from ..hf import io\n"
    )
    found = _imports(probe, "rslora_jax.core.probe")
    assert {"rslora_jax.cli.common", "rslora_jax.hf.io"} <= found
    assert _room("rslora_jax.cli.common") == "cli" and "cli" not in ALLOWED["core"]


def test_import_stays_light():
    code = (
        "import sys, rslora_jax; "
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'tqdm', 'peft', "
        "'rslora_jax.cli', 'rslora_jax.hf', 'rslora_jax.models') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
