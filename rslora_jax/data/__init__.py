"""Training data: offline corpora, file formats, chat templates, answer masks, packing, batches.

Everything here is plain Python and NumPy: no JAX device work happens in this package, and
``tokenizers``/``transformers`` are imported inside the functions that use them, so
``import rslora_jax.data`` stays light. One module per idea:

    corpora    built-in offline data: CPython's help topics, standard-library source
               (``builtin:code``), questions and answers from docstrings (``builtin:instruct``)
    records    files -> `Record` s: text / prompt+completion / Alpaca / chat (``messages``) rows
               in JSON Lines, JSON arrays, Parquet or plain text, checked with file:line:field
    templates  chat rows -> text through the tokenizer's chat template, with the answers' spans
    tokens     the tokenizer loader; records -> `Example` s (token ids + which tokens the loss
               counts: answers only unless ``train_on_prompt``); the plain stream packer
    packing    examples -> rows with segment ids and restarting positions (no attention across
               examples), long texts windowed, cut-off answers counted and reported
    batches    held-out splits and the resumable, per-process `batch_iterator`

Data flows one way (what the fine-tuning command does)::

    load_records(paths) or builtin_records("instruct")        -> [Record]
    tokenize_records(records, tokenizer, train_on_prompt=...)   -> [Example]
    split_examples(examples, eval_fraction)                     -> train, held-out examples
    pack_examples(examples, seq_len)                            -> (N, 5, seq_len) int32, stats
    batch_iterator(rows, batch_size, seed=..., start_step=t)    -> (batch, 5, seq_len) ...

and the plain language-model path (``examples/rank_sweep.py``)::

    stdlib_finetune_documents() -> tokenize_and_pack(documents, tokenizer, seq_len)
        -> (N, seq_len + 1) windows of one token stream -> split_sequences -> batch_iterator
"""

from rslora_jax.data.batches import batch_iterator, split_examples, split_sequences, split_text
from rslora_jax.data.corpora import (
    BUILTIN_DATA,
    FINETUNE_MODULES,
    INSTRUCT_EXTRA_MODULES,
    INSTRUCT_SYSTEM,
    builtin_records,
    stdlib_docs_documents,
    stdlib_docs_text,
    stdlib_finetune_documents,
    stdlib_finetune_text,
    stdlib_instruct_records,
)
from rslora_jax.data.packing import FIELDS, PackStats, fields, pack_examples, window_examples
from rslora_jax.data.records import (
    FORMATS,
    ROLES,
    DataError,
    Record,
    load_records,
    load_texts,
    record_from_json,
)
from rslora_jax.data.templates import DEFAULT_CHAT_TEMPLATE, load_chat_template, render_chat
from rslora_jax.data.tokens import (
    BUILTIN_TOKENIZER_DIR,
    Example,
    load_tokenizer,
    tokenize_and_pack,
    tokenize_records,
)

__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_TOKENIZER_DIR",
    "DEFAULT_CHAT_TEMPLATE",
    "FIELDS",
    "FINETUNE_MODULES",
    "FORMATS",
    "INSTRUCT_EXTRA_MODULES",
    "INSTRUCT_SYSTEM",
    "ROLES",
    "DataError",
    "Example",
    "PackStats",
    "Record",
    "batch_iterator",
    "builtin_records",
    "fields",
    "load_chat_template",
    "load_records",
    "load_texts",
    "load_tokenizer",
    "pack_examples",
    "record_from_json",
    "render_chat",
    "split_examples",
    "split_sequences",
    "split_text",
    "stdlib_docs_documents",
    "stdlib_docs_text",
    "stdlib_finetune_documents",
    "stdlib_finetune_text",
    "stdlib_instruct_records",
    "tokenize_and_pack",
    "tokenize_records",
    "window_examples",
]
