"""deepgate-rag's config checks and how it builds and places the cited context."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deepgate.chunking import count_tokens
from deepgate.vectorstore import Hit
from plugins.rag import Config, add_context, context_message, last_user_text


def hit(n: int, text: str, heading: str = "") -> Hit:
    meta: dict[str, Any] = {"source": f"docs/{n}.md", "chunk": 0}
    if heading:
        meta["heading"] = heading
    return Hit(id=f"id{n}", score=0.9 - n / 10, text=text, metadata=meta)


def test_config_defaults_and_checks() -> None:
    conf = Config.model_validate({"collection": "docs"})
    assert (conf.top_k, conf.max_context_tokens, conf.on_error) == (4, 1000, "open")
    with pytest.raises(ValidationError, match="collection name 'Docs!'"):
        Config.model_validate({"collection": "Docs!"})
    with pytest.raises(ValidationError, match="allowed_collections"):
        Config.model_validate({"collection": "docs", "allowed_collections": ["a b"]})
    with pytest.raises(ValidationError, match="store must be a DSN"):
        Config.model_validate({"collection": "docs", "store": "mysql://x"})
    with pytest.raises(ValidationError, match="extra"):
        Config.model_validate({"collection": "docs", "topk": 3})
    for store in ("$env://DEEPGATE_VECTOR_DSN", "sqlite:///v.db", "postgresql://u@h/db"):
        assert Config.model_validate({"collection": "docs", "store": store}).store == store


def test_context_numbers_cites_and_respects_the_budget() -> None:
    hits = [
        hit(1, "Short first fact.", "Guide > Setup"),
        hit(2, "word " * 400),  # too long for the budget: left out
        hit(3, "Short third fact."),
    ]
    text, used, tokens = context_message("Use the context.", hits, max_tokens=100)
    assert [h.id for h in used] == ["id1", "id3"]
    assert text == (
        "Use the context.\n\n[1] docs/1.md — Guide > Setup\nShort first fact."
        "\n\n[2] docs/3.md\nShort third fact."
    )
    assert tokens == count_tokens(text) <= 100
    assert context_message("Use the context.", [hits[1]], max_tokens=100) == (
        "Use the context.",
        [],
        0,
    )


def test_openai_context_goes_after_the_clients_system_messages() -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": "JSON only."},
            {"role": "user", "content": "q"},
        ]
    }
    add_context(body, "openai", "CONTEXT")
    assert [m["role"] for m in body["messages"]] == ["system", "developer", "system", "user"]
    assert body["messages"][2]["content"] == "CONTEXT"


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        (None, "CONTEXT"),
        ("Be brief.", "Be brief.\n\nCONTEXT"),
        (
            [{"type": "text", "text": "Be brief."}],
            [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "CONTEXT"}],
        ),
    ],
)
def test_anthropic_context_joins_system(system: Any, expected: Any) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "q"}]}
    if system is not None:
        body["system"] = system
    add_context(body, "anthropic", "CONTEXT")
    assert body["system"] == expected
    assert body["messages"] == [{"role": "user", "content": "q"}]


def test_the_question_is_the_last_user_message() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "old question"},
            {"role": "assistant", "content": "old answer"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "new"},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                    {"type": "text", "text": "question"},
                ],
            },
            {"role": "assistant", "content": "partial"},
        ]
    }
    assert last_user_text(body, "openai") == "new\nquestion"
    assert last_user_text({"messages": [{"role": "system", "content": "s"}]}, "openai") == ""
