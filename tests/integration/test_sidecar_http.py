"""The sidecar's HTTP face, driven by the official SDKs, over our fake providers.

The sidecar runs in-process with the shipped config; DeepSeek, OpenAI and Anthropic are fake
servers speaking the real wire formats. Clients are the `openai` and `anthropic` SDKs, sync and
async, as an application would use them through APISIX.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anthropic
import httpx2 as httpx
import openai
import pytest

from deepgate.route_signature import sign_route
from sidecar.app import Sidecar, build_providers
from sidecar.config import load_config
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeOpenAI

HI = [{"role": "user", "content": "hi"}]


@dataclass
class Stack:
    sidecar: Sidecar
    deepseek: FakeOpenAI
    openai: FakeOpenAI
    anthropic: FakeAnthropic
    clients: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.http_port}"

    def oa(self) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)
        self.clients.append(client)
        return client

    def an(self) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=self.url, api_key="unused", max_retries=0)
        self.clients.append(client)
        return client


async def make_stack(monkeypatch: pytest.MonkeyPatch, route_key: bytes | None = None) -> Stack:
    ds, oa, an = FakeOpenAI("deepseek"), FakeOpenAI("openai"), FakeAnthropic()
    for fake in (ds, oa, an):
        await fake.start()
    env = {
        "DEEPSEEK_API_KEY": "sk-ds",
        "DEEPSEEK_BASE_URL": ds.url,
        "OPENAI_API_KEY": "sk-oa",
        "OPENAI_BASE_URL": f"{oa.url}/v1",
        "ANTHROPIC_API_KEY": "sk-an",
        "ANTHROPIC_BASE_URL": an.url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = load_config().model_copy(
        update={"retries": load_config().retries.model_copy(update={"backoff_base_s": 0.01})}
    )
    sidecar = Sidecar(
        config,
        "gateway",
        http_address=("127.0.0.1", 0),
        grpc_address=None,
        providers=build_providers(config),
        route_key=route_key,
    )
    await sidecar.start()
    return Stack(sidecar, ds, oa, an)


async def stop_stack(stack: Stack) -> None:
    for client in stack.clients:
        await client.close()
    await stack.sidecar.stop()
    for fake in (stack.deepseek, stack.openai, stack.anthropic):
        await fake.stop()


@pytest.fixture
async def stack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    s = await make_stack(monkeypatch)
    yield s
    await stop_stack(s)


async def drain(stream: AsyncIterator[object], into: list[object]) -> None:
    async for item in stream:
        into.append(item)


# --- OpenAI face ------------------------------------------------------------------------------


async def test_deepseek_answers_first_and_says_so(stack: Stack) -> None:
    raw = await stack.oa().chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=HI
    )
    completion = raw.parse()
    assert "deepseek" in (completion.choices[0].message.content or "")
    assert raw.headers["x-deepgate-route"] == "deepseek:deepseek-chat"
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0
    assert stack.deepseek.received[-1].body["model"] == "deepseek-chat"
    assert stack.deepseek.received[-1].headers["Authorization"] == "Bearer sk-ds"


async def test_streaming_honours_include_usage(stack: Stack) -> None:
    client = stack.oa()
    stream = await client.chat.completions.create(model="deepseek-chat", messages=HI, stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "deepseek" in text
    assert all(c.usage is None for c in chunks)
    stream = await client.chat.completions.create(
        model="deepseek-chat", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


async def test_tools_round_trip(stack: Stack) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    completion = await stack.oa().chat.completions.create(
        model="deepseek-chat",
        messages=HI,
        tools=tools,
        tool_choice="auto",  # type: ignore[arg-type]
    )
    call = completion.choices[0].message.tool_calls
    assert call
    assert call[0].function.name
    assert completion.choices[0].finish_reason == "tool_calls"
    assert stack.deepseek.received[-1].body["tools"][0]["function"]["name"] == "get_weather"


async def test_primary_500_falls_back_to_openai(stack: Stack) -> None:
    stack.deepseek.behave(status=500)
    raw = await stack.oa().chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=HI
    )
    assert raw.headers["x-deepgate-route"] == "openai:gpt-5-mini"
    assert "openai" in (raw.parse().choices[0].message.content or "")
    assert len(stack.deepseek.received) == 2  # tried twice, as configured


async def test_500_then_429_falls_back_to_anthropic(stack: Stack) -> None:
    stack.deepseek.behave(status=500)
    stack.openai.behave(status=429, retry_after="30")  # too long to wait: next target
    completion = await stack.oa().chat.completions.create(model="deepseek-chat", messages=HI)
    assert "anthropic" in (completion.choices[0].message.content or "")
    assert len(stack.openai.received) == 1


async def test_all_down_gives_an_openai_shaped_error(stack: Stack) -> None:
    stack.deepseek.behave(status=500)
    stack.openai.behave(status=503)
    stack.anthropic.behave(status=500)
    with pytest.raises(openai.APIStatusError) as err:
        await stack.oa().chat.completions.create(model="deepseek-chat", messages=HI)
    assert err.value.status_code == 502
    body = err.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "provider_error"
    assert "exploded" not in body["error"]["message"]  # provider text stays out


async def test_429_everywhere_keeps_retry_after(stack: Stack) -> None:
    for fake in (stack.deepseek, stack.openai, stack.anthropic):
        fake.behave(status=429, retry_after="7")
    with pytest.raises(openai.RateLimitError) as err:
        await stack.oa().chat.completions.create(model="deepseek-chat", messages=HI)
    assert err.value.response.headers["retry-after"] == "7"


async def test_stream_falls_back_before_the_first_byte(stack: Stack) -> None:
    stack.deepseek.behave(status=500)
    stream = await stack.oa().chat.completions.create(
        model="deepseek-chat", messages=HI, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "openai" in text


async def test_stream_dropped_midway_ends_with_an_error_event(stack: Stack) -> None:
    stack.deepseek.behave(drop_after_events=2)
    stream = await stack.oa().chat.completions.create(
        model="deepseek-chat", messages=HI, stream=True
    )
    seen: list[object] = []
    with pytest.raises(openai.APIError):
        await drain(stream, seen)
    assert seen  # bytes reached the client before the failure
    assert stack.openai.received == []  # no fallback after the first byte


async def test_slow_first_token_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    s = await make_stack(monkeypatch)
    try:
        deadlines = s.sidecar.config.deadlines.model_copy(update={"first_token_s": 0.5})
        s.sidecar.dispatcher.config = s.sidecar.config.model_copy(update={"deadlines": deadlines})
        s.deepseek.behave(first_byte_delay_s=3)
        stream = await s.oa().chat.completions.create(
            model="deepseek-chat", messages=HI, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert "openai" in text
    finally:
        await stop_stack(s)


async def test_bad_requests_are_400_and_reach_no_provider(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        r = await http.post("/v1/chat/completions", content=b"{nope")
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post("/v1/chat/completions", json={"model": "gpt-7", "messages": HI})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
    assert stack.deepseek.received == []


async def test_sync_clients_in_a_thread(stack: Stack) -> None:
    def call() -> tuple[str, str]:
        with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as oa:
            stream = oa.chat.completions.create(model="deepseek-chat", messages=HI, stream=True)  # type: ignore[arg-type]
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with anthropic.Anthropic(base_url=stack.url, api_key="unused", max_retries=0) as an:
            message = an.messages.create(model="deepseek-chat", max_tokens=50, messages=HI)  # type: ignore[arg-type]
        return text, message.content[0].text  # type: ignore[union-attr]

    text, anthropic_text = await asyncio.get_running_loop().run_in_executor(None, call)
    assert "deepseek" in text
    assert "deepseek" in anthropic_text


# --- Anthropic face ---------------------------------------------------------------------------


async def test_anthropic_sdk_reaches_deepseek(stack: Stack) -> None:
    raw = await stack.an().messages.with_raw_response.create(
        model="deepseek-chat",
        max_tokens=50,
        system="Be brief.",
        messages=HI,  # type: ignore[arg-type]
    )
    message = await raw.parse()
    assert "deepseek" in message.content[0].text  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0
    assert raw.headers["x-deepgate-route"] == "deepseek:deepseek-chat"
    sent = stack.deepseek.received[-1].body
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_anthropic_sdk_streaming(stack: Stack) -> None:
    async with stack.an().messages.stream(model="deepseek-chat", max_tokens=50, messages=HI) as s:  # type: ignore[arg-type]
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert "deepseek" in text
    assert final.stop_reason == "end_turn"


async def test_anthropic_sdk_with_tools(stack: Stack) -> None:
    message = await stack.an().messages.create(
        model="deepseek-chat",
        max_tokens=100,
        messages=HI,  # type: ignore[arg-type]
        tools=[{"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}],
    )
    assert message.stop_reason == "tool_use"
    assert any(block.type == "tool_use" for block in message.content)


async def test_anthropic_errors_are_anthropic_shaped(stack: Stack) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        await stack.an().messages.create(model="gpt-7", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    body = err.value.response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"


# --- the rest of the face ---------------------------------------------------------------------


async def test_models_health_metrics(stack: Stack) -> None:
    ids = [m.id async for m in stack.oa().models.list()]
    assert "deepseek-chat" in ids
    await stack.oa().chat.completions.create(model="deepseek-chat", messages=HI)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        health = (await http.get("/healthz")).json()
        assert health == {"status": "ok", "providers": ["anthropic", "deepseek", "openai"]}
        metrics = (await http.get("/metrics")).text
    assert (
        'deepgate_provider_requests_total{model="deepseek-chat",outcome="ok",provider="deepseek"}'
        in metrics
    )
    assert (
        'deepgate_tokens_total{kind="prompt",model="deepseek-chat",provider="deepseek"}' in metrics
    )
    assert "deepgate_provider_latency_seconds_bucket" in metrics


# --- route signatures -------------------------------------------------------------------------

KEY = b"route-key-for-tests-0123456789abcdef"


async def test_signed_routes_are_required_when_a_key_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = await make_stack(monkeypatch, route_key=KEY)
    try:
        client = s.oa()
        for headers in ({}, {"x-deepgate-route": "deepseek:deepseek-chat"}):
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(
                    model="deepseek-chat", messages=HI, extra_headers=headers
                )
        assert s.deepseek.received == []
        signed = sign_route(KEY, "rq-1", ["anthropic:claude-haiku-4-5"])
        completion = await client.chat.completions.create(
            model="deepseek-chat",
            messages=HI,
            extra_headers={"x-request-id": "rq-1", "x-deepgate-route": signed},
        )
        assert "anthropic" in (completion.choices[0].message.content or "")
        with pytest.raises(openai.AuthenticationError):  # the same decision for another request
            await client.chat.completions.create(
                model="deepseek-chat",
                messages=HI,
                extra_headers={"x-request-id": "rq-2", "x-deepgate-route": signed},
            )
    finally:
        await stop_stack(s)


async def test_connection_refused_falls_back(stack: Stack) -> None:
    await stack.deepseek.stop()  # nothing listens on DeepSeek's port any more
    raw = await stack.oa().chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=HI
    )
    assert raw.headers["x-deepgate-route"] == "openai:gpt-5-mini"


async def test_a_hanging_provider_times_out_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    s = await make_stack(monkeypatch)
    try:
        deadlines = s.sidecar.config.deadlines.model_copy(update={"first_token_s": 0.5})
        s.sidecar.dispatcher.config = s.sidecar.config.model_copy(update={"deadlines": deadlines})
        s.deepseek.behave(hang=True)
        raw = await s.oa().chat.completions.with_raw_response.create(
            model="deepseek-chat", messages=HI
        )
        assert raw.headers["x-deepgate-route"] == "openai:gpt-5-mini"
    finally:
        await stop_stack(s)
