"""Tests for rslora_jax.data: offline corpora, file loading, packing, batching, tokenizer asset."""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import py_compile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rslora_jax import data

REPO = Path(__file__).resolve().parent.parent


class CharTokenizer:
    """Independent toy tokenizer: one token per character (its code point), eos = 0."""

    eos_token_id: int | None = 0

    def __call__(self, texts, **kwargs):
        assert kwargs.get("add_special_tokens") is False
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(data.BUILTIN_TOKENIZER_DIR), local_files_only=True)


# ------------------------------------------------------------------------------------------
# Built-in corpora
# ------------------------------------------------------------------------------------------


def test_docs_corpus_is_the_pydoc_topics_in_sorted_order():
    from pydoc_data.topics import topics

    text = data.stdlib_docs_text()
    assert text == "\n".join(topics[key] for key in sorted(topics))
    assert text.startswith('The "assert" statement')
    assert data.stdlib_docs_documents() == [topics[key] for key in sorted(topics)]


def test_finetune_corpus_is_the_module_sources():
    assert list(data.FINETUNE_MODULES) == sorted(set(data.FINETUNE_MODULES))
    docs = data.stdlib_finetune_documents()
    assert len(docs) == len(data.FINETUNE_MODULES)
    for name, doc in zip(data.FINETUNE_MODULES, docs):
        # Second code path: import the module and let inspect read its file.
        assert doc == inspect.getsource(importlib.import_module(name)), name
    assert data.stdlib_finetune_text() == "\n\n".join(docs)


def test_corpora_sizes_nonempty_and_different():
    docs_text = data.stdlib_docs_text()
    ft_text = data.stdlib_finetune_text()
    assert 300_000 <= len(ft_text) <= 800_000
    assert len(docs_text) > 100_000
    assert docs_text != ft_text
    # Different in kind: code (many function definitions per character) versus prose.
    assert ft_text.count("def ") / len(ft_text) > 5 * docs_text.count("def ") / len(docs_text)


def test_corpora_deterministic_across_processes():
    script = (
        "import hashlib; from rslora_jax import data; "
        "print(hashlib.sha256(data.stdlib_docs_text().encode()).hexdigest()); "
        "print(hashlib.sha256(data.stdlib_finetune_text().encode()).hexdigest())"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO,
            env={"PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(result.stdout.split())
    expected = [
        hashlib.sha256(data.stdlib_docs_text().encode()).hexdigest(),
        hashlib.sha256(data.stdlib_finetune_text().encode()).hexdigest(),
    ]
    assert outputs[0] == outputs[1] == expected


def test_bytecode_only_module_falls_back_to_docstrings(tmp_path, monkeypatch):
    source = tmp_path / "rslora_sourceless_demo.py"
    source.write_text(
        '"""Module doc."""\n\n'
        "def helper():\n"
        '    """Helper doc."""\n\n'
        "class Thing:\n"
        '    """Thing doc."""\n'
    )
    py_compile.compile(str(source), cfile=str(tmp_path / "rslora_sourceless_demo.pyc"))
    source.unlink()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rslora_sourceless_demo", raising=False)
    try:
        text = data.corpora._module_source("rslora_sourceless_demo")
    finally:
        sys.modules.pop("rslora_sourceless_demo", None)
    assert text == "Module doc.\n\nThing:\nThing doc.\n\nhelper:\nHelper doc.\n"


def test_missing_module_is_reported():
    with pytest.raises(RuntimeError, match="no_such_module_xyz"):
        data.corpora._module_source("no_such_module_xyz")


# ------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------


def test_split_text_cuts_at_line_start():
    text = "".join(f"line {i:02d}\n" for i in range(20))  # 20 lines of 8 characters
    train, held = data.split_text(text, eval_fraction=0.05)
    assert (train, held) == (text[: 19 * 8], "line 19\n")
    train, held = data.split_text(text, eval_fraction=0.12)  # 19.2 chars -> cut back to a line
    assert held == "line 17\nline 18\nline 19\n" and train + held == text
    # No newline before the cut: exact character position.
    assert data.split_text("abcdefghij", eval_fraction=0.2) == ("abcdefgh", "ij")


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True, "0.1"])
def test_split_fraction_validated(fraction):
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_text("abc\ndef\n", eval_fraction=fraction)
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_sequences(np.zeros((4, 3), np.int32), eval_fraction=fraction)


