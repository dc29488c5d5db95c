"""Restore: masked personal data put back in whole answers and in streams split anywhere."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from deepgate.request_facts import Facts
from sidecar.answer_hooks import AnswerHooks, Exchange
from sidecar.hooks.restore import PlaceholderWindow, Restore

TABLE = {"[EMAIL_ADDRESS_1]": "ana@example.org", "[PERSON_1]": 'Ana "Nana" Lopez'}
TEXT = "Dear [PERSON_1], we will write to [EMAIL_ADDRESS_1] soon. [NOTE] stays; [PERSON_2] too."
RESTORED = (
    'Dear Ana "Nana" Lopez, we will write to ana@example.org soon. [NOTE] stays; [PERSON_2] too.'
)


def exchange(table: dict[str, str] | None) -> Exchange:
    facts = Facts()
    if table is not None:
        facts["restore"] = table
    return Exchange("rq-1", "openai", facts, {"model": "m"}, stream=True)


def chunk(finish: str | None = None, **delta: Any) -> dict[str, Any]:
    return {
        "id": "c",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def feed(items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 200])
async def test_placeholders_split_across_chunks_are_restored(size: int) -> None:
    parts = [TEXT[i : i + size] for i in range(0, len(TEXT), size)]
    items = [chunk(role="assistant", content=""), *(chunk(content=p) for p in parts)]
    items.append(chunk(finish="stop"))
    out = [c async for c in AnswerHooks([Restore()]).stream(exchange(TABLE), feed(items))]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in out)
    assert text == RESTORED
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_window_holds_back_at_most_one_placeholder_less_a_character() -> None:
    window = PlaceholderWindow(TABLE)
    longest = max(map(len, TABLE))
    out = "".join(window.feed(c) for c in TEXT * 50) + window.flush()
    assert out == RESTORED * 50
    assert window.peak <= longest - 1 + 1  # what was held plus the character just in


async def test_a_stream_that_ends_without_a_finish_still_gets_its_tail() -> None:
    items = [chunk(content="write to [EMAIL_"), chunk(content="ADDRESS_1")]
    out = [c async for c in Restore().on_stream(exchange(TABLE), feed(items))]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in out)
    assert text == "write to [EMAIL_ADDRESS_1"  # not a whole placeholder: given back as it was


async def test_whole_answer_content_and_tool_arguments() -> None:
    args = orjson.dumps({"to": "[EMAIL_ADDRESS_1]", "name": "[PERSON_1]"}).decode()
    answer = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": TEXT,
                    "tool_calls": [{"id": "t", "function": {"name": "send", "arguments": args}}],
                },
            }
        ]
    }
    got = await Restore().on_answer(exchange(TABLE), answer)
    message = got["choices"][0]["message"]
    assert message["content"] == RESTORED
    # The arguments stay valid JSON although the original has quotes in it.
    assert orjson.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "to": "ana@example.org",
        "name": 'Ana "Nana" Lopez',
    }


async def test_streamed_tool_arguments_are_restored() -> None:
    args = orjson.dumps({"to": "[EMAIL_ADDRESS_1]"}).decode()
    items = [
        chunk(tool_calls=[{"index": 0, "id": "t", "function": {"name": "send", "arguments": ""}}]),
        *(chunk(tool_calls=[{"index": 0, "function": {"arguments": args[i : i + 4]}}])
          for i in range(0, len(args), 4)),
        chunk(finish="tool_calls"),
    ]  # fmt: skip
    out = [c async for c in Restore().on_stream(exchange(TABLE), feed(items))]
    sent = "".join(
        call["function"].get("arguments") or ""
        for c in out
        for call in c["choices"][0]["delta"].get("tool_calls") or ()
    )
    assert orjson.loads(sent) == {"to": "ana@example.org"}


async def test_without_a_table_nothing_changes() -> None:
    items = [chunk(content="[EMAIL_ADDRESS_1]")]
    out = [c async for c in Restore().on_stream(exchange(None), feed(items))]
    assert out == items
