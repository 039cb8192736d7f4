"""Build the built-in tokenizer shipped in ``rslora_jax/assets/tokenizer/``.

A byte-level BPE tokenizer (GPT-2 style byte alphabet, no normalizer, so any text round-trips
exactly) with 2048 entries in total: the special tokens ``<s>`` (0), ``</s>`` (1), ``<unk>`` (2)
and ``<pad>`` (3), the 256 byte symbols, and 1788 merges learned from
``rslora_jax.data.stdlib_docs_text()`` (CPython's help topics, available offline). No
post-processor: encoding adds no special tokens.

The result is saved as a ``transformers`` tokenizer directory with
``PreTrainedTokenizerFast.save_pretrained``. transformers 5 records its own class name
(``TokenizersBackend``) in ``tokenizer_config.json``, which transformers 4 cannot resolve; the
script writes ``PreTrainedTokenizerFast`` instead, a name both major versions load
(``AutoTokenizer.from_pretrained(directory)``).

Usage (from the repository root)::

    python scripts/build_tokenizer.py [--out rslora_jax/assets/tokenizer] [--vocab-size 2048]

Training is deterministic: rebuilding on the same Python version gives identical files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")
PORTABLE_CLASS = "PreTrainedTokenizerFast"


def build(vocab_size: int = 2048):
    """Train the byte-level BPE tokenizer on the stdlib help topics.

    Args:
        vocab_size: Total vocabulary size, special tokens included.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` wrapping the trained tokenizer.

    Raises:
        ValueError: If ``vocab_size`` leaves no room for merges or training falls short of it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(REPO))
    from rslora_jax.data import stdlib_docs_text

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must exceed {len(alphabet) + len(SPECIAL_TOKENS)} (bytes + specials), "
            f"got {vocab_size}"
        )
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator([stdlib_docs_text()], trainer=trainer)
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(
            f"training produced {backend.get_vocab_size()} tokens, wanted {vocab_size}"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def save(tokenizer, out: Path) -> list[Path]:
    """Save ``tokenizer`` into ``out`` with a tokenizer class name that transformers 4 and 5 load.

    Args:
        tokenizer: The tokenizer from :func:`build`.
        out: Output directory (created if missing).

    Returns:
        The files written.
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.json"):
        stale.unlink()
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") != PORTABLE_CLASS:
        config["tokenizer_class"] = PORTABLE_CLASS
        config_path.write_text(
            json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
    return sorted(out.iterdir())


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "rslora_jax" / "assets" / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    files = save(build(args.vocab_size), args.out)
    for path in files:
        print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
