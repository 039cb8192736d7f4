"""Built-in offline corpora (no network, any CPython >= 3.10), all from the standard library.

* `stdlib_docs_text` -- the English help topics shipped with CPython in ``pydoc_data.topics``
  (0.46 to 0.51 million characters on CPython 3.10 to 3.13). Used to pretrain the tiny built-in
  base model and to train the built-in tokenizer (``rslora_jax/assets/tokenizer``, built by
  ``scripts/build_tokenizer.py``).
* `stdlib_finetune_text` -- the source code of the fixed list `FINETUNE_MODULES` of
  pure-Python standard-library modules (0.60 to 0.65 million characters on 3.10 to 3.13):
  Python code and docstrings, a different distribution from the prose above, so that
  fine-tuning has something to learn (``--data builtin:code``).
* `stdlib_instruct_records` -- an instruction set: questions about the public functions,
  classes and methods of `FINETUNE_MODULES` and `INSTRUCT_EXTRA_MODULES`, answered from their
  docstrings and signatures, as chat records (``--data builtin:instruct``).

Source is read through the import system's loader, never by importing the module.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re

import numpy as np

from rslora_jax.data.records import Record

__all__ = [
    "BUILTIN_DATA",
    "FINETUNE_MODULES",
    "INSTRUCT_EXTRA_MODULES",
    "INSTRUCT_SYSTEM",
    "builtin_records",
    "stdlib_docs_documents",
    "stdlib_docs_text",
    "stdlib_finetune_documents",
    "stdlib_finetune_text",
    "stdlib_instruct_records",
]

#: Standard-library modules whose source forms the default fine-tuning corpus, sorted.
#:
#: Chosen to be pure Python (a ``.py`` source file, not a C extension and not a module that
#: CPython 3.11+ freezes into the interpreter), present in CPython 3.10 to 3.13 with no
#: deprecation or removal scheduled, and mostly algorithmic code with docstrings. Together
#: 609,217 characters on CPython 3.11.7 (600k on 3.10.13, 627k on 3.12.1, 654k on 3.13.0).
#: The text is identical on every run with the same Python installation; it differs between
#: Python versions.
FINETUNE_MODULES: tuple[str, ...] = (
    "bisect",
    "calendar",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "fnmatch",
    "fractions",
    "functools",
    "graphlib",
    "heapq",
    "json",
    "json.decoder",
    "json.encoder",
    "json.scanner",
    "numbers",
    "pprint",
    "queue",
    "random",
    "sched",
    "shlex",
    "statistics",
    "string",
    "textwrap",
)


# --------------------------------------------------------------------------------------------
# Built-in offline corpora
# --------------------------------------------------------------------------------------------


def stdlib_docs_documents() -> list[str]:
    """Return CPython's help topics (``pydoc_data.topics.topics``) in sorted key order.

    Returns:
        One string per help topic (79 topics on CPython 3.11), each ending in a newline.

    Example:
        >>> docs = stdlib_docs_documents()
        >>> docs[0].startswith('The "assert" statement')
        True
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_docs_text() -> str:
    """Return the pretraining corpus: CPython's help topics joined in sorted key order.

    The topics are joined with a newline, so consecutive topics are separated by a blank line.
    The text is English prose with code examples (the language reference chapters behind
    ``help("if")`` etc.), 465,048 characters on CPython 3.11.7, available offline on every CPython.

    Returns:
        The joined text.

    Example:
        >>> text = stdlib_docs_text()
        >>> len(text) > 100_000 and "assert" in text
        True
    """
    return "\n".join(stdlib_docs_documents())


