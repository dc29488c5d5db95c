"""The real gRPC server on a real port, over a real Dispatcher and test doubles of our Provider.

The doubles implement ``sidecar.providers.base.Provider`` (answers, chosen DeepgateErrors,
streams that break); the adapters behind that contract are tested against fake provider servers
elsewhere. Each test talks to the server the way the plugin runner will: through a channel, with
the raw stub where the wire itself is the point, and through ``sidecar.grpc_client`` otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from deepgate import errors
from deepgate.errors import (
    DeepgateError,
    GatewayTimeout,
    InvalidRequest,
    NotFound,
    RateLimited,
    UpstreamError,
)
from sidecar import grpc_client
from sidecar._proto.deepgate.v1 import deepgate_pb2, deepgate_pb2_grpc
from sidecar.config import SidecarConfig
from sidecar.dispatch import Dispatcher
from sidecar.grpc_service import DeepgateService, build_grpc_server, stop_grpc_server
from sidecar.health import HealthBoard
from sidecar.metrics import Metrics
from sidecar.providers.base import PROVIDER_ERROR, PROVIDER_STREAM_BROKEN, CallOptions

USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "prompt_tokens_details": {"cached_tokens": 8},
    "completion_tokens_details": {"reasoning_tokens": 2},
}
BODY = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}


# --- test doubles of our Provider contract ----------------------------------------------------


@dataclass
class Double:
    """A provider that answers, fails with a chosen error, hangs, or streams and then breaks."""

    name: str
    error: Exception | None = None  # raised by complete, and by stream before its first chunk
    delay_s: float = 0.0  # wait before answering
    chunks: list[dict[str, Any]] = field(default_factory=list)
    fail_after: Exception | None = None  # raised by stream after its chunks
    calls: list[CallOptions] = field(default_factory=list)
    closed_streams: int = 0

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        self.calls.append(opts)
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return completion(opts.model, f"from {self.name}")

    async def stream(
        self, body: dict[str, Any], opts: CallOptions
    ) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(opts)
        try:
            await asyncio.sleep(self.delay_s)
            if self.error is not None:
                raise self.error
            for chunk in self.chunks:
                yield chunk
            if self.fail_after is not None:
                raise self.fail_after
        finally:
            self.closed_streams += 1

    async def aclose(self) -> None:
        pass


def completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }


def chunk(text: str, *, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [] if usage else [{"index": 0, "delta": {"content": text}}],
        **({"usage": usage} if usage else {}),
    }


# --- the server -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Sidecar:
    service: DeepgateService
    channel: grpc.aio.Channel
    clock: Clock

    @property
    def stub(self) -> deepgate_pb2_grpc.DeepgateStub:
        return deepgate_pb2_grpc.DeepgateStub(self.channel)


def sidecar_config() -> SidecarConfig:
    return SidecarConfig.model_validate(
        {
            "providers": {
                "deepseek": {"kind": "openai_compat", "api_key": "$env://DS_KEY", "region": "cn"},
                "openai": {"kind": "openai_compat", "api_key": "$env://OAI_KEY", "region": "us"},
                # configured but without a Dispatcher provider: its targets are not served
                "anthropic": {"kind": "anthropic", "api_key": "$env://ANT_KEY"},
            },
            "aliases": {
                "deepseek-chat": ["deepseek:deepseek-chat", "openai:gpt-4o-mini", "anthropic:c"],
                "gpt-4o-mini": ["openai:gpt-4o-mini"],
            },
            "retries": {"attempts": 1},
            "deadlines": {"total_s": 10, "first_token_s": 10},
            "breaker": {"consecutive_failures": 1, "open_s": 30},
        }
    )


Start = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start a sidecar over the given provider doubles; every one is stopped afterwards."""
    running: list[tuple[grpc.aio.Server, DeepgateService, grpc.aio.Channel]] = []

    async def _start(**providers: Double) -> Sidecar:
        config = sidecar_config()
        clock = Clock()
        board = HealthBoard(config.breaker, clock=clock)
        dispatcher = Dispatcher(config, dict(providers), board, Metrics())
        service = DeepgateService(dispatcher, board, config)
        server, port = await build_grpc_server(service, "127.0.0.1:0", "gateway")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        running.append((server, service, channel))
        return Sidecar(service, channel, clock)

    yield _start
    for server, service, channel in running:
        await channel.close()
        await stop_grpc_server(server, service, 0)


def request(body: Any = BODY, *, route: str = "", deadline_unix_ms: int = 0) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    envelope = deepgate_pb2.Envelope(
        request_id="req-42", route=route, deadline_unix_ms=deadline_unix_ms
    )
    return deepgate_pb2.ChatRequest(envelope=envelope, body_json=raw)


def trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: v for k, v in err.trailing_metadata() or () if isinstance(v, str)}


# --- Chat -------------------------------------------------------------------------------------


async def test_chat_answers_with_body_target_and_usage(start: Start) -> None:
    sc = await start(deepseek=Double("deepseek"), openai=Double("openai"))

    reply = await sc.stub.Chat(request())

    assert reply.target == "deepseek:deepseek-chat"
    body = orjson.loads(reply.body_json)
    assert body["choices"][0]["message"]["content"] == "from deepseek"
    assert body["model"] == "deepseek-chat"
    u = reply.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (12, 5, 17)
    assert (u.cached_tokens, u.reasoning_tokens) == (8, 2)


async def test_envelope_route_overrides_the_body_model(start: Start) -> None:
    deepseek, openai = Double("deepseek"), Double("openai")
    sc = await start(deepseek=deepseek, openai=openai)

    reply = await sc.stub.Chat(request(route="gpt-4o-mini"))

    assert reply.target == "openai:gpt-4o-mini"
    assert deepseek.calls == []
    assert [c.request_id for c in openai.calls] == ["req-42"]


async def test_chat_falls_back_when_the_first_target_fails(start: Start) -> None:
    failing = Double("deepseek", error=UpstreamError("boom", code=PROVIDER_ERROR))
    sc = await start(deepseek=failing, openai=Double("openai"))

    answer = await grpc_client.chat(sc.channel, BODY, request_id="req-1")

    assert answer["choices"][0]["message"]["content"] == "from openai"
    assert answer["model"] == "gpt-4o-mini"
    assert len(failing.calls) == 1


@pytest.mark.parametrize(
    ("raw", "code"),
    [(b"{not json", "invalid_json"), (b"[1, 2]", ""), (b'{"messages": []}', "")],
    ids=["bad-json", "not-an-object", "no-model"],
)
async def test_a_bad_body_is_invalid_argument(start: Start, raw: bytes, code: str) -> None:
    provider = Double("deepseek")
    sc = await start(deepseek=provider)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sc.stub.Chat(request(raw))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailers(caught.value) == {"deepgate-code": code, "deepgate-status": "400"}
    assert provider.calls == []


async def test_unknown_model_is_not_found_with_our_code(start: Start) -> None:
    sc = await start(deepseek=Double("deepseek"))
    body = {**BODY, "model": "gpt-9"}

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sc.stub.Chat(request(body))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert trailers(caught.value)["deepgate-code"] == "model_not_found"
    assert "gpt-9" in (caught.value.details() or "")

    with pytest.raises(NotFound) as rebuilt:
        await grpc_client.chat(sc.channel, body)
    assert rebuilt.value.code == "model_not_found"
    assert rebuilt.value.status == 404


async def test_the_envelope_deadline_ends_the_call(start: Start) -> None:
    sc = await start(deepseek=Double("deepseek", delay_s=30))
    deadline_ms = int((time.time() + 0.2) * 1000)

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sc.stub.Chat(request(deadline_unix_ms=deadline_ms))

    assert time.monotonic() - started < 5
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert trailers(caught.value)["deepgate-code"] == "timeout"


async def test_a_deadline_already_passed_calls_no_provider(start: Start) -> None:
    provider = Double("deepseek")
    sc = await start(deepseek=provider)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sc.stub.Chat(request(deadline_unix_ms=int(time.time() * 1000) - 1000))

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert provider.calls == []


async def test_the_grpc_deadline_ends_the_call(start: Start) -> None:
    sc = await start(deepseek=Double("deepseek", delay_s=30))

    with pytest.raises(GatewayTimeout):
        await grpc_client.chat(sc.channel, BODY, timeout_s=0.2)


