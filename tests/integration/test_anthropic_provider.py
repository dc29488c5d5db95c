"""The Anthropic adapter against a fake Anthropic API, through the real anthropic SDK."""

from __future__ import annotations

import copy
import email.utils
import json
import logging
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import pytest

from deepgate.chat import ChatChunk, ChatResponse
from deepgate.errors import (
    DeepgateError,
    GatewayTimeout,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    UpstreamError,
)
from sidecar.providers.anthropic import AnthropicProvider
from sidecar.providers.base import (
    PROVIDER_AUTH,
    PROVIDER_ERROR,
    PROVIDER_NOT_FOUND,
    PROVIDER_STREAM_BROKEN,
    PROVIDER_UNREACHABLE,
    CallOptions,
    Provider,
    classify,
)
from tests.fakes.anthropic_server import ERROR_MESSAGE, FakeAnthropic
from tests.fakes.base import fixture

KEY = "sk-ant-test-key-0123456789"
MODEL = "claude-sonnet-4-6"
PROMPT = "Say hello, secret prompt 7f3a"
OPTS = CallOptions(model=MODEL, timeout_s=5.0, request_id="req-test")


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = await FakeAnthropic().start()
    yield server
    await server.stop()


@pytest.fixture
async def provider(fake: FakeAnthropic) -> AsyncIterator[AnthropicProvider]:
    p = AnthropicProvider(KEY, fake.url, default_max_tokens=1000)
    yield p
    await p.aclose()


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    msgs = list(messages) or [{"role": "user", "content": PROMPT}]
    return {"model": "deepseek-chat", "messages": msgs, **extra}


def sent(fake: FakeAnthropic) -> dict[str, Any]:
    assert len(fake.received) == 1, [r.path for r in fake.received]
    assert fake.received[0].path == "/v1/messages"
    body = fake.received[0].body
    assert isinstance(body, dict)
    return body


async def collect(provider: AnthropicProvider, body: dict[str, Any]) -> list[dict[str, Any]]:
    return [chunk async for chunk in provider.stream(body, OPTS)]


async def drain(chunks: AsyncIterator[dict[str, Any]], into: list[dict[str, Any]]) -> None:
    """Read a stream into ``into``, so a test sees what arrived before it failed."""
    async for chunk in chunks:
        into.append(chunk)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_it_is_a_provider(provider: AnthropicProvider) -> None:
    p: Provider = provider
    assert p.name == "anthropic"


# --- request mapping -------------------------------------------------------------------------