def _module_source(name: str) -> str:
    """Source text of a standard-library module, or its docstrings if the source is missing."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"standard-library module {name!r} was not found on this Python")
    source = None
    get_source = getattr(spec.loader, "get_source", None)
    if get_source is not None:
        try:
            source = get_source(name)
        except ImportError:
            source = None
    if source:
        return source
    # Installations that ship bytecode only (for example the embeddable Windows zip) have no
    # source, but the bytecode keeps the docstrings (unless Python runs with -OO).
    docs = _module_docstrings(name)
    if not docs.strip():
        raise RuntimeError(
            f"neither the source nor the docstrings of standard-library module {name!r} are "
            "available on this Python installation (bytecode-only install run with -OO?)"
        )
    return docs


def _module_docstrings(name: str) -> str:
    """The module docstring plus the docstrings of the objects it defines, in sorted order."""
    import inspect

    module = importlib.import_module(name)
    parts = []
    if module.__doc__:
        parts.append(inspect.cleandoc(module.__doc__))
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if getattr(obj, "__module__", None) != name or not getattr(obj, "__doc__", None):
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        parts.append(f"{attr}:\n{inspect.cleandoc(obj.__doc__)}")
    return "\n\n".join(parts) + "\n" if parts else ""


def stdlib_finetune_documents() -> list[str]:
    """Return the default fine-tuning corpus: one document per module in ``FINETUNE_MODULES``.

    Each document is the module's source file as shipped with this Python (read through the
    import system's loader, so zipped standard libraries work too; a bytecode-only install falls
    back to the module's docstrings). The modules are never imported when their source exists.

    Returns:
        One string per module, in the order of :data:`FINETUNE_MODULES`.

    Raises:
        RuntimeError: If a module has neither source nor docstrings on this installation.

    Example:
        >>> docs = stdlib_finetune_documents()
        >>> len(docs) == len(FINETUNE_MODULES)
        True
    """
    return [_module_source(name) for name in FINETUNE_MODULES]


def stdlib_finetune_text() -> str:
    """Return the default fine-tuning corpus as one string (modules joined by a blank line).

    Python source code with docstrings from the pure-Python modules in :data:`FINETUNE_MODULES`
    (about 0.61 million characters on CPython 3.11); deterministic for a given Python
    installation and different in kind from :func:`stdlib_docs_text` (code rather than prose).

    Returns:
        The joined text.

    Example:
        >>> text = stdlib_finetune_text()
        >>> "def bisect_right" in text
        True
    """
    return "\n\n".join(stdlib_finetune_documents())


# --------------------------------------------------------------------------------------------
# The built-in instruction set

#: More pure-Python modules for the instruction set (none is in the base model's pretraining
#: corpus, ``scripts/pretrain_base.py``), sorted.
INSTRUCT_EXTRA_MODULES: tuple[str, ...] = (
    "bdb",
    "cmd",
    "email.utils",
    "gzip",
    "ipaddress",
    "locale",
    "mimetypes",
    "operator",
    "optparse",
    "pstats",
    "selectors",
    "tarfile",
    "timeit",
    "weakref",
    "zipfile",
)

#: The system turn of every built-in instruction example.
INSTRUCT_SYSTEM = "Answer questions about the Python standard library."

_WHAT = ("What does `{}` do?", "Explain `{}` briefly.", "What is `{}` for?")


def _summary(doc: str) -> str:
    """The docstring's first paragraph on one line, cut after a sentence past 300 characters."""
    first = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(first.split())
    if len(text) > 300:
        cut = text.find(". ", 200)
        text = text[: cut + 1] if 0 < cut < 400 else text[:300].rsplit(" ", 1)[0] + " ..."
    return text


def _signature(node: ast.FunctionDef, method: bool) -> str:
    args = node.args
    if method and (args.posonlyargs or args.args):
        args = ast.arguments(
            posonlyargs=args.posonlyargs[1:] if args.posonlyargs else [],
            args=args.args[1:] if not args.posonlyargs else args.args,
            vararg=args.vararg,
            kwonlyargs=args.kwonlyargs,
            kw_defaults=args.kw_defaults,
            kwarg=args.kwarg,
            defaults=args.defaults,
        )
        if len(args.defaults) > len(args.posonlyargs) + len(args.args):
            args.defaults = args.defaults[1:]
    for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs):
        arg.annotation = None
    for extra in (args.vararg, args.kwarg):
        if extra is not None:
            extra.annotation = None
    return ast.unparse(args)


