"""The Anthropic face held to the real anthropic SDK: what it builds, the SDK must read back.

Requests go Anthropic -> canonical (``from_anthropic``) -> Anthropic (the adapter's request
mapping) and must come back as they were sent. Answers go canonical -> Anthropic and are read by
the SDK's own models and stream accumulator, served through an ``httpx2.MockTransport``, so no
socket is involved.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import Message

from deepgate.chat import from_anthropic
from deepgate.errors import RateLimited, ServiceUnavailable
from sidecar.faces.anthropic import AnthropicStreamEncoder, error_event, to_anthropic_message
from sidecar.providers.anthropic import AnthropicProvider
from sidecar.providers.anthropic.request import to_messages_params
from sidecar.providers.base import CallOptions
from tests.fakes.base import fixture

MODEL = "claude-sonnet-4-6"
KEY = "sk-ant-test"


def sse_client(payload: bytes) -> anthropic.AsyncAnthropic:
    """An SDK client whose every request is answered with ``payload`` as an SSE stream."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=payload)

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    return anthropic.AsyncAnthropic(
        api_key=KEY, base_url="http://face.test", http_client=http, max_retries=0
    )


async def sdk_final_message(payload: bytes) -> Message:
    """What a client using ``messages.stream(...).get_final_message()`` gets from ``payload``."""
    client = sse_client(payload)
    try:
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            message = await stream.get_final_message()
    finally:
        await client.close()
    return Message.model_validate(message.to_dict())


def encode(chunks: list[dict[str, Any]]) -> bytes:
    encoder = AnthropicStreamEncoder(MODEL)
    out: list[bytes] = []
    for chunk in chunks:
        out += encoder.feed(chunk)
    out += encoder.finish()
    return b"".join(out)


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-42",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


USAGE = {
    "prompt_tokens": 30,
    "completion_tokens": 9,
    "total_tokens": 39,
    "prompt_tokens_details": {"cached_tokens": 10},
}


# --- requests: Anthropic -> canonical -> Anthropic -------------------------------------------


ANTHROPIC_REQUEST: dict[str, Any] = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 300,
    "system": "You are a weather bot.",
    "stop_sequences": ["END"],
    "metadata": {"user_id": "user-17"},
    "tools": [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ],
    "tool_choice": {"type": "any"},
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather where this photo was taken?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/p.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Looks like Paris."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ],
}


def test_an_anthropic_request_survives_the_canonical_round_trip() -> None:
    canonical = from_anthropic(ANTHROPIC_REQUEST).model_dump(exclude_none=True)
    back = to_messages_params(canonical, MODEL, default_max_tokens=4096)
    sent = ANTHROPIC_REQUEST
    assert back["model"] == sent["model"]
    assert back["max_tokens"] == sent["max_tokens"]
    assert back["system"] == sent["system"]
    assert back["stop_sequences"] == sent["stop_sequences"]
    assert back["metadata"] == sent["metadata"]
    assert back["tools"] == sent["tools"]
    assert back["tool_choice"] == sent["tool_choice"]
    assert back["messages"] == sent["messages"]


@pytest.mark.parametrize(
    "choice",
    [{"type": "auto"}, {"type": "any"}, {"type": "none"}, {"type": "tool", "name": "get_weather"}],
)
def test_tool_choice_round_trip(choice: dict[str, Any]) -> None:
    canonical = from_anthropic({**ANTHROPIC_REQUEST, "tool_choice": choice}).model_dump(
        exclude_none=True
    )
    assert to_messages_params(canonical, MODEL, default_max_tokens=1)["tool_choice"] == choice


# --- whole answers ---------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-42",
        "object": "chat.completion",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": USAGE,
        **extra,
    }


def test_text_answer_is_a_valid_message() -> None:
    out = to_anthropic_message(
        completion({"role": "assistant", "content": "Hello from deepseek."}), MODEL
    )
    msg = Message.model_validate(out)
    assert msg.id.startswith("msg_")
    assert msg.model == MODEL  # the model the client asked for, not the target's
    assert msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello from deepseek."  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"
    # Anthropic's input_tokens leaves the cache reads out; together they are the prompt.
    assert msg.usage.input_tokens == 20
    assert msg.usage.cache_read_input_tokens == 10
    assert msg.usage.output_tokens == 9


def test_tool_call_answer_is_a_tool_use_message() -> None:
    out = to_anthropic_message(
        completion(
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "Need the weather tool.",
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            finish="tool_calls",
        ),
        MODEL,
    )
    msg = Message.model_validate(out)
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[0].thinking == "Need the weather tool."  # type: ignore[union-attr]
    tool = msg.content[1]
    assert tool.type == "tool_use"
    assert (tool.id, tool.name, tool.input) == ("call_9", "get_weather", {"city": "Rome"})
    assert msg.stop_reason == "tool_use"


def test_unreadable_tool_arguments_become_an_empty_input() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    out = to_anthropic_message(
        completion({"role": "assistant", "tool_calls": [call]}, "tool_calls"), MODEL
    )
    assert Message.model_validate(out).content[0].input == {}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
    ],
)
def test_finish_reasons(finish: str, stop_reason: str) -> None:
    out = to_anthropic_message(completion({"role": "assistant", "content": "x"}, finish), MODEL)
    assert Message.model_validate(out).stop_reason == stop_reason