def test_split_sequences_holds_out_last_rows():
    rows = np.arange(30, dtype=np.int32).reshape(10, 3)
    train, held = data.split_sequences(rows, eval_fraction=0.05)
    np.testing.assert_array_equal(train, rows[:9])
    np.testing.assert_array_equal(held, [[27, 28, 29]])
    train, held = data.split_sequences(rows, eval_fraction=0.25)  # ceil(2.5) = 3
    assert train.shape == (7, 3) and held.shape == (3, 3)
    train, held = data.split_sequences(rows[:2], eval_fraction=0.9)  # keeps one training row
    assert train.shape == (1, 3) and held.shape == (1, 3)
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        data.split_sequences(rows[:1])


# ------------------------------------------------------------------------------------------
# load_texts
# ------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_plain_text_whole_file_is_one_document(tmp_path):
    a = _write(tmp_path / "a.txt", "First paragraph.\n\nSecond paragraph.\n")
    b = _write(tmp_path / "b.md", "# Title\n\nbody\n")
    empty = _write(tmp_path / "c.txt", "  \n\n")
    assert data.load_texts([a, str(empty), b]) == [
        "First paragraph.\n\nSecond paragraph.\n",
        "# Title\n\nbody\n",
    ]


def test_load_jsonl_fields(tmp_path):
    lines = [
        {"text": "plain"},
        {"prompt": "Q: 2+2?", "completion": "4"},
        {"prompt": "Q: 2+2?\n", "completion": "4"},
        {"prompt": "Say", "completion": " hi"},
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"instruction": "Add.", "input": "", "output": "4"},
        {"instruction": "Add.", "output": "4"},
        {"text": "   "},
        {"text": "text wins", "prompt": "p", "completion": "c"},
    ]
    body = "\n".join(json.dumps(line) for line in lines[:3]) + "\n\n  \n"
    body += "\n".join(json.dumps(line) for line in lines[3:]) + "\n"
    path = _write(tmp_path / "d.JSONL", body)
    assert data.load_texts([path]) == [
        "plain",
        "Q: 2+2?\n4",
        "Q: 2+2?\n4",
        "Say hi",
        "Add.\n2 and 2\n4",
        "Add.\n4",
        "Add.\n4",
        "text wins",
    ]


def test_load_jsonl_custom_field_bom_and_order(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_bytes("\ufeff".encode() + b'{"body": "one"}\r\n{"body": "two \xc3\xa9"}\r\n')
    b = _write(tmp_path / "b.txt", "three")
    assert data.load_texts([b, a], text_field="body") == ["three", "one", "two é"]


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=r"nope\.txt does not exist"):
        data.load_texts([missing])


def test_load_directory(tmp_path):
    with pytest.raises(ValueError, match="is not a regular file"):
        data.load_texts([tmp_path])


def test_load_invalid_json_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        data.load_texts([path])