async def test_plain_request_sends_model_messages_and_the_key(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    await provider.complete(chat(), OPTS)
    body = sent(fake)
    assert body["model"] == MODEL  # the target's model, not the alias in the body
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    assert body["max_tokens"] == 1000  # Anthropic requires it: the adapter's default
    assert not body.get("stream")
    assert "system" not in body
    assert any(KEY in v for v in fake.received[0].headers.values())


async def test_system_and_developer_messages_become_top_level_system(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    await provider.complete(
        chat(
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": PROMPT},
        ),
        OPTS,
    )
    body = sent(fake)
    assert body["system"] == "You are terse.\n\nAnswer in French."
    assert [m["role"] for m in body["messages"]] == ["user"]


async def test_tool_round_trip_history(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    await provider.complete(
        chat(
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "24C"},
            {"role": "user", "content": "Which is warmer?"},
            tools=[WEATHER_TOOL],
        ),
        OPTS,
    )
    messages = sent(fake)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [
        {"type": "text", "text": "Checking both."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    # Both results in one user turn, first, then the user's next words.
    assert messages[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "24C"},
        {"type": "text", "text": "Which is warmer?"},
    ]


async def test_images_data_url_and_http_url(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    await provider.complete(
        chat(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            }
        ),
        OPTS,
    )
    assert sent(fake)["messages"][0]["content"] == [
        {"type": "text", "text": "What is in these?"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
async def test_tools_and_tool_choice(
    fake: FakeAnthropic, provider: AnthropicProvider, choice: Any, expected: dict[str, Any]
) -> None:
    await provider.complete(chat(tools=[WEATHER_TOOL], tool_choice=choice), OPTS)
    body = sent(fake)
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    assert body["tool_choice"] == expected


async def test_parallel_tool_calls_false_disables_parallel_tool_use(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    await provider.complete(chat(tools=[WEATHER_TOOL], parallel_tool_calls=False), OPTS)
    assert sent(fake)["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


async def test_json_object_becomes_a_system_instruction(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    await provider.complete(
        chat(
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": PROMPT},
            response_format={"type": "json_object"},
        ),
        OPTS,
    )
    body = sent(fake)
    assert "response_format" not in body
    assert body["system"].startswith("You are terse.\n\n")
    assert "JSON object" in body["system"]


async def test_json_schema_instruction_carries_the_schema(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    schema = {"type": "object", "properties": {"greeting": {"type": "string"}}}
    await provider.complete(
        chat(
            response_format={"type": "json_schema", "json_schema": {"name": "g", "schema": schema}}
        ),
        OPTS,
    )
    system = sent(fake)["system"]
    assert json.dumps(schema, separators=(",", ":"), sort_keys=True) in system


async def test_sampling_parameters(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    await provider.complete(
        chat(temperature=0.3, top_p=0.9, max_tokens=50, stop="END", seed=42, user="user-17"),
        OPTS,
    )
    body = sent(fake)
    # Current Claude models refuse sampling parameters (400), and the SDK no longer has them.
    assert "temperature" not in body
    assert "top_p" not in body
    assert body["max_tokens"] == 50
    assert body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "user-17"}
    assert "seed" not in body
    assert "user" not in body
    assert "stop" not in body


async def test_max_completion_tokens_wins_and_stop_lists_pass(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    await provider.complete(chat(max_tokens=50, max_completion_tokens=70, stop=["A", "B"]), OPTS)
    body = sent(fake)
    assert body["max_tokens"] == 70
    assert body["stop_sequences"] == ["A", "B"]


async def test_the_request_is_not_mutated(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    body = chat(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        tools=[WEATHER_TOOL],
        tool_choice="required",
        response_format={"type": "json_object"},
        stop="END",
    )
    before = copy.deepcopy(body)
    await provider.complete(body, OPTS)
    await collect(provider, body)
    assert body == before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            chat(
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{oops"},
                        }
                    ],
                }
            ),
            "messages[0].tool_calls",
        ),
        (
            chat(
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}],
                }
            ),
            "messages[0].content",
        ),
        (chat(n=2), "n"),
    ],
)
async def test_requests_anthropic_cannot_take_are_refused_before_sending(
    fake: FakeAnthropic, provider: AnthropicProvider, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await provider.complete(body, OPTS)
    assert info.value.param == param
    assert "anthropic" in info.value.message
    assert fake.received == []


async def test_a_malformed_body_is_refused_naming_the_field(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await provider.complete(chat({"role": "user", "content": 42}), OPTS)
    assert "messages.0.content" in info.value.message
    assert fake.received == []


async def test_unknown_tool_choice_is_refused_before_sending(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await provider.complete(chat(tool_choice="sometimes", tools=[WEATHER_TOOL]), OPTS)
    assert info.value.param == "tool_choice"
    assert fake.received == []


# --- response mapping ------------------------------------------------------------------------


async def test_text_answer_and_usage_with_cache(provider: AnthropicProvider) -> None:
    out = await provider.complete(chat(), OPTS)
    ChatResponse.model_validate(out)
    assert out["object"] == "chat.completion"
    assert out["model"] == MODEL
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Hello from anthropic."}
    assert out["choices"][0]["finish_reason"] == "stop"
    # input 12 + cache read 4 + cache write 2
    assert out["usage"] == {
        "prompt_tokens": 18,
        "completion_tokens": 6,
        "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


async def test_tool_use_answer(provider: AnthropicProvider) -> None:
    out = await provider.complete(chat(tools=[WEATHER_TOOL]), OPTS)
    ChatResponse.model_validate(out)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check the weather in Paris for you."
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_01A09q90qw90lq917835lq9"
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


async def test_thinking_answer_has_reasoning_content(provider: AnthropicProvider) -> None:
    out = await provider.complete(chat(thinking={"type": "enabled", "budget_tokens": 1024}), OPTS)
    message = out["choices"][0]["message"]
    assert message["reasoning_content"].startswith("The user greets me")
    assert message["content"] == "Hello from anthropic, after some thought."
    assert out["usage"]["completion_tokens_details"] == {"reasoning_tokens": 19}


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
async def test_stop_reasons(
    fake: FakeAnthropic, provider: AnthropicProvider, stop_reason: str, finish_reason: str
) -> None:
    reply = fixture("anthropic", "message_text.json")
    reply["stop_reason"] = stop_reason
    fake.behave(reply=reply)
    out = await provider.complete(chat(), OPTS)
    assert out["choices"][0]["finish_reason"] == finish_reason


# --- streaming -------------------------------------------------------------------------------


def _content(chunks: list[dict[str, Any]], key: str = "content") -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def _finishes(chunks: list[dict[str, Any]]) -> list[str]:
    return [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    ]


async def test_text_stream(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    chunks = await collect(provider, chat())
    for chunk in chunks:
        ChatChunk.model_validate(chunk)
    assert sent(fake)["stream"] is True
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert _content(chunks) == "Hello from anthropic."
    assert _finishes(chunks) == ["stop"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 18,
        "completion_tokens": 6,
        "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert {c["id"] for c in chunks} == {"msg_01Str3amT3xtK9vQpL2mN8aB"}


async def test_tool_use_stream(provider: AnthropicProvider) -> None:
    chunks = await collect(provider, chat(tools=[WEATHER_TOOL]))
    for chunk in chunks:
        ChatChunk.model_validate(chunk)
    assert _content(chunks) == "I'll check the weather in Paris for you."
    calls = [
        tc
        for c in chunks
        if c["choices"]
        for tc in c["choices"][0]["delta"].get("tool_calls") or []
    ]
    first = calls[0]
    assert first["index"] == 0
    assert first["id"] == "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
    assert first["function"]["name"] == "get_weather"
    assert all(c["index"] == 0 for c in calls)
    assert all("id" not in c for c in calls[1:])  # OpenAI sends the id once
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    assert _finishes(chunks) == ["tool_calls"]
    assert chunks[-1]["usage"]["completion_tokens"] == 89


async def test_thinking_stream(provider: AnthropicProvider) -> None:
    chunks = await collect(provider, chat(thinking={"type": "enabled", "budget_tokens": 1024}))
    assert _content(chunks, "reasoning_content") == (
        "The user greets me; a short greeting naming the provider fits."
    )
    assert _content(chunks) == "Hello from anthropic, after some thought."
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 19}


async def test_overloaded_error_event_mid_stream(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.behave(reply=fixture("anthropic", "stream_overloaded.sse"))
    chunks: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await drain(provider.stream(chat(), OPTS), chunks)
    assert info.value.code == PROVIDER_ERROR
    assert info.value.provider_detail == "Overloaded"  # type: ignore[attr-defined]
    assert "Overloaded" not in info.value.message
    assert _content(chunks) == "Hello"
    assert _finishes(chunks) == []


async def test_unknown_error_event_mid_stream_is_a_broken_stream(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    transcript = fixture("anthropic", "stream_overloaded.sse").replace(
        '"overloaded_error"', '"some_new_error"'
    )
    fake.behave(reply=transcript)
    with pytest.raises(UpstreamError) as info:
        await collect(provider, chat())
    assert info.value.code == PROVIDER_STREAM_BROKEN


async def test_connection_dropped_mid_stream(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.behave(drop_after_events=4)
    chunks: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await drain(provider.stream(chat(), OPTS), chunks)
    assert info.value.code == PROVIDER_STREAM_BROKEN
    assert classify(info.value) == "retry"
    assert _content(chunks) == "Hello"
    assert _finishes(chunks) == []


async def test_stream_that_ends_before_message_stop_is_broken(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    transcript = fixture("anthropic", "stream_text.sse")
    fake.behave(reply=transcript[: transcript.index("event: message_stop")])
    chunks: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await drain(provider.stream(chat(), OPTS), chunks)
    assert info.value.code == PROVIDER_STREAM_BROKEN
    assert _content(chunks) == "Hello from anthropic."
    assert _finishes(chunks) == []  # no finish reason for an answer that did not finish


async def test_stream_error_status_before_the_first_event(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.behave(status=429, retry_after="3")
    with pytest.raises(RateLimited) as info:
        await collect(provider, chat())
    assert info.value.retry_after == 3.0
    assert len(fake.received) == 1


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls", "code", "next_step"),
    [
        (400, InvalidRequest, None, "give_up"),
        (422, InvalidRequest, None, "give_up"),
        (413, PayloadTooLarge, "request_too_large", "give_up"),
        (401, UpstreamError, PROVIDER_AUTH, "fallback"),
        (403, UpstreamError, PROVIDER_AUTH, "fallback"),
        (404, UpstreamError, PROVIDER_NOT_FOUND, "fallback"),
        (429, RateLimited, "rate_limit_exceeded", "retry"),
        (500, UpstreamError, PROVIDER_ERROR, "retry"),
        (503, UpstreamError, PROVIDER_ERROR, "retry"),
        (529, UpstreamError, PROVIDER_ERROR, "retry"),
    ],
)
async def test_error_statuses(
    fake: FakeAnthropic,
    provider: AnthropicProvider,
    status: int,
    cls: type[DeepgateError],
    code: str | None,
    next_step: str,
) -> None:
    fake.behave(status=status)
    with pytest.raises(DeepgateError) as info:
        await provider.complete(chat(), OPTS)
    err = info.value
    assert type(err) is cls
    assert err.code == code
    assert classify(err) == next_step
    assert "anthropic" in err.message
    assert ERROR_MESSAGE not in err.message  # the provider's text stays out of the answer
    assert err.provider_detail == ERROR_MESSAGE  # type: ignore[attr-defined]
    assert len(fake.received) == 1  # no SDK retries: the dispatcher decides


async def test_rate_limit_retry_after_http_date(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    fake.behave(status=429, retry_after=email.utils.format_datetime(when, usegmt=True))
    with pytest.raises(RateLimited) as info:
        await provider.complete(chat(), OPTS)
    assert info.value.retry_after is not None
    assert 25 <= info.value.retry_after <= 30


async def test_rate_limit_without_retry_after(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.behave(status=429)
    with pytest.raises(RateLimited) as info:
        await provider.complete(chat(), OPTS)
    assert info.value.retry_after is None


async def test_hang_times_out(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.behave(hang=True)
    quick = CallOptions(model=MODEL, timeout_s=0.2)
    with pytest.raises(GatewayTimeout) as info:
        await provider.complete(chat(), quick)
    assert classify(info.value) == "retry"
    with pytest.raises(GatewayTimeout):
        async for _ in provider.stream(chat(), quick):
            pass
    assert len(fake.received) == 2


async def test_slow_first_byte_within_the_timeout_is_answered(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.behave(first_byte_delay_s=0.2)
    out = await provider.complete(chat(), CallOptions(model=MODEL, timeout_s=5.0))
    assert out["choices"][0]["message"]["content"] == "Hello from anthropic."


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_connection_refused() -> None:
    provider = AnthropicProvider(KEY, f"http://127.0.0.1:{_closed_port()}", connect_timeout_s=1.0)
    try:
        with pytest.raises(UpstreamError) as info:
            await provider.complete(chat(), OPTS)
        assert info.value.code == PROVIDER_UNREACHABLE
        assert classify(info.value) == "retry"
        with pytest.raises(UpstreamError) as info:
            await collect(provider, chat())
        assert info.value.code == PROVIDER_UNREACHABLE
    finally:
        await provider.aclose()


async def test_injected_http_client_is_used_and_left_open(fake: FakeAnthropic) -> None:
    async with httpx2.AsyncClient() as http:
        provider = AnthropicProvider(KEY, fake.url, http_client=http)
        await provider.complete(chat(), OPTS)
        await provider.aclose()
        assert not http.is_closed  # the caller's pool, the caller's to close
        assert len(fake.received) == 1


async def test_failures_log_neither_key_nor_prompt(
    fake: FakeAnthropic, provider: AnthropicProvider, caplog: pytest.LogCaptureFixture
) -> None:
    fake.behave(status=500)
    with (
        caplog.at_level(logging.DEBUG, logger="sidecar.providers.anthropic"),
        pytest.raises(UpstreamError),
    ):
        await provider.complete(chat(), OPTS)
    assert caplog.records  # the failure is logged...
    assert KEY not in caplog.text  # ...without the key
    assert PROMPT not in caplog.text  # ...or the prompt
    assert ERROR_MESSAGE not in caplog.text
