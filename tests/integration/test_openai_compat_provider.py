"""The OpenAI-compatible adapter (OpenAI, DeepSeek) against fake APIs, through the openai SDK."""

from __future__ import annotations

import copy
import email.utils
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest

from deepgate.chat import ChatChunk, ChatResponse
from deepgate.errors import (
    ContextLengthExceeded,
    DeepgateError,
    GatewayTimeout,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    UpstreamError,
)
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
from sidecar.providers.openai_compat import OpenAICompatProvider
from tests.fakes.openai_server import FakeOpenAI

KEYS = {"openai": "sk-proj-test-key-0123456789", "deepseek": "sk-deepseek-test-key-9876543210"}
MODELS = {"openai": "gpt-4.1-mini", "deepseek": "deepseek-chat"}
PROMPT = "Say hello, secret prompt 7f3a"
IMAGE_DATA_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAf"
    "FcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"enum": ["celsius"]}},
            "required": ["location"],
        },
        "strict": True,
    },
}


def opts(provider: str, **kw: Any) -> CallOptions:
    return CallOptions(
        model=kw.pop("model", MODELS[provider]), timeout_s=kw.pop("timeout_s", 5.0), **kw
    )


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    msgs = list(messages) or [{"role": "user", "content": PROMPT}]
    return {"model": "client-alias", "messages": msgs, **extra}


def sent(fake: FakeOpenAI) -> dict[str, Any]:
    assert len(fake.received) == 1, [r.path for r in fake.received]
    body = fake.received[0].body
    assert isinstance(body, dict)
    return body


def expected_chunks(fake: FakeOpenAI, name: str, model: str) -> list[dict[str, Any]]:
    """The chunks of a recorded transcript, as the provider sent them."""
    events = fake.fixture_text(name, model).split("\n\n")
    return [
        json.loads(e.removeprefix("data: "))
        for e in events
        if e.startswith("data: ") and e != "data: [DONE]"
    ]


async def drain(chunks: AsyncIterator[dict[str, Any]], into: list[dict[str, Any]]) -> None:
    """Read a stream into ``into``, so a test sees what arrived before it failed."""
    async for chunk in chunks:
        into.append(chunk)