def test_load_non_object_line(tmp_path):
    path = _write(tmp_path / "list.jsonl", '{"text": "ok"}\n["text"]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl:2: expected a JSON object, got list"):
        data.load_texts([path])


def test_load_missing_field(tmp_path):
    path = _write(tmp_path / "field.jsonl", '{"text": "ok"}\n{"prompt": "p", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"field\.jsonl:2: missing field 'text'.*'answer'"):
        data.load_texts([path])
    with pytest.raises(ValueError, match=r"field\.jsonl:1: missing field 'content'"):
        data.load_texts([path], text_field="content")


def test_load_non_string_field(tmp_path):
    path = _write(tmp_path / "num.jsonl", '{"text": 3}\n')
    with pytest.raises(ValueError, match=r"num\.jsonl:1: field 'text' must be a string, got int"):
        data.load_texts([path])
    path = _write(tmp_path / "inp.jsonl", '{"instruction": "a", "input": 1, "output": "b"}\n')
    with pytest.raises(ValueError, match=r"inp\.jsonl:1: field 'input'"):
        data.load_texts([path])


def test_load_invalid_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not valid UTF-8"):
        data.load_texts([path])


def test_load_empty_data(tmp_path):
    a = _write(tmp_path / "blank.txt", " \n\t\n")
    b = _write(tmp_path / "blank.jsonl", '\n{"text": "  "}\n')
    with pytest.raises(ValueError, match=r"no non-whitespace text.*blank\.txt.*blank\.jsonl"):
        data.load_texts([a, b])


def test_load_rejects_json_and_bad_arguments(tmp_path):
    path = _write(tmp_path / "x.json", '[{"text": "a"}]')
    with pytest.raises(ValueError, match=r"x\.json.*JSON Lines"):
        data.load_texts([path])
    with pytest.raises(ValueError, match="single path"):
        data.load_texts(str(path))
    with pytest.raises(ValueError, match="paths is empty"):
        data.load_texts([])
    with pytest.raises(ValueError, match="text_field"):
        data.load_texts([path], text_field="")


# ------------------------------------------------------------------------------------------
# tokenize_and_pack
# ------------------------------------------------------------------------------------------


def test_pack_hand_made_windows():
    rows = data.tokenize_and_pack(["abc", "de"], CharTokenizer(), seq_len=2)
    # stream: a b c <eos> d e <eos> = 97 98 99 0 100 101 0; windows of 3, stride 2.
    expected = [[97, 98, 99], [99, 0, 100], [100, 101, 0]]
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, expected)

    rows = data.tokenize_and_pack(["abc", "de"], CharTokenizer(), seq_len=3, add_eos=False)
    np.testing.assert_array_equal(rows, [[97, 98, 99, 100]])  # 'e' does not fill a window

    rows = data.tokenize_and_pack(["abcdefg"], CharTokenizer(), seq_len=3, add_eos=False)
    np.testing.assert_array_equal(rows, [[97, 98, 99, 100], [100, 101, 102, 103]])
    inputs, targets = rows[:, :-1], rows[:, 1:]
    np.testing.assert_array_equal(inputs.ravel(), [97, 98, 99, 100, 101, 102])
    np.testing.assert_array_equal(targets.ravel(), [98, 99, 100, 101, 102, 103])


def test_pack_too_few_tokens():
    with pytest.raises(ValueError, match=r"has 4 tokens .*seq_len=4 needs 5 tokens"):
        data.tokenize_and_pack(["abc"], CharTokenizer(), seq_len=4)
    data.tokenize_and_pack(["abcd"], CharTokenizer(), seq_len=4)  # exactly one window


def test_pack_argument_errors():
    with pytest.raises(ValueError, match="single str"):
        data.tokenize_and_pack("abc", CharTokenizer(), seq_len=1)
    with pytest.raises(ValueError, match="texts is empty"):
        data.tokenize_and_pack([], CharTokenizer(), seq_len=1)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        data.tokenize_and_pack(["a", 3], CharTokenizer(), seq_len=1)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="seq_len must be a positive int"):
            data.tokenize_and_pack(["abc"], CharTokenizer(), seq_len=bad)
    no_eos = CharTokenizer()
    no_eos.eos_token_id = None
    with pytest.raises(ValueError, match="no eos_token_id"):
        data.tokenize_and_pack(["abc"], no_eos, seq_len=1)
    assert data.tokenize_and_pack(["abc"], no_eos, seq_len=1, add_eos=False).shape == (2, 2)


def test_pack_with_builtin_tokenizer_matches_per_document_encoding(tokenizer):
    docs = data.stdlib_finetune_documents()[:3]
    stream = []
    for doc in docs:  # second code path: one encode call per document
        stream += [*tokenizer.encode(doc, add_special_tokens=False), tokenizer.eos_token_id]
    seq_len = 64
    rows = data.tokenize_and_pack(docs, tokenizer, seq_len)
    num = (len(stream) - 1) // seq_len
    assert rows.shape == (num, seq_len + 1)
    np.testing.assert_array_equal(rows[0], stream[: seq_len + 1])
    rebuilt = np.concatenate([rows[0], *(row[1:] for row in rows[1:])])
    np.testing.assert_array_equal(rebuilt, stream[: num * seq_len + 1])


# ------------------------------------------------------------------------------------------
# batch_iterator
# ------------------------------------------------------------------------------------------


def _rows(n: int, width: int = 3) -> np.ndarray:
    """Row i is [i, 1000 + i, ...]: its first column identifies it."""
    return (np.arange(n)[:, None] + 1000 * np.arange(width)[None, :]).astype(np.int64)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize(("n", "batch_size"), [(10, 5), (7, 3), (3, 8)])
def test_resume_matches_uninterrupted_run(n, batch_size):
    rows = _rows(n)
    full = _take(data.batch_iterator(rows, batch_size, seed=3), 12)
    for start in (1, 2, 5, 9):
        resumed = _take(data.batch_iterator(rows, batch_size, seed=3, start_step=start), 3)
        for got, want in zip(resumed, full[start : start + 3]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("n", "batch_size"), [(10, 5), (7, 3), (3, 8)])
def test_every_row_once_per_epoch(n, batch_size):
    rows = _rows(n)
    batches = _take(data.batch_iterator(rows, batch_size, seed=0), 4 * n)
    for batch in batches:
        assert batch.dtype == np.int32 and batch.shape == (batch_size, 3)
        np.testing.assert_array_equal(batch[:, 1], batch[:, 0] + 1000)  # whole rows
    order = np.concatenate([batch[:, 0] for batch in batches])
    for epoch in range(4):
        assert sorted(order[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))


