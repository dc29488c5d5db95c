"""The prompt filter's normalization: what a reader cannot see goes, runs of space shrink."""

from __future__ import annotations

import pytest

from plugins.prompt_filter import normalize_text


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("ｉｇｎｏｒｅ ａｌｌ", "ignore all"),  # fullwidth -> ASCII (NFKC)
        ("ﬁle №5", "file No5"),  # ligature and compatibility characters
        ("ig\u200bno\u200dre", "ignore"),  # zero-width space / joiner
        ("soft\u00adhyphen", "softhyphen"),
        ("\ufeffBOM first", "BOM first"),
        ("abc\u202edef\u202c", "abcdef"),  # bidi override and pop
        ("x\u2066y\u2069z", "xyz"),  # bidi isolates
        ("word\U000e0069\U000e0067\U000e006eword", "wordword"),  # Unicode tag characters
        ("a\u2062b", "ab"),  # invisible times
    ],
)
def test_normalize_removes_what_a_reader_cannot_see(raw: str, clean: str) -> None:
    assert normalize_text(raw) == clean


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a  b", "a b"),
        ("a \t  b", "a b"),
        ("a\t\tb", "a b"),
        ("a\u3000\u3000b", "a b"),  # ideographic spaces become one space
        ("a\u00a0 b", "a b"),
    ],
)
def test_normalize_collapses_space_runs(raw: str, clean: str) -> None:
    assert normalize_text(raw) == clean


def test_normalize_keeps_a_single_tab_and_single_newlines() -> None:
    assert normalize_text("col1\tcol2\nrow2\n\nnext") == "col1\tcol2\nrow2\n\nnext"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\n\n\nb", "a\n\nb"),
        ("a\n\n\n\n\n\nb", "a\n\nb"),
        ("a\n  \n\t\n \nb", "a\n\nb"),
        ("a\r\n\r\n\r\n\r\nb", "a\n\nb"),
        ("é\n\n\n\nb", "é\n\nb"),
    ],
)
def test_normalize_collapses_blank_line_runs_to_one_blank_line(raw: str, clean: str) -> None:
    assert normalize_text(raw) == clean


@pytest.mark.parametrize(
    "text",
    [
        "Summarize this article in three bullet points.",
        "def f(x):\n\treturn x # ok\n\nprint(f(1))",
        "",
        "Crème brûlée – “quotes” and 日本語 stay.",
    ],
)
def test_normalize_leaves_ordinary_text_unchanged(text: str) -> None:
    assert normalize_text(text) == text


def test_normalize_keeps_leading_indentation() -> None:
    # Indentation carries meaning (Python blocks, nested Markdown lists, code blocks): a prompt
    # asking about this code must reach the model with the code intact.
    code = "def f(x):\n    if x:\n        return 1\n    return 0"
    assert normalize_text(code) == code
    assert normalize_text("- item\n  - nested") == "- item\n  - nested"
