"""Instruction data (`rslora_jax.data`): formats, chat templates, answer masks, packing, the
built-in instruction set, and bad rows reported with file, line and field.

References are written here: the expected token ids come from encoding the pieces of the text
one by one (prompt, answer, end) with the tokenizer, and the expected answer positions are the
positions of the answer piece.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rslora_jax import data


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer()


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does `len` return?"},
        {"role": "assistant", "content": "The number of items."},
    ]
}


def _expected(tok, fmt: str) -> tuple[list[int], list[int]]:
    """(token ids, answer positions) of each format's row, from pieces encoded one by one."""
    eos = tok.eos_token
    if fmt == "text":
        ids = [*_enc(tok, "Plain text."), tok.eos_token_id]
        return ids, list(range(len(ids)))
    if fmt == "completion":
        prompt, answer = _enc(tok, "2+2=\n"), [*_enc(tok, "4"), tok.eos_token_id]
    elif fmt == "alpaca":
        prompt = _enc(tok, "<|user|>\nAdd.\n\n2 and 2" + eos + "\n<|assistant|>\n")
        answer = _enc(tok, "4" + eos)
    else:
        prompt = _enc(
            tok,
            f"<|system|>\nBe brief.{eos}\n<|user|>\nWhat does `len` return?{eos}\n<|assistant|>\n",
        )
        answer = _enc(tok, "The number of items." + eos)
    tail = _enc(tok, "\n") if fmt in ("alpaca", "chat") else []
    ids = prompt + answer + tail
    return ids, list(range(len(prompt), len(prompt) + len(answer)))


ROWS = {
    "text": {"text": "Plain text."},
    "completion": {"prompt": "2+2=", "completion": "4"},
    "alpaca": {"instruction": "Add.", "input": "2 and 2", "output": "4"},
    "chat": CHAT,
}


@pytest.mark.parametrize("fmt", sorted(ROWS))
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_answer_masks_match_a_reference(tok, tmp_path, fmt, train_on_prompt):
    path = _write(tmp_path / "d.jsonl", [ROWS[fmt]])
    (record,) = data.load_records([path])
    assert record.format == ("chat" if fmt == "alpaca" else fmt)
    (ex,) = data.tokenize_records([record], tok, train_on_prompt=train_on_prompt)
    ids, answer = _expected(tok, fmt)
    assert ex.ids.tolist() == ids
    counted = list(range(len(ids))) if train_on_prompt else answer
    assert np.flatnonzero(ex.weights).tolist() == counted


def test_formats_are_detected_and_forced(tmp_path):
    rows = [ROWS["chat"], ROWS["completion"], ROWS["alpaca"], ROWS["text"], {"body": "x"}]
    path = _write(tmp_path / "mixed.jsonl", rows[:4])
    assert [r.format for r in data.load_records([path])] == ["chat", "completion", "chat", "text"]
    forced = _write(tmp_path / "forced.jsonl", [{"prompt": "p", "completion": "c", "text": "t"}])
    assert data.load_records([forced], format="text")[0].text == "t"
    custom = _write(tmp_path / "custom.jsonl", rows[4:])
    assert data.load_records([custom], text_field="body")[0].text == "x"
    conversational = _write(
        tmp_path / "conv.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "Hi?"}],
                "completion": [{"role": "assistant", "content": "Hello."}],
            }
        ],
    )
    (record,) = data.load_records([conversational])
    assert record.messages == (("user", "Hi?"), ("assistant", "Hello."))


def test_json_arrays_and_plain_files(tmp_path):
    array = tmp_path / "rows.json"
    array.write_text(
        '[\n  {"text": "one"},\n  {"prompt": "p",\n   "completion": "c"}\n]\n', encoding="utf-8"
    )
    plain = tmp_path / "notes.md"
    plain.write_text("# Notes\n\nbody\n", encoding="utf-8")
    records = data.load_records([array, plain])
    assert [(r.source.rsplit("/", 1)[-1], r.format) for r in records] == [
        ("rows.json:2", "text"),
        ("rows.json:3", "completion"),
        ("notes.md:1", "text"),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"text": "one"},\n  {"messages": []}\n]', encoding="utf-8")
    with pytest.raises(data.DataError, match=r"bad\.json:3: field 'messages' must be a non-empty"):
        data.load_records([bad])
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "one"}\n  {"text": "two"}\n]', encoding="utf-8")
    with pytest.raises(data.DataError, match=r"broken\.json:3: expected ',' or ']'"):
        data.load_records([broken])


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS["completion"], ROWS["completion"]]), path)
    records = data.load_records([path])
    assert [r.format for r in records] == ["completion", "completion"]
    assert records[1].source.endswith("rows.parquet: row 1")
    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT]), chat)
    assert data.load_records([chat])[0].messages[2] == ("assistant", "The number of items.")


# ------------------------------------------------------------------------------------------
# Bad rows: file, line and field