async def test_an_unexpected_failure_is_internal_and_says_nothing_of_it(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    sc = await start(deepseek=Double("deepseek", error=RuntimeError("secret detail")))

    with (
        caplog.at_level(logging.ERROR, logger="sidecar.grpc_service"),
        pytest.raises(grpc.aio.AioRpcError) as caught,
    ):
        await sc.stub.Chat(request())

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details() or ""
    assert "secret detail" not in details
    assert "req-42" in details
    assert trailers(caught.value)["deepgate-code"] == "internal_error"
    assert any(r.exc_info for r in caplog.records)


# --- ChatStream -------------------------------------------------------------------------------


async def test_stream_sends_chunks_in_order_with_usage_on_the_last(start: Start) -> None:
    chunks = [chunk("a"), chunk("b"), chunk("", usage=USAGE)]
    sc = await start(deepseek=Double("deepseek", chunks=chunks))

    got = [c async for c in sc.stub.ChatStream(request())]

    assert [orjson.loads(c.chunk_json) for c in got] == chunks
    assert {c.target for c in got} == {"deepseek:deepseek-chat"}
    assert [c.HasField("usage") for c in got] == [False, False, True]
    assert got[-1].usage.cached_tokens == 8
    assert not any(c.HasField("error") for c in got)


async def test_stream_failing_after_its_first_chunk_ends_with_an_error_chunk(
    start: Start,
) -> None:
    broken = UpstreamError("deepseek dropped the stream.", code=PROVIDER_STREAM_BROKEN)
    provider = Double("deepseek", chunks=[chunk("a"), chunk("b")], fail_after=broken)
    sc = await start(deepseek=provider, openai=Double("openai", chunks=[chunk("x")]))

    call = sc.stub.ChatStream(request())
    got = [c async for c in call]

    assert await call.code() == grpc.StatusCode.OK
    assert [orjson.loads(c.chunk_json)["choices"][0]["delta"]["content"] for c in got[:2]] == [
        "a",
        "b",
    ]
    last = got[-1]
    assert last.chunk_json == b""
    assert (last.error.http_status, last.error.type, last.error.code) == (
        502,
        "api_error",
        PROVIDER_STREAM_BROKEN,
    )
    assert last.error.message == "deepseek dropped the stream."
    assert provider.closed_streams == 1


async def test_client_stream_raises_the_in_stream_error_after_the_chunks(start: Start) -> None:
    broken = UpstreamError("deepseek dropped the stream.", code=PROVIDER_STREAM_BROKEN)
    provider = Double("deepseek", chunks=[chunk("a"), chunk("b")], fail_after=broken)
    sc = await start(deepseek=provider, openai=Double("openai", chunks=[chunk("x")]))
    seen: list[str] = []

    async def consume() -> None:
        async for c in grpc_client.chat_stream(sc.channel, BODY):
            seen.append(c["choices"][0]["delta"]["content"])

    with pytest.raises(UpstreamError) as rebuilt:
        await consume()
    assert seen == ["a", "b"]  # no fallback to openai once the client has seen a chunk
    assert rebuilt.value.code == PROVIDER_STREAM_BROKEN
    assert rebuilt.value.message == "deepseek dropped the stream."


async def test_stream_failing_before_its_first_chunk_is_a_status(start: Start) -> None:
    limited = RateLimited("OpenAI is rate limiting this gateway.", retry_after=3)
    sc = await start(openai=Double("openai", error=limited))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in sc.stub.ChatStream(request(route="gpt-4o-mini")):
            pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers(caught.value) == {
        "deepgate-code": "rate_limit_exceeded",
        "deepgate-status": "429",
        "deepgate-retry-after": "3",
    }

    # The failure opened openai's breaker; a fresh sidecar shows the client's side.
    fresh = await start(openai=Double("openai", error=limited))
    with pytest.raises(RateLimited) as rebuilt:
        async for _ in grpc_client.chat_stream(fresh.channel, BODY, route="gpt-4o-mini"):
            pass
    assert rebuilt.value.retry_after == 3
    assert rebuilt.value.message == "OpenAI is rate limiting this gateway."


async def test_stream_falls_back_before_its_first_chunk(start: Start) -> None:
    failing = Double("deepseek", error=UpstreamError("boom", code=PROVIDER_ERROR))
    sc = await start(deepseek=failing, openai=Double("openai", chunks=[chunk("x")]))

    got = [c async for c in sc.stub.ChatStream(request())]

    assert [c.target for c in got] == ["openai:gpt-4o-mini"]


async def test_stream_bad_json_is_invalid_argument(start: Start) -> None:
    sc = await start(deepseek=Double("deepseek"))

    with pytest.raises(InvalidRequest):
        async for _ in grpc_client.chat_stream(sc.channel, {"messages": "nope"}):
            pass


async def test_stream_deadline_mid_stream_ends_with_a_timeout_chunk(start: Start) -> None:
    class Stalling(Double):
        async def stream(
            self, body: dict[str, Any], opts: CallOptions
        ) -> AsyncIterator[dict[str, Any]]:
            yield chunk("a")
            await asyncio.sleep(30)
            yield chunk("never")

    sc = await start(deepseek=Stalling("deepseek"))
    deadline_ms = int((time.time() + 0.3) * 1000)

    got = [c async for c in sc.stub.ChatStream(request(deadline_unix_ms=deadline_ms))]

    assert len(got) == 2
    assert got[-1].error.code == "timeout"
    assert got[-1].error.http_status == 504


# --- the pool's RPCs --------------------------------------------------------------------------


async def test_embed_and_classify_are_unimplemented_here(start: Start) -> None:
    sc = await start(deepseek=Double("deepseek"))
    calls = [
        sc.stub.Embed(deepgate_pb2.EmbedRequest(model="bge-small", inputs=["x"])),
        sc.stub.Classify(deepgate_pb2.ClassifyRequest(model="guard", texts=["x"])),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "inference pool" in (caught.value.details() or "")


# --- ProviderStats ----------------------------------------------------------------------------


async def test_provider_stats_lists_every_served_target_and_follows_the_breaker(
    start: Start,
) -> None:
    failing = Double("deepseek", error=UpstreamError("boom", code=PROVIDER_ERROR))
    sc = await start(deepseek=failing, openai=Double("openai"))

    before = {t.target: t for t in await grpc_client.provider_stats(sc.channel)}
    # anthropic has no provider: its target is not served, so not listed; openai's is listed once
    assert list(before) == ["deepseek:deepseek-chat", "openai:gpt-4o-mini"]
    ds = before["deepseek:deepseek-chat"]
    assert (ds.provider, ds.model, ds.region) == ("deepseek", "deepseek-chat", "cn")
    assert before["openai:gpt-4o-mini"].region == "us"
    assert all(t.state == "closed" and t.available and t.calls == 0 for t in before.values())

    await grpc_client.chat(sc.channel, BODY)  # deepseek fails once: its breaker opens

    after = {t.target: t for t in await grpc_client.provider_stats(sc.channel)}
    ds = after["deepseek:deepseek-chat"]
    assert (ds.state, ds.available, ds.calls, ds.failures, ds.error_rate) == (
        "open",
        False,
        1,
        1,
        1.0,
    )
    oai = after["openai:gpt-4o-mini"]
    assert (oai.state, oai.available, oai.calls, oai.failures) == ("closed", True, 1, 0)
    assert oai.latency_ms > 0

    # Once open_s has passed, the breaker is half-open: reading the stats must not use up its
    # only probe, so a real call still goes to deepseek afterwards.
    sc.clock.now += 31
    for _ in range(3):
        (ds,) = [
            t for t in await grpc_client.provider_stats(sc.channel) if t.provider == "deepseek"
        ]
        assert (ds.state, ds.available) == ("half_open", True)
    failing.error = None
    answer = await grpc_client.chat(sc.channel, BODY)
    assert answer["choices"][0]["message"]["content"] == "from deepseek"


# --- health and reflection --------------------------------------------------------------------


async def test_health_serves_overall_and_deepgate_then_not_serving_on_shutdown(
    start: Start,
) -> None:
    sc = await start(deepseek=Double("deepseek"))
    health = health_pb2_grpc.HealthStub(sc.channel)
    serving = health_pb2.HealthCheckResponse.SERVING

    for name in ("", "deepgate.v1.Deepgate"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == serving

    await sc.service.set_serving(False)
    for name in ("", "deepgate.v1.Deepgate"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_the_services(start: Start) -> None:
    sc = await start(deepseek=Double("deepseek"))
    stub = reflection_pb2_grpc.ServerReflectionStub(sc.channel)

    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    replies = [r async for r in call]

    names = {s.name for s in replies[0].list_services_response.service}
    assert {
        "deepgate.v1.Deepgate",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


async def test_in_stream_errors_come_back_as_their_own_class() -> None:
    """Every leaf class comes back as itself from an in-stream error chunk."""
    leaves = [
        errors.InvalidRequest("m", code="x"),
        errors.ContextLengthExceeded("m"),
        errors.AuthenticationFailed("m"),
        errors.PermissionDenied("m"),
        errors.NotFound("m"),
        errors.PayloadTooLarge("m"),
        errors.RateLimited("m"),
        errors.InternalError("m"),
        errors.UpstreamError("m"),
        errors.ServiceUnavailable("m"),
        errors.GatewayTimeout("m"),
    ]
    for err in leaves:
        as_chunk = deepgate_pb2.Error(
            http_status=err.status, type=err.openai_type, code=err.code or "", message=err.message
        )
        back: DeepgateError = grpc_client.error_from_chunk(as_chunk)
        assert (type(back), back.code, back.message) == (type(err), err.code, err.message)


async def test_an_unknown_role_is_refused() -> None:
    config = sidecar_config()
    board = HealthBoard(config.breaker)
    service = DeepgateService(Dispatcher(config, {}, board, Metrics()), board, config)

    with pytest.raises(ValueError, match="unknown sidecar role 'edge'"):
        await build_grpc_server(service, "127.0.0.1:0", "edge")
