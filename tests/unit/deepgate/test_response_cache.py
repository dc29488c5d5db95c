"""The cache's rules: which requests share an answer, and what an entry holds."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from deepgate import response_cache as rc


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "deepseek-chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the boiling point of water?"},
        ],
        **extra,
    }


ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "deepseek-chat",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "100 degrees Celsius."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
}


def key(b: dict[str, Any], scope: str = "consumer:a", dialect: Any = "openai") -> str:
    return rc.request_key(scope, dialect, b)


def test_delivery_parameters_do_not_change_the_key() -> None:
    plain = key(body())
    assert key(body(stream=True, stream_options={"include_usage": True})) == plain
    assert key(body(user="u-1", metadata={"user_id": "x"}, store=True)) == plain
    assert key(body(temperature=None)) == plain  # null is the default


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"top_p": 0.5},
        {"max_tokens": 10},
        {"max_completion_tokens": 10},
        {"seed": 7},
        {"stop": ["\n"]},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "required"},
        {"model": "gpt-5-mini"},
        {"some_new_parameter": 1},  # unknown parameters may change the answer: kept in the key
    ],
)
def test_what_changes_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    assert key(body(**change)) != key(body())


def test_messages_and_their_order_are_in_the_key() -> None:
    b = body()
    other = body()
    other["messages"] = list(reversed(other["messages"]))
    assert key(other) != key(b)
    other = body()
    other["messages"][1]["content"] = "What is the boiling point of milk?"
    assert key(other) != key(b)


def test_equivalent_spellings_share_a_key() -> None:
    assert key(body(temperature=0)) == key(body(temperature=0.0))
    assert key(body(temperature=1, top_p=1)) == key(body(top_p=1.0, temperature=1.0))
    parts = body()
    parts["messages"][1]["content"] = [
        {"type": "text", "text": "What is the boiling point of water?"}
    ]
    assert key(parts) == key(body())


def test_scope_and_dialect_separate_entries() -> None:
    b = body()
    assert key(b, "consumer:a") != key(b, "consumer:b")
    assert key(b, "consumer:a") != key(b, "route:chat")
    assert key(b, dialect="openai") != key(b, dialect="anthropic")


def test_scope_ids() -> None:
    assert rc.scope_id("consumer", "alice", "chat") == "consumer:alice"
    assert rc.scope_id("route", "alice", "chat") == "route:chat"
    # no consumer (a route without authentication): the route's anonymous user
    assert rc.scope_id("consumer", None, "chat") == "route:chat"


def test_entry_round_trip_and_unreadable_entries_are_misses() -> None:
    raw = rc.encode_entry(ANSWER, "deepseek:deepseek-chat", now=5.0)
    entry = rc.decode_entry(raw)
    assert entry == rc.CacheEntry(ANSWER, "deepseek:deepseek-chat", 5.0)
    assert rc.decode_entry(None) is None
    assert rc.decode_entry(b"not json") is None
    assert rc.decode_entry(orjson.dumps({"v": 999, "answer": ANSWER})) is None


@pytest.mark.parametrize(
    ("change", "ok"),
    [
        ({}, True),
        ({"finish_reason": "length"}, True),
        ({"finish_reason": "content_filter"}, False),
        ({"finish_reason": None}, False),
        ({"message": {"role": "assistant", "content": ""}}, False),
        (
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
                },
                "finish_reason": "tool_calls",
            },
            True,
        ),
    ],
)
def test_only_whole_useful_answers_are_cacheable(change: dict[str, Any], ok: bool) -> None:
    answer = {**ANSWER, "choices": [{**ANSWER["choices"][0], **change}]}
    assert rc.cacheable_answer(answer) is ok


def test_two_choices_are_not_cacheable() -> None:
    assert not rc.cacheable_answer({**ANSWER, "choices": ANSWER["choices"] * 2})


def test_answer_chunks_rebuild_the_answer() -> None:
    chunks = rc.answer_chunks(ANSWER)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "100 degrees Celsius."
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1] == {**chunks[-1], "choices": [], "usage": ANSWER["usage"]}


def test_answer_chunks_carry_tool_calls() -> None:
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"a":1}'}},
        {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
    ]
    answer = {
        **ANSWER,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            }
        ],
    }
    pieces = [
        call
        for c in rc.answer_chunks(answer)
        for choice in c["choices"]
        for call in choice["delta"].get("tool_calls", [])
    ]
    assert [(p["index"], p["id"], p["function"]["name"]) for p in pieces] == [
        (0, "c1", "weather"),
        (1, "c2", "time"),
    ]


def test_semantic_partition_ignores_only_the_last_user_text() -> None:
    b = body()
    similar = body()
    similar["messages"][1]["content"] = "How hot does water boil?"
    assert rc.semantic_partition("s", "openai", b) == rc.semantic_partition("s", "openai", similar)
    for other in (body(temperature=0.9), body(model="gpt-5-mini")):
        assert rc.semantic_partition("s", "openai", other) != rc.semantic_partition(
            "s", "openai", b
        )
    system = body()
    system["messages"][0]["content"] = "Answer in French."
    assert rc.semantic_partition("s", "openai", system) != rc.semantic_partition("s", "openai", b)
    assert rc.semantic_partition("t", "openai", b) != rc.semantic_partition("s", "openai", b)


def test_last_user_text() -> None:
    assert rc.last_user_text(body()) == "What is the boiling point of water?"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    assert rc.last_user_text(parts) == "a"
    assert rc.last_user_text({"messages": [{"role": "assistant", "content": "x"}]}) == ""