def test_shuffles_by_seed_and_epoch():
    rows = _rows(50)
    first = np.concatenate(_take(data.batch_iterator(rows, 10, seed=0), 10))[:, 0]
    again = np.concatenate(_take(data.batch_iterator(rows, 10, seed=0), 10))[:, 0]
    other = np.concatenate(_take(data.batch_iterator(rows, 10, seed=1), 10))[:, 0]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[:50], np.arange(50))  # shuffled
    assert not np.array_equal(first[:50], first[50:])  # reshuffled each epoch
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(("n", "batch_size", "process_count"), [(10, 4, 2), (7, 8, 4), (5, 3, 3)])
def test_process_slices_concatenate_to_global_batch(n, batch_size, process_count):
    rows = _rows(n)
    for start in (0, 3):
        global_batches = _take(data.batch_iterator(rows, batch_size, seed=5, start_step=start), 6)
        local = [
            _take(
                data.batch_iterator(
                    rows,
                    batch_size,
                    seed=5,
                    start_step=start,
                    process_index=p,
                    process_count=process_count,
                ),
                6,
            )
            for p in range(process_count)
        ]
        for step in range(6):
            parts = [local[p][step] for p in range(process_count)]
            assert all(part.shape == (batch_size // process_count, 3) for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), global_batches[step])


def test_batch_iterator_errors_are_eager():
    rows = _rows(6)
    cases = [
        (dict(batch_size=4, process_count=3), "divisible by process_count=3"),
        (dict(batch_size=4, process_count=2, process_index=2), r"process_index must be in \[0"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(batch_size=2, seed=-1), "seed must be a non-negative int"),
        (dict(batch_size=2, start_step=-1), "start_step must be a non-negative int"),
        (dict(batch_size=2, process_count=0), "process_count must be a positive int"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("seed", 0)
        with pytest.raises(ValueError, match=message):
            data.batch_iterator(rows, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        data.batch_iterator(np.zeros(6, np.int32), 2, seed=0)
    with pytest.raises(ValueError, match="shape"):
        data.batch_iterator(np.zeros((0, 4), np.int32), 2, seed=0)
    with pytest.raises(ValueError, match="integer token ids"):
        data.batch_iterator(np.zeros((4, 4), np.float32), 2, seed=0)


# ------------------------------------------------------------------------------------------
# Tokenizer asset and module hygiene
# ------------------------------------------------------------------------------------------


def test_tokenizer_asset_files_are_small():
    files = sorted(p.name for p in data.BUILTIN_TOKENIZER_DIR.iterdir())
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    assert sum(p.stat().st_size for p in data.BUILTIN_TOKENIZER_DIR.iterdir()) < 1_000_000
    config = json.loads((data.BUILTIN_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert (
        config["tokenizer_class"] == "PreTrainedTokenizerFast"
    )  # loadable by transformers 4 and 5


def test_tokenizer_asset_loads_with_autotokenizer(tokenizer):
    assert len(tokenizer) == 2048
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert [*ids, tokenizer.unk_token_id, tokenizer.pad_token_id] == [0, 1, 2, 3]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == specials
    assert tokenizer.encode("x", add_special_tokens=True) == tokenizer.encode(
        "x", add_special_tokens=False
    )


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces, double  spaces , and a trailing dot .\n",
        "def f(x):\n\treturn x ** 2  # don't 'clean' me ; ok ?\r\n\n\n",
        '{}[]()<>!@#$%^&*_+-=|\\/~`"',
        "Unicode too: café, Ω ≈ 3.14 — 日本語 🙂",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < 2048 for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"] == ids


def test_load_tokenizer_returns_builtin(tokenizer):
    loaded = data.load_tokenizer()
    text = "tokenize me, please"
    assert loaded.encode(text) == tokenizer.encode(text)


def test_module_has_no_heavy_top_level_imports():
    top = set()
    for path in sorted((REPO / "rslora_jax" / "data").glob("*.py")):  # the package's modules
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                top.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                top.add(node.module.split(".")[0])
    assert top <= {
        "__future__",
        "ast",
        "bisect",
        "collections",
        "dataclasses",
        "importlib",
        "itertools",
        "json",
        "math",
        "numpy",
        "pathlib",
        "re",
        "rslora_jax",
        "typing",
    }, top
    script = (
        "import sys, rslora_jax.data; "
        "print(sorted(m for m in ('transformers', 'tokenizers', 'torch', 'pydoc_data') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"
