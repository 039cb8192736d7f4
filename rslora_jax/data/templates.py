"""Chat templates: rendering a conversation to text, with the character spans of its answers.

A chat row goes through the tokenizer's own template (``tokenizer.apply_chat_template``, the
Jinja template in its ``tokenizer_config.json``), or through a template file the user gives
(``--chat-template FILE``), or, for a tokenizer that has none, through `DEFAULT_CHAT_TEMPLATE`::

    <|system|>
    You answer questions.</s>
    <|user|>
    What does `json.dumps` do?</s>
    <|assistant|>
    Serialize ``obj`` to a JSON formatted ``str``.</s>

(``</s>`` is the tokenizer's end-of-sequence token; each turn ends with it and a newline, and
generation is prompted with ``<|assistant|>`` and a newline.)

The answer spans come from rendering prefixes: assistant turn ``i`` spans from the end of the
conversation before it, rendered with the generation prompt, to the end of the conversation up
to it (trailing whitespace dropped). That needs a template that renders a conversation's
prefix as a prefix of its text, which the common templates (Llama 3, Qwen2, Mistral, Gemma,
ChatML, Zephyr) do; a template that does not is reported, with the row and the turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rslora_jax.data.records import DataError

__all__ = ["DEFAULT_CHAT_TEMPLATE", "load_chat_template", "render_chat"]

#: The template for tokenizers without one (the built-in tokenizer has none): Zephyr's layout.
DEFAULT_CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def load_chat_template(path: str | Path) -> str:
    """Reads a Jinja chat template from a file (``--chat-template FILE``).

    A ``.json`` file is read as a ``tokenizer_config.json``-like object and its
    ``chat_template`` entry is used; any other file is the template itself.

    Raises:
        DataError: naming the file when it is missing, unreadable, empty, or a JSON file
            without a string ``chat_template``.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.jinja"
        >>> _ = path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        >>> load_chat_template(path)[:6]
        '{% for'
    """
    import json

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--chat-template {path}: cannot be read: {err}") from None
    if path.suffix.lower() == ".json":
        try:
            text = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as err:
            raise DataError(f"--chat-template {path}: not a JSON object: {err}") from None
        if not isinstance(text, str):
            raise DataError(f"--chat-template {path}: no string 'chat_template' entry")
    if not text.strip():
        raise DataError(f"--chat-template {path}: the file is empty")
    return text


def _render(
    tokenizer: Any, turns: list[dict[str, str]], template: str, generation: bool, where: str
) -> str:
    try:
        out = tokenizer.apply_chat_template(
            turns, chat_template=template, tokenize=False, add_generation_prompt=generation
        )
    except Exception as err:  # Jinja's and the template's own errors (raise_exception)
        raise DataError(f"{where}: the chat template fails to render: {err}") from None
    if not isinstance(out, str):
        raise DataError(f"{where}: the chat template rendered {type(out).__name__}, not text")
    return out


def render_chat(
    tokenizer: Any,
    messages: tuple[tuple[str, str], ...],
    template: str | None = None,
    *,
    where: str = "chat row",
    locate_answers: bool = True,
) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation; returns its text and the character spans of its answers.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        messages: ``((role, content), ...)``.
        template: a Jinja template; None for the tokenizer's own, or `DEFAULT_CHAT_TEMPLATE`
            when it has none.
        where: the row, for errors.
        locate_answers: find the answer spans (False: return no spans and skip the prefix
            renderings).

    Returns:
        ``(text, spans)``: one ``(start, end)`` per assistant turn, ``text[start:end]`` its
        rendering (content and end-of-turn marker, trailing whitespace dropped).

    Raises:
        DataError: naming `where`, when the template fails to render or does not render a
            prefix of the conversation as a prefix of its text.

    Example:
        >>> from rslora_jax.data.tokens import load_tokenizer
        >>> text, spans = render_chat(load_tokenizer(), (("user", "Hi?"), ("assistant", "Hello.")))
        >>> text
        '<|user|>\\nHi?</s>\\n<|assistant|>\\nHello.</s>\\n'
        >>> [text[a:b] for a, b in spans]
        ['Hello.</s>']
    """
    if template is None:
        template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    turns = [{"role": role, "content": content} for role, content in messages]
    text = _render(tokenizer, turns, template, False, where)
    spans: list[tuple[int, int]] = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant" or not locate_answers:
            continue
        before = _render(tokenizer, turns[:i], template, True, where) if i else ""
        upto = _render(tokenizer, turns[: i + 1], template, False, where)
        if not upto.startswith(before) or not text.startswith(upto):
            raise DataError(
                f"{where}: messages[{i}]: the chat template does not render the conversation "
                "before this assistant turn as a prefix of the whole, so the answer cannot be "
                "located; give a template that does (--chat-template FILE) or train on every "
                "token (--train-on-prompt)"
            )
        end = len(upto.rstrip())
        if end <= len(before):
            raise DataError(f"{where}: messages[{i}].content: the answer renders as nothing")
        spans.append((len(before), end))
    return text, spans