@pytest.fixture(params=["openai", "deepseek"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI(request.param).start()
    yield server
    await server.stop()


def base_url(fake: FakeOpenAI) -> str:
    # OpenAI's base URL ends in /v1, DeepSeek's does not: the fake serves both, as they do.
    return f"{fake.url}/v1" if fake.provider == "openai" else fake.url


@pytest.fixture
async def provider(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatProvider]:
    p = OpenAICompatProvider(fake.provider, KEYS[fake.provider], base_url(fake))
    yield p
    await p.aclose()


@pytest.fixture
async def openai_fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI("openai").start()
    yield server
    await server.stop()


@pytest.fixture
async def openai_provider(openai_fake: FakeOpenAI) -> AsyncIterator[OpenAICompatProvider]:
    p = OpenAICompatProvider("openai", KEYS["openai"], f"{openai_fake.url}/v1")
    yield p
    await p.aclose()


@pytest.fixture
async def deepseek_fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI("deepseek").start()
    yield server
    await server.stop()


@pytest.fixture
async def deepseek(deepseek_fake: FakeOpenAI) -> AsyncIterator[OpenAICompatProvider]:
    p = OpenAICompatProvider("deepseek", KEYS["deepseek"], deepseek_fake.url)
    yield p
    await p.aclose()


# --- requests -----------------------------------------------------------------------------------


def test_it_is_a_provider(provider: OpenAICompatProvider) -> None:
    p: Provider = provider
    assert p.name in ("openai", "deepseek")


async def test_plain_completion_names_who_answered(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    answer = await provider.complete(chat(), opts(fake.provider))

    ChatResponse.model_validate(answer)
    message = answer["choices"][0]["message"]
    assert message["content"] == f"Hello from {fake.provider}! How can I help you today?"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["model"] == MODELS[fake.provider]
    body = sent(fake)
    assert fake.received[0].path == (
        "/v1/chat/completions" if fake.provider == "openai" else "/chat/completions"
    )
    assert fake.received[0].headers["Authorization"] == f"Bearer {KEYS[fake.provider]}"
    assert body == {
        "model": MODELS[fake.provider],
        "messages": [{"role": "user", "content": PROMPT}],
    }


async def test_usage_reports_cached_tokens(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    usage = (await provider.complete(chat(), opts(fake.provider)))["usage"]
    # OpenAI reports cached_tokens itself; DeepSeek's prompt_cache_hit_tokens is mapped to it.
    cached = {"openai": 1152, "deepseek": 1024}[fake.provider]
    assert usage["prompt_tokens_details"]["cached_tokens"] == cached
    assert usage["prompt_tokens"] == usage["total_tokens"] - usage["completion_tokens"]


async def test_every_field_the_client_sent_reaches_the_provider(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "name": "ada",
            "content": [
                {"type": "text", "text": "What is in these pictures?"},
                {"type": "image_url", "image_url": {"url": IMAGE_DATA_URL, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'},
        {"role": "user", "content": "Thanks.", "x_vendor_hint": {"priority": 2}},
    ]
    extra = {
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "seed": 42,
        "n": 1,
        "user": "user-1234",
        "presence_penalty": 0.1,
        "logit_bias": {"50256": -100},
        "metadata": {"team": "search"},
        "some_future_field": {"nested": [1, 2, 3]},
    }
    await provider.complete(chat(*messages, **extra), opts(fake.provider))

    body = sent(fake)
    assert body.pop("model") == MODELS[fake.provider]
    assert body == {"messages": messages, **extra}


async def test_tools_and_tool_choice_give_a_tool_call(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    tool_choice = {"type": "function", "function": {"name": "get_weather"}}
    request = chat(tools=[WEATHER_TOOL], tool_choice=tool_choice, parallel_tool_calls=False)
    answer = await provider.complete(request, opts(fake.provider))

    ChatResponse.model_validate(answer)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "Paris", "unit": "celsius"}
    assert call["id"].startswith("call_")
    body = sent(fake)
    assert body["tools"] == [WEATHER_TOOL]
    assert body["tool_choice"] == tool_choice
    assert body["parallel_tool_calls"] is False


async def test_json_mode(openai_fake: FakeOpenAI, openai_provider: OpenAICompatProvider) -> None:
    request = chat(response_format={"type": "json_object"})
    answer = await openai_provider.complete(request, opts("openai"))

    assert json.loads(answer["choices"][0]["message"]["content"])["provider"] == "openai"
    assert sent(openai_fake)["response_format"] == {"type": "json_object"}


async def test_a_streamed_request_for_complete_is_sent_unstreamed(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    request = chat(stream=True, stream_options={"include_usage": True})
    answer = await provider.complete(request, opts(fake.provider))

    assert answer["object"] == "chat.completion"
    body = sent(fake)
    # OpenAI refuses stream_options on an unstreamed request.
    assert "stream" not in body
    assert "stream_options" not in body


async def test_the_request_is_not_mutated(fake: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    request = chat(
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
        tools=[WEATHER_TOOL],
        max_completion_tokens=300,
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": False},
    )
    before = copy.deepcopy(request)

    await provider.complete(request, opts(fake.provider))
    async for _ in provider.stream(request, opts(fake.provider)):
        pass

    assert request == before
    # The target's changes went to the provider, not back into the caller's dict.
    assert [r.body["model"] for r in fake.received] == [MODELS[fake.provider]] * 2


async def test_request_id_is_sent_for_tracing(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    await provider.complete(chat(), opts(fake.provider, request_id="req-42"))
    assert fake.received[0].headers["x-client-request-id"] == "req-42"


# --- provider differences -----------------------------------------------------------------------


async def test_deepseek_gets_system_for_developer_and_max_tokens(
    deepseek_fake: FakeOpenAI, deepseek: OpenAICompatProvider
) -> None:
    request = chat(
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": PROMPT},
        max_completion_tokens=300,
        max_tokens=200,
    )
    await deepseek.complete(request, opts("deepseek"))

    body = sent(deepseek_fake)
    assert body["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": PROMPT},
    ]
    # DeepSeek ignores max_completion_tokens; the client's budget (the newer field wins) is kept.
    assert body["max_tokens"] == 300
    assert "max_completion_tokens" not in body


async def test_openai_keeps_developer_and_gets_max_completion_tokens(
    openai_fake: FakeOpenAI, openai_provider: OpenAICompatProvider
) -> None:
    request = chat({"role": "developer", "content": "Answer in French."}, max_tokens=200)
    await openai_provider.complete(request, opts("openai"))

    body = sent(openai_fake)
    assert body["messages"][0]["role"] == "developer"
    # OpenAI's reasoning models refuse max_tokens; max_completion_tokens works for every model.
    assert body["max_completion_tokens"] == 200
    assert "max_tokens" not in body


async def test_another_compatible_server_gets_the_request_as_written(
    openai_fake: FakeOpenAI,
) -> None:
    local = OpenAICompatProvider("local", "unused", f"{openai_fake.url}/v1")
    try:
        request = chat({"role": "developer", "content": "Be brief."}, max_tokens=64)
        answer = await local.complete(request, opts("openai", model="qwen2.5-7b"))
    finally:
        await local.aclose()

    assert "Hello from openai" in answer["choices"][0]["message"]["content"]
    body = sent(openai_fake)
    assert body["messages"][0]["role"] == "developer"
    assert body["max_tokens"] == 64


async def test_deepseek_reasoner_answer(
    deepseek_fake: FakeOpenAI, deepseek: OpenAICompatProvider
) -> None:
    answer = await deepseek.complete(chat(), opts("deepseek", model="deepseek-reasoner"))

    ChatResponse.model_validate(answer)
    message = answer["choices"][0]["message"]
    assert message["content"] == "9.11 is smaller than 9.8 (answered by deepseek)."
    assert message["reasoning_content"].startswith("Compare the whole parts")
    usage = answer["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 187
    assert usage["prompt_tokens_details"]["cached_tokens"] == 576


async def test_openai_reasoning_tokens(openai_provider: OpenAICompatProvider) -> None:
    answer = await openai_provider.complete(chat(), opts("openai", model="o4-mini"))
    assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] == 192


# --- streams ------------------------------------------------------------------------------------


async def test_stream_text_and_usage(fake: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    request = chat(stream_options={"include_usage": False, "include_obfuscation": False})
    chunks = [c async for c in provider.stream(request, opts(fake.provider))]

    for chunk in chunks:
        ChatChunk.model_validate(chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == f"Hello from {fake.provider}! How can I help you today?"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop"
    # The last chunk carries usage, whatever the client asked: the ledger needs it.
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == (
        1152 if fake.provider == "openai" else 1024
    )
    body = sent(fake)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "include_obfuscation": False}


async def test_stream_passes_chunks_as_the_provider_sent_them(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    chunks = [c async for c in provider.stream(chat(), opts(fake.provider))]

    expected = expected_chunks(fake, "chat.sse", MODELS[fake.provider])
    # DeepSeek's usage gains cached_tokens; everything else is as it came.
    assert [c["choices"] for c in chunks] == [e["choices"] for e in expected]
    assert [c["id"] for c in chunks] == [e["id"] for e in expected]


async def test_stream_tool_call_deltas_as_they_come(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    request = chat(tools=[WEATHER_TOOL], tool_choice="required")
    chunks = [c async for c in provider.stream(request, opts(fake.provider))]

    expected = expected_chunks(fake, "tool_call.sse", MODELS[fake.provider])
    assert [c["choices"] for c in chunks] == [e["choices"] for e in expected]
    deltas = [
        call
        for c in chunks
        if c["choices"]
        for call in c["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert deltas[0]["function"]["name"] == "get_weather"
    assert deltas[0]["id"].startswith("call_")
    assert len(deltas) > 3  # argument fragments stay fragments
    arguments = "".join(d["function"].get("arguments", "") for d in deltas)
    assert json.loads(arguments) == {"location": "Paris", "unit": "celsius"}
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "tool_calls"
    assert chunks[-1]["usage"]["total_tokens"] == (100 if fake.provider == "openai" else 260)


async def test_deepseek_stream_reasoning_deltas(
    deepseek_fake: FakeOpenAI, deepseek: OpenAICompatProvider
) -> None:
    # The transcript opens with ": keep-alive", as DeepSeek sends while a request waits.
    chunks = [c async for c in deepseek.stream(chat(), opts("deepseek", model="deepseek-reasoner"))]

    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (
        reasoning
        == "Compare the whole parts: both are 9. Compare the tenths: 1 < 8, so 9.11 < 9.8."
    )
    assert content == "9.11 is smaller than 9.8 (answered by deepseek)."
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 187
    assert usage["prompt_tokens_details"]["cached_tokens"] == 576


async def test_slow_first_byte_still_answers(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.behave(first_byte_delay_s=0.3)
    chunks = [c async for c in provider.stream(chat(), opts(fake.provider, timeout_s=3.0))]
    assert chunks[-1]["usage"] is not None


# --- errors -------------------------------------------------------------------------------------

# status, our class, our code, what the dispatcher does next
STATUS_MAP: list[tuple[int, type[DeepgateError], str | None, str]] = [
    (400, InvalidRequest, None, "give_up"),
    (401, UpstreamError, PROVIDER_AUTH, "fallback"),
    (403, UpstreamError, PROVIDER_AUTH, "fallback"),
    (404, UpstreamError, PROVIDER_NOT_FOUND, "fallback"),
    (413, PayloadTooLarge, "request_too_large", "give_up"),
    (422, InvalidRequest, None, "give_up"),
    (429, RateLimited, "rate_limit_exceeded", "retry"),
    (500, UpstreamError, PROVIDER_ERROR, "retry"),
    (503, UpstreamError, PROVIDER_ERROR, "retry"),
]


def provider_message(fake: FakeOpenAI, status: int) -> str | None:
    error = json.loads(fake.fixture_text("errors.json", MODELS[fake.provider])).get(str(status))
    return error["error"]["message"] if isinstance(error, dict) else None


@pytest.mark.parametrize(("status", "cls", "code", "next_step"), STATUS_MAP)
async def test_status_errors_map_by_status(
    fake: FakeOpenAI,
    provider: OpenAICompatProvider,
    status: int,
    cls: type[DeepgateError],
    code: str | None,
    next_step: str,
) -> None:
    fake.behave(status=status)
    with pytest.raises(cls) as info:
        await provider.complete(chat(), opts(fake.provider))

    err = info.value
    assert type(err) is cls
    assert err.code == code
    assert classify(err) == next_step
    assert f"'{fake.provider}'" in err.message
    assert str(status) in err.message
    # The provider's own words ride along for a face that shows them, never in the message.
    own = provider_message(fake, status)
    if own is not None:
        assert err.provider_detail == own
        assert own not in err.message
    # Nor in the traceback: the SDK's exception text is the provider's body.
    assert err.__cause__ is None


@pytest.mark.parametrize(("status", "cls", "code", "next_step"), STATUS_MAP)
async def test_status_errors_map_the_same_when_streaming(
    fake: FakeOpenAI,
    provider: OpenAICompatProvider,
    status: int,
    cls: type[DeepgateError],
    code: str | None,
    next_step: str,
) -> None:
    fake.behave(status=status)
    with pytest.raises(cls) as info:
        async for _ in provider.stream(chat(), opts(fake.provider)):
            pass
    assert info.value.code == code
    assert classify(info.value) == next_step


async def test_html_413_from_an_edge_proxy(
    openai_fake: FakeOpenAI, openai_provider: OpenAICompatProvider
) -> None:
    openai_fake.behave(status=413)
    with pytest.raises(PayloadTooLarge) as info:
        await openai_provider.complete(chat(), opts("openai"))
    assert info.value.provider_detail is not None
    assert "413 Request Entity Too Large" in info.value.provider_detail


async def test_400_keeps_the_providers_param(
    openai_fake: FakeOpenAI, openai_provider: OpenAICompatProvider
) -> None:
    openai_fake.behave(status=400)
    with pytest.raises(InvalidRequest) as info:
        await openai_provider.complete(chat(), opts("openai"))
    assert info.value.param == "messages[0].content"
    assert info.value.to_openai()["error"]["type"] == "invalid_request_error"


async def test_context_length_code_gives_context_length_exceeded(
    openai_fake: FakeOpenAI, openai_provider: OpenAICompatProvider
) -> None:
    openai_fake.behave(
        status=400,
        reply={
            "error": {
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    )
    with pytest.raises(ContextLengthExceeded) as info:
        await openai_provider.complete(chat(), opts("openai"))
    assert info.value.code == "context_length_exceeded"


async def test_deepseek_insufficient_balance_falls_back(
    deepseek_fake: FakeOpenAI, deepseek: OpenAICompatProvider
) -> None:
    deepseek_fake.behave(status=402)
    with pytest.raises(UpstreamError) as info:
        await deepseek.complete(chat(), opts("deepseek"))
    assert info.value.code == PROVIDER_AUTH
    assert classify(info.value) == "fallback"
    assert info.value.provider_detail == "Insufficient Balance"


async def test_429_retry_after_seconds(fake: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    fake.behave(status=429, retry_after="7")
    with pytest.raises(RateLimited) as info:
        await provider.complete(chat(), opts(fake.provider))
    assert info.value.retry_after == 7.0
    assert info.value.http_headers()["retry-after"] == "7"
    assert "7s" in info.value.message


async def test_429_retry_after_http_date(fake: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    fake.behave(status=429, retry_after=email.utils.formatdate(time.time() + 120, usegmt=True))
    with pytest.raises(RateLimited) as info:
        await provider.complete(chat(), opts(fake.provider))
    assert info.value.retry_after is not None
    assert 110 <= info.value.retry_after <= 121


async def test_429_retry_after_ms(
    openai_fake: FakeOpenAI, openai_provider: OpenAICompatProvider
) -> None:
    openai_fake.behave(status=429, retry_after="20")
    openai_fake.extra_headers["retry-after-ms"] = "1500"  # the finer one wins
    with pytest.raises(RateLimited) as info:
        await openai_provider.complete(chat(), opts("openai"))
    assert info.value.retry_after == 1.5
    assert info.value.http_headers()["retry-after"] == "2"


async def test_503_retry_after_reaches_the_dispatcher(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.behave(status=503, retry_after="3")
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(), opts(fake.provider))
    assert info.value.retry_after == 3.0


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_the_sdk_does_not_retry(
    fake: FakeOpenAI, provider: OpenAICompatProvider, status: int
) -> None:
    fake.behave(status=status, retry_after="0")
    with pytest.raises(DeepgateError):
        await provider.complete(chat(), opts(fake.provider))
    with pytest.raises(DeepgateError):
        async for _ in provider.stream(chat(), opts(fake.provider)):
            pass
    assert len(fake.received) == 2  # one request per call: retries are the dispatcher's


async def test_timeout_when_the_provider_hangs(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.behave(hang=True)
    with pytest.raises(GatewayTimeout) as info:
        await provider.complete(chat(), opts(fake.provider, timeout_s=0.2))
    assert classify(info.value) == "retry"
    with pytest.raises(GatewayTimeout):
        async for _ in provider.stream(chat(), opts(fake.provider, timeout_s=0.2)):
            pass
    assert len(fake.received) == 2


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_connection_refused_is_unreachable() -> None:
    p = OpenAICompatProvider("deepseek", KEYS["deepseek"], f"http://127.0.0.1:{closed_port()}")
    try:
        with pytest.raises(UpstreamError) as info:
            await p.complete(chat(), opts("deepseek"))
        assert info.value.code == PROVIDER_UNREACHABLE
        assert classify(info.value) == "retry"
        with pytest.raises(UpstreamError) as info:
            async for _ in p.stream(chat(), opts("deepseek")):
                pass
        assert info.value.code == PROVIDER_UNREACHABLE
    finally:
        await p.aclose()


async def test_a_dropped_stream_is_broken_after_what_arrived(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    # DeepSeek's transcript opens with a keep-alive comment: one more event before the data.
    fake.behave(drop_after_events=4 if fake.provider == "openai" else 5)
    got: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await drain(provider.stream(chat(), opts(fake.provider)), got)

    assert info.value.code == PROVIDER_STREAM_BROKEN
    assert classify(info.value) == "retry"
    assert len(got) == 4
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got)
    assert text == f"Hello from {fake.provider}"


async def test_a_stream_that_ends_without_finishing_is_broken(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    transcript = fake.fixture_text("chat.sse", MODELS[fake.provider])
    events = [e for e in transcript.split("\n\n") if e.startswith("data: {")]
    fake.behave(reply="\n\n".join(events[:3]) + "\n\n")  # a clean end, but no finish, no [DONE]
    got: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await drain(provider.stream(chat(), opts(fake.provider)), got)
    assert info.value.code == PROVIDER_STREAM_BROKEN
    assert len(got) == 3


async def test_an_error_event_mid_stream(
    openai_fake: FakeOpenAI, openai_provider: OpenAICompatProvider
) -> None:
    first = expected_chunks(openai_fake, "chat.sse", "gpt-4.1-mini")[0]
    error = {"error": {"message": "The server had an error.", "type": "server_error"}}
    openai_fake.behave(reply=f"data: {json.dumps(first)}\n\ndata: {json.dumps(error)}\n\n")
    got: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await drain(openai_provider.stream(chat(), opts("openai")), got)
    assert info.value.code == PROVIDER_STREAM_BROKEN
    assert info.value.provider_detail == "The server had an error."
    assert len(got) == 1


async def test_deepseek_out_of_capacity_is_not_an_answer(
    deepseek_fake: FakeOpenAI, deepseek: OpenAICompatProvider
) -> None:
    answer = json.loads(deepseek_fake.fixture_text("chat.json", "deepseek-chat"))
    answer["choices"][0]["finish_reason"] = "insufficient_system_resource"
    deepseek_fake.behave(reply=answer)
    with pytest.raises(UpstreamError) as info:
        await deepseek.complete(chat(), opts("deepseek"))
    assert info.value.code == PROVIDER_ERROR


async def test_an_unreadable_answer_is_a_provider_error(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.behave(reply={"unexpected": "shape"})
    with pytest.raises(UpstreamError) as info:
        await provider.complete(chat(), opts(fake.provider))
    assert info.value.code == PROVIDER_ERROR


# --- housekeeping -------------------------------------------------------------------------------


async def test_keys_and_prompts_are_not_logged(
    fake: FakeOpenAI, provider: OpenAICompatProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await provider.complete(chat(), opts(fake.provider))
    async for _ in provider.stream(chat(), opts(fake.provider)):
        pass
    fake.behave(status=401)
    with pytest.raises(UpstreamError):
        await provider.complete(chat(), opts(fake.provider))

    assert caplog.records  # the SDK and httpx2 did log at DEBUG
    assert KEYS[fake.provider] not in caplog.text
    assert PROMPT not in caplog.text


async def test_connections_are_reused(fake: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    for _ in range(3):
        await provider.complete(chat(), opts(fake.provider))
        async for _ in provider.stream(chat(), opts(fake.provider)):
            pass
    # Streams are read to their end, so their connection goes back to the pool too.
    assert len(fake.client_ports) == 6
    assert len(set(fake.client_ports)) == 1


async def test_an_injected_http_client_is_left_open(openai_fake: FakeOpenAI) -> None:
    async with httpx2.AsyncClient() as http:
        p = OpenAICompatProvider(
            "openai", KEYS["openai"], f"{openai_fake.url}/v1", http_client=http
        )
        await p.complete(chat(), opts("openai"))
        await p.aclose()
        assert not http.is_closed


async def test_the_fake_serves_models_and_embeddings_to_the_sdk(openai_fake: FakeOpenAI) -> None:
    client = openai.AsyncOpenAI(api_key=KEYS["openai"], base_url=f"{openai_fake.url}/v1")
    try:
        models = [m.id async for m in client.models.list()]
        vectors = await client.embeddings.create(
            model="text-embedding-3-small", input=["a", "b", "a"], dimensions=16
        )
    finally:
        await client.close()
    assert "gpt-4o-mini" in models
    first, second, third = (d.embedding for d in vectors.data)
    assert len(first) == 16
    assert first == third
    assert first != second