def _turns(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


BAD_ROWS = {
    "unknown role": (
        _turns(("user", "q"), ("robot", "a")),
        r"bad\.jsonl:2: messages\[1\]\.role: unknown role 'robot'",
    ),
    "no content": (
        _turns(("user", "q"), ("assistant", "  ")),
        r"bad\.jsonl:2: messages\[1\]\.content: the assistant turn has no content",
    ),
    "missing content": (
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
        r"bad\.jsonl:2: messages\[0\]\.content: the user turn has no content",
    ),
    "no assistant turn": (
        _turns(("system", "s"), ("user", "q")),
        r"bad\.jsonl:2: field 'messages' has no assistant turn",
    ),
    "content not a string": (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        r"bad\.jsonl:2: messages\[0\]\.content must be a string, got list",
    ),
    "completion not a string": (
        {"prompt": "p", "completion": 3},
        r"bad\.jsonl:2: field 'completion' must be a string, got int",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_line_and_field(tmp_path, case):
    row, message = BAD_ROWS[case]
    path = _write(tmp_path / "bad.jsonl", [ROWS["text"], row])
    with pytest.raises(data.DataError, match=message):
        data.load_records([path])


def test_empty_completion_and_failing_template_name_the_row(tok, tmp_path):
    path = _write(tmp_path / "d.jsonl", [ROWS["completion"], {"prompt": "p", "completion": ""}])
    records = data.load_records([path])
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: field 'completion' is empty after"):
        data.tokenize_records(records, tok)
    chat = data.load_records([_write(tmp_path / "c.jsonl", [CHAT])])
    template = "{{ raise_exception('no system turns here') }}"
    with pytest.raises(data.DataError, match=r"c\.jsonl:1: the chat template fails to render.*"):
        data.tokenize_records(chat, tok, chat_template=template)
    syntax = "{% for m in messages %}{{ m.content }"
    with pytest.raises(data.DataError, match=r"c\.jsonl:1: the chat template fails to render"):
        data.tokenize_records(chat, tok, chat_template=syntax)
    unstable = "{% for m in messages|reverse %}{{ m.content }}{% endfor %}"
    with pytest.raises(data.DataError, match=r"c\.jsonl:1: messages\[2\]: .* not render"):
        data.tokenize_records(chat, tok, chat_template=unstable)


def test_chat_template_file(tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}|{% endfor %}", encoding="utf-8")
    assert data.load_chat_template(jinja).startswith("{% for")
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "X"}), encoding="utf-8")
    assert data.load_chat_template(config) == "X"
    with pytest.raises(data.DataError, match="cannot be read"):
        data.load_chat_template(tmp_path / "missing.jinja")
    config.write_text("{}", encoding="utf-8")
    with pytest.raises(data.DataError, match="no string 'chat_template'"):
        data.load_chat_template(config)


# ------------------------------------------------------------------------------------------
# Packing


def _example(ids, weights, source="x", windowed=False):
    return data.Example(np.asarray(ids, np.int32), np.asarray(weights, np.uint8), source, windowed)


def test_packing_layout_by_hand():
    examples = [
        _example([1, 2, 3, 4], [0, 0, 1, 1]),  # 3 slots
        _example([5, 6], [0, 1]),  # 1 slot
        _example([7, 8, 9], [0, 1, 1]),  # 2 slots
    ]
    rows, stats = data.pack_examples(examples, seq_len=4)
    f = data.fields(rows)
    # Best fit by decreasing length: [ex0 (3), ex1 (1)], [ex2 (2)].
    assert f["inputs"].tolist() == [[1, 2, 3, 5], [7, 8, 0, 0]]
    assert f["targets"].tolist() == [[2, 3, 4, 6], [8, 9, 0, 0]]
    assert f["weights"].tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]
    assert f["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 1, 0, 0]]
    assert f["positions"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]
    assert (stats.rows, stats.slots, stats.counted, stats.dropped) == (2, 6, 5, 0)
    one, _ = data.pack_examples(examples, seq_len=4, pack=False)
    assert one.shape == (3, 5, 4)


def test_cut_off_answers_are_counted_and_dropped():
    examples = [
        _example([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 1], "late"),  # answer past the cut
        _example([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 1, 1], "partial"),
        _example([7, 8], [0, 1], "short"),
    ]
    rows, stats = data.pack_examples(examples, seq_len=3)
    assert (stats.dropped, stats.truncated, stats.dropped_sources) == (1, 1, ("late",))
    assert "1 dropped (answer cut off entirely by seq_len: late)" in stats.describe()
    assert int(data.fields(rows)["weights"].sum()) == 2 + 1
    with pytest.raises(ValueError, match="none of the 1 examples"):
        data.pack_examples(examples[:1], seq_len=3)


def test_windows_of_long_texts_cover_every_target_once():
    ex = _example(np.arange(10), np.ones(10), "doc", windowed=True)
    windows = data.window_examples([ex], seq_len=4)
    assert [w.ids.tolist() for w in windows] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    rows, stats = data.pack_examples(windows, seq_len=4)
    f = data.fields(rows)
    targets = sorted(f["targets"][f["weights"] > 0].tolist())
    assert targets == list(range(1, 10)) and stats.counted == 9


# ------------------------------------------------------------------------------------------
# Built-in data


def test_builtin_instruct_set(tok):
    records = data.builtin_records("instruct")
    assert len(records) > 800
    assert records == data.stdlib_instruct_records()  # deterministic
    for record in records[:50]:
        roles = [role for role, _ in record.messages]
        assert roles == ["system", "user", "assistant"] and record.format == "chat"
    answers = {q: a for r in records for (_, q), (_, a) in [r.messages[1:]]}
    params = answers["What are the parameters of `json.dumps`?"]
    assert params.startswith("`json.dumps(obj, *, skipkeys=False")
    examples = data.tokenize_records(records[:20], tok)
    assert all(ex.weights[1:].any() for ex in examples)
    with pytest.raises(ValueError, match="builtin:instruct"):
        data.builtin_records("nope")
