"""``--config run.yaml``: flags from a YAML or TOML file, as command-line tokens.

Each entry ``name: value`` is a flag (``rank: 32`` is ``--rank 32``; dashes or underscores):
``true`` sets a switch (``remat: true``), a list gives a flag of several values
(``data: [a.jsonl, b.jsonl]``). `config_tokens` turns the file into the tokens that would say
the same on the command line; the command parses ``config tokens + command line``, so the
command line overrides the file, and argparse checks every value as it checks typed ones. Each
entry is first checked alone, so a bad one is reported as ``file:line: name: what is wrong``.
The resolved arguments, not the file, are what ``run.json`` keeps and ``--resume`` reads.
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path
from typing import Any

from rslora_jax.cli.common import UsageError

__all__ = ["config_tokens", "find_config"]

# Flags that belong to a launch, not to a configuration file.
_NOT_IN_FILE = ("config", "resume", "help")


def find_config(argv: list[str]) -> str | None:
    """The value of ``--config`` in `argv` (``--config F`` or ``--config=F``), or None.

    Example:
      >>> find_config(["--rank", "4", "--config=run.yaml"])
      'run.yaml'
    """
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _line_of(text: str, key: str) -> int:
    m = re.search(rf"^[ \t\"']*{re.escape(key)}[\"']?[ \t]*[:=]", text, re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else 1


def _load(path: Path) -> tuple[dict[str, Any], str]:
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--config {shown}: cannot be read: {err}") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            loaded = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"--config {shown}: invalid TOML: {err}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{shown}:{mark.line + 1}" if mark is not None else shown
            raise UsageError(f"--config {where}: invalid YAML: {err}") from None
    else:
        raise UsageError(
            f"--config {shown}: expected a .yaml, .yml or .toml file, got {suffix or 'no suffix'!r}"
        )
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UsageError(
            f"--config {shown}: expected a mapping of flags to values, got {type(loaded).__name__}"
        )
    return loaded, text


def _tokens(action: argparse.Action, flag: str, value: Any, where: str) -> list[str]:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {flag} is a switch: give true or false, got {value!r}")
        return [flag] if value else []
    if value is None:
        return []
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        return [flag, *(str(v) for v in values)]
    if isinstance(value, (list, dict)):
        raise UsageError(f"{where}: {flag} takes one value, got {value!r}")
    if isinstance(value, bool):
        value = str(value).lower()
    return [flag, str(value)]


def config_tokens(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The command-line tokens that say what the configuration file at `path` says.

    Raises:
      UsageError: naming the file and the line, for a file that does not parse, an entry that
        is not a flag (with the closest flag), or a value the flag does not accept.
    """
    file = Path(path).expanduser()
    loaded, text = _load(file)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    tokens: list[str] = []
    for key, value in loaded.items():
        name = str(key).strip().lstrip("-").replace("-", "_")
        where = f"--config {file}:{_line_of(text, str(key))}"
        if name in _NOT_IN_FILE or name not in actions:
            close = difflib.get_close_matches(name, [d for d in actions if d not in _NOT_IN_FILE])
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            why = "belongs on the command line" if name in _NOT_IN_FILE else "is not a flag"
            raise UsageError(f"{where}: {key!r} {why} of {parser.prog}{hint}")
        action = actions[name]
        flag = next(s for s in action.option_strings if s.startswith("--"))
        mine = _tokens(action, flag, value, f"{where}: {key}")
        try:
            parser.parse_args(mine)
        except UsageError as err:
            raise UsageError(f"{where}: {key}: {err}") from None
        tokens += mine
    return tokens