def test_a_provider_message_id_is_kept() -> None:
    out = to_anthropic_message(
        completion({"role": "assistant", "content": "x"}, id="msg_01abc"), MODEL
    )
    assert out["id"] == "msg_01abc"


# --- streams ---------------------------------------------------------------------------------


def events(payload: bytes) -> list[str]:
    return [
        line.removeprefix(b"event: ").decode()
        for line in payload.split(b"\n")
        if line.startswith(b"event: ")
    ]


async def test_text_stream_read_by_the_sdk() -> None:
    payload = encode(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hello from"}),
            chunk({"content": " deepseek."}),
            chunk({}, finish="stop"),
            chunk(None, usage=USAGE),
        ]
    )
    assert events(payload) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    msg = await sdk_final_message(payload)
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello from deepseek."  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"
    assert msg.model == MODEL
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (
        20,
        10,
        9,
    )


async def test_text_stream_sdk_text_stream_yields_the_deltas() -> None:
    payload = encode(
        [chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, finish="stop")]
    )
    client = sse_client(payload)
    try:
        async with client.messages.stream(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            pieces = [text async for text in stream.text_stream]
    finally:
        await client.close()
    assert pieces == ["Hel", "lo"]


async def test_tool_call_stream_read_by_the_sdk() -> None:
    payload = encode(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Checking."}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                        }
                    ]
                }
            ),
            chunk({}, finish="tool_calls"),
            chunk(None, usage=USAGE),
        ]
    )
    msg = await sdk_final_message(payload)
    assert [b.type for b in msg.content] == ["text", "tool_use", "tool_use"]
    first, second = msg.content[1], msg.content[2]
    assert first.type == "tool_use"
    assert second.type == "tool_use"
    assert (first.id, first.name, first.input) == ("call_1", "get_weather", {"city": "Paris"})
    assert (second.id, second.name, second.input) == ("call_2", "get_time", {"tz": "CET"})
    assert msg.stop_reason == "tool_use"


async def test_reasoning_stream_becomes_a_thinking_block() -> None:
    payload = encode(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"reasoning_content": "Think"}),
            chunk({"reasoning_content": "ing."}),
            chunk({"content": "Answer."}),
            chunk({}, finish="length"),
        ]
    )
    msg = await sdk_final_message(payload)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Thinking."  # type: ignore[union-attr]
    assert msg.content[1].text == "Answer."  # type: ignore[union-attr]
    assert msg.stop_reason == "max_tokens"


async def test_an_empty_stream_is_still_a_complete_message() -> None:
    msg = await sdk_final_message(encode([]))
    assert msg.content == []
    assert msg.stop_reason == "end_turn"


async def test_error_after_the_stream_started_is_raised_by_the_sdk() -> None:
    encoder = AnthropicStreamEncoder(MODEL)
    payload = b"".join(
        [
            *encoder.feed(chunk({"content": "Hel"})),
            error_event(ServiceUnavailable("Every provider is busy.")),
        ]
    )
    client = sse_client(payload)
    try:
        with pytest.raises(anthropic.APIStatusError) as info:
            async with client.messages.stream(
                model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                await stream.get_final_message()
    finally:
        await client.close()
    assert info.value.type == "overloaded_error"
    assert info.value.api_message == "Every provider is busy."


def test_error_event_wire_format() -> None:
    raw = error_event(RateLimited("Slow down."))
    head, data = raw.split(b"\n", 1)
    assert head == b"event: error"
    assert raw.endswith(b"\n\n")
    assert json.loads(data.removeprefix(b"data: ")) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Slow down."},
    }


@pytest.mark.parametrize("name", ["stream_text.sse", "stream_tool_use.sse", "stream_thinking.sse"])
async def test_anthropic_stream_through_adapter_and_face_reaches_the_client_unchanged(
    name: str,
) -> None:
    """Anthropic SSE -> adapter chunks -> face SSE -> SDK: the client sees what Anthropic sent."""
    transcript = fixture("anthropic", name).encode()
    original = await sdk_final_message(transcript)

    def upstream(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=transcript
        )

    async with httpx2.AsyncClient(transport=httpx2.MockTransport(upstream)) as http:
        provider = AnthropicProvider(KEY, "http://upstream.test", http_client=http)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        chunks = [c async for c in provider.stream(body, CallOptions(model=MODEL, timeout_s=5))]
    relayed = await sdk_final_message(encode(chunks))

    def blocks(msg: Message) -> list[dict[str, Any]]:
        # Signatures do not cross the canonical shape (see the face's docstring).
        return [{k: v for k, v in b.to_dict().items() if k != "signature"} for b in msg.content]

    assert blocks(relayed) == blocks(original)
    assert relayed.stop_reason == original.stop_reason
    assert relayed.usage.output_tokens == original.usage.output_tokens
    total = original.usage.input_tokens + (original.usage.cache_read_input_tokens or 0)
    total += original.usage.cache_creation_input_tokens or 0
    assert relayed.usage.input_tokens + (relayed.usage.cache_read_input_tokens or 0) == total