def _public_items(name: str) -> list[tuple[str, str, ast.AST, bool]]:
    """``(qualified name, kind, node, is_method)`` of the documented public API of a module."""
    source = _module_source(name)
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a docstrings-only fallback text: no API to ask about
        return []
    items = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if not ast.get_docstring(node):
            continue
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        items.append((f"{name}.{node.name}", kind, node, False))
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if (
                    isinstance(sub, ast.FunctionDef)
                    and not sub.name.startswith("_")
                    and ast.get_docstring(sub)
                ):
                    items.append((f"{name}.{node.name}.{sub.name}", "method", sub, True))
    return items


def stdlib_instruct_records() -> list[Record]:
    """The built-in instruction set: questions about standard-library APIs, as chat records.

    For every public, documented function, class and method of `FINETUNE_MODULES` and
    `INSTRUCT_EXTRA_MODULES` (read from source with `ast`, nothing is imported):

    * "What does `json.dumps` do?" (or "Explain ... briefly." / "What is ... for?", in turn;
      "What is the `X` class?" for classes) -> the docstring's first paragraph, on one line;
    * for functions and methods with parameters, "What are the parameters of `json.dumps`?"
      -> ``json.dumps(obj, *, skipkeys=False, ...)`` (annotations dropped, ``self`` too).

    Each record is ``system`` (`INSTRUCT_SYSTEM`), ``user`` (the question), ``assistant``
    (the answer). The list is shuffled with a fixed seed, so its last examples (the held-out
    slice of a run) are a random sample. About 1,300 records (the count and the text depend on
    the Python version's docstrings; fixed for a given installation).

    Returns:
        The records; ``source`` is ``builtin:instruct#<i> (<name>)``.

    Example:
        >>> records = stdlib_instruct_records()
        >>> len(records) > 1000
        True
        >>> questions = [q for r in records for role, q in r.messages if role == "user"]
        >>> "What are the parameters of `json.dumps`?" in questions
        True
    """
    pairs: list[tuple[str, str, str]] = []
    for module in (*FINETUNE_MODULES, *INSTRUCT_EXTRA_MODULES):
        for qualified, kind, node, method in _public_items(module):
            summary = _summary(ast.get_docstring(node) or "")
            if len(summary) < 12:
                continue
            if kind == "class":
                question = f"What is the `{qualified}` class?"
            else:
                question = _WHAT[len(pairs) % len(_WHAT)].format(qualified)
            pairs.append((qualified, question, summary))
            if kind != "class":
                params = _signature(node, method)
                if params:
                    pairs.append(
                        (
                            qualified,
                            f"What are the parameters of `{qualified}`?",
                            f"`{qualified}({params})`",
                        )
                    )
    order = np.random.default_rng(0).permutation(len(pairs))
    records = []
    for i, k in enumerate(order):
        qualified, question, answer = pairs[int(k)]
        turns = (("system", INSTRUCT_SYSTEM), ("user", question), ("assistant", answer))
        records.append(Record(f"builtin:instruct#{i} ({qualified})", "chat", messages=turns))
    return records


def _code_records() -> list[Record]:
    return [
        Record(f"builtin:code#{i} ({name})", "text", text=text)
        for i, (name, text) in enumerate(zip(FINETUNE_MODULES, stdlib_finetune_documents()))
    ]


#: The built-in data sets (``--data builtin:NAME``): name -> (description, records function).
BUILTIN_DATA = {
    "code": (
        "source of the standard-library modules in rslora_jax.data.FINETUNE_MODULES (plain text)",
        _code_records,
    ),
    "instruct": (
        "questions about standard-library functions, classes and methods answered from their "
        "docstrings and signatures (chat rows, rslora_jax.data.stdlib_instruct_records)",
        stdlib_instruct_records,
    ),
}


def builtin_records(name: str) -> list[Record]:
    """The records of a built-in data set (`BUILTIN_DATA`: ``"code"``, ``"instruct"``).

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> [r.format for r in builtin_records("code")][:2]
        ['text', 'text']
    """
    if name not in BUILTIN_DATA:
        raise ValueError(
            f"unknown built-in data set {name!r}; known: "
            + ", ".join(f"builtin:{k}" for k in BUILTIN_DATA)
        )
    return BUILTIN_DATA[name][1]()
