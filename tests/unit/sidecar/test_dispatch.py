"""The dispatcher over test doubles of our Provider contract: retries, fallback, breakers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deepgate.errors import (
    DeepgateError,
    GatewayTimeout,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
)
from sidecar.config import SidecarConfig
from sidecar.dispatch import Dispatcher
from sidecar.health import HealthBoard
from sidecar.metrics import Metrics
from sidecar.providers.base import PROVIDER_AUTH, PROVIDER_ERROR, CallOptions

Outcome = dict[str, Any] | DeepgateError | float  # an answer, an error, or "hang this long"


class Scripted:
    """A provider that answers from a script, one outcome per call (the last one repeats)."""

    def __init__(
        self, name: str, *script: Outcome, chunks: list[dict[str, Any]] | None = None
    ) -> None:
        self.name = name
        self.script = list(script) or [answer(name)]
        self.chunks = chunks
        self.calls: list[CallOptions] = []

    def _next(self) -> Outcome:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        self.calls.append(opts)
        outcome = self._next()
        if isinstance(outcome, float):
            # as an SDK does: the read timeout of the attempt fires first
            if outcome > opts.timeout_s:
                await asyncio.sleep(opts.timeout_s)
                raise GatewayTimeout("read timeout")
            await asyncio.sleep(outcome)
            return answer(self.name)
        if isinstance(outcome, DeepgateError):
            raise outcome
        return outcome

    async def stream(
        self, body: dict[str, Any], opts: CallOptions
    ) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(opts)
        outcome = self._next()
        if isinstance(outcome, float):
            await asyncio.sleep(outcome)
        if isinstance(outcome, DeepgateError):
            raise outcome
        for chunk in self.chunks or [{"choices": [{"delta": {"content": self.name}}]}]:
            if isinstance(chunk, DeepgateError):
                raise chunk
            yield chunk

    async def aclose(self) -> None:
        pass


def answer(name: str) -> dict[str, Any]:
    return {"choices": [{"message": {"content": f"from {name}"}}], "usage": {"prompt_tokens": 3}}


def config(**over: Any) -> SidecarConfig:
    data: dict[str, Any] = {
        "providers": {
            p: {"kind": "openai_compat", "api_key": f"$env://{p.upper()}_KEY"}
            for p in ("deepseek", "openai", "anthropic")
        },
        "aliases": {"deepseek-chat": ["deepseek:ds", "openai:gpt", "anthropic:claude"]},
        "retries": {"attempts": 2, "backoff_base_s": 0.01, "max_wait_s": 1.5},
        "deadlines": {"total_s": 5, "first_token_s": 1},
    }
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return SidecarConfig.model_validate(data)


def dispatcher(*providers: Scripted, **over: Any) -> tuple[Dispatcher, list[float]]:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    conf = config(**over)
    d = Dispatcher(
        conf,
        {p.name: p for p in providers},
        HealthBoard(conf.breaker),
        Metrics(),
        sleep=sleep,
        jitter=lambda: 1.0,
    )
    return d, slept


BODY = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}


async def test_first_target_answers() -> None:
    ds = Scripted("deepseek")
    d, _ = dispatcher(ds, Scripted("openai"))
    result = await d.complete(BODY, d.plan("deepseek-chat"))
    assert result.target.label == "deepseek:ds"
    assert result.body == answer("deepseek")
    assert ds.calls[0].model == "ds"


async def test_5xx_is_retried_then_falls_back() -> None:
    ds = Scripted("deepseek", UpstreamError("boom", code=PROVIDER_ERROR))
    oa = Scripted("openai")
    d, slept = dispatcher(ds, oa)
    result = await d.complete(BODY, d.plan("deepseek-chat"))
    assert result.target.provider == "openai"
    assert len(ds.calls) == 2  # attempts per target
    assert slept == [0.01]  # one backoff between the two attempts


async def test_retry_succeeds_on_the_same_target() -> None:
    ds = Scripted("deepseek", UpstreamError("boom", code=PROVIDER_ERROR), answer("deepseek"))
    d, _ = dispatcher(ds, Scripted("openai"))
    assert (await d.complete(BODY, d.plan("deepseek-chat"))).target.provider == "deepseek"


async def test_retry_after_is_honoured_when_short_and_skipped_when_long() -> None:
    ds = Scripted("deepseek", RateLimited("slow", retry_after=1.0), answer("deepseek"))
    d, slept = dispatcher(ds, Scripted("openai"))
    assert (await d.complete(BODY, d.plan("deepseek-chat"))).target.provider == "deepseek"
    assert slept == [1.0]
    ds = Scripted("deepseek", RateLimited("slow", retry_after=30.0), answer("deepseek"))
    d, slept = dispatcher(ds, Scripted("openai"))
    assert (await d.complete(BODY, d.plan("deepseek-chat"))).target.provider == "openai"
    assert slept == []
    assert len(ds.calls) == 1


@pytest.mark.parametrize("code", [PROVIDER_AUTH, "provider_model_not_found"])
async def test_target_specific_failures_fall_back_without_retry(code: str) -> None:
    ds = Scripted("deepseek", UpstreamError("no", code=code))
    d, slept = dispatcher(ds, Scripted("openai"))
    assert (await d.complete(BODY, d.plan("deepseek-chat"))).target.provider == "openai"
    assert len(ds.calls) == 1
    assert slept == []


async def test_a_bad_request_is_never_retried_nor_sent_elsewhere() -> None:
    ds = Scripted("deepseek", InvalidRequest("bad"))
    oa = Scripted("openai")
    d, _ = dispatcher(ds, oa)
    with pytest.raises(InvalidRequest):
        await d.complete(BODY, d.plan("deepseek-chat"))
    assert len(ds.calls) == 1
    assert oa.calls == []


async def test_all_down_raises_the_last_error() -> None:
    fail = UpstreamError("boom", code=PROVIDER_ERROR)
    d, _ = dispatcher(
        Scripted("deepseek", fail),
        Scripted("openai", fail),
        Scripted("anthropic", RateLimited("x", retry_after=9)),
    )
    with pytest.raises(RateLimited) as err:
        await d.complete(BODY, d.plan("deepseek-chat"))
    assert err.value.http_headers()["retry-after"] == "9"


async def test_a_hanging_target_times_out_and_falls_back() -> None:
    d, _ = dispatcher(
        Scripted("deepseek", 10.0),
        Scripted("openai"),
        deadlines={"total_s": 0.6, "first_token_s": 0.2},
        retries={"attempts": 1},
    )
    result = await d.complete(BODY, d.plan("deepseek-chat"))
    assert result.target.provider == "openai"


async def test_the_total_deadline_bounds_everything() -> None:
    d, _ = dispatcher(
        Scripted("deepseek", 10.0),
        Scripted("openai", 10.0),
        Scripted("anthropic", 10.0),
        deadlines={"total_s": 0.3, "first_token_s": 0.2},
        retries={"attempts": 1},
    )
    with pytest.raises(GatewayTimeout):
        await d.complete(BODY, d.plan("deepseek-chat"))


async def test_open_breaker_skips_the_target() -> None:
    ds = Scripted("deepseek", UpstreamError("boom", code=PROVIDER_ERROR))
    oa = Scripted("openai")
    d, _ = dispatcher(
        ds, oa, breaker={"consecutive_failures": 2, "open_s": 60}, retries={"attempts": 1}
    )
    for _ in range(2):
        await d.complete(BODY, d.plan("deepseek-chat"))
    assert len(ds.calls) == 2
    for _ in range(3):
        assert (await d.complete(BODY, d.plan("deepseek-chat"))).target.provider == "openai"
    assert len(ds.calls) == 2  # open: not called any more
    assert d.board["deepseek:ds"].snapshot().state == "open"


def test_unknown_alias_and_unconfigured_chain() -> None:
    d, _ = dispatcher(Scripted("deepseek"))
    with pytest.raises(NotFound) as nf:
        d.plan("gpt-7")
    assert nf.value.code == "model_not_found"
    assert [t.provider for t in d.plan("deepseek-chat")] == ["deepseek"]
    empty, _ = dispatcher()
    with pytest.raises(ServiceUnavailable) as su:
        empty.plan("deepseek-chat")
    assert "DEEPSEEK_API_KEY" in su.value.message


async def test_stream_falls_back_before_the_first_chunk() -> None:
    ds = Scripted("deepseek", UpstreamError("boom", code=PROVIDER_ERROR))
    d, _ = dispatcher(ds, Scripted("openai"), retries={"attempts": 1})
    opened = await d.open_stream(BODY, d.plan("deepseek-chat"))
    assert opened.target.provider == "openai"
    assert [c async for c in opened.chunks] == [{"choices": [{"delta": {"content": "openai"}}]}]


async def test_stream_failure_after_the_first_chunk_reaches_the_caller() -> None:
    broken = UpstreamError("cut", code="provider_stream_broken")
    ds = Scripted("deepseek", chunks=[{"choices": [{"delta": {"content": "He"}}]}, broken])  # type: ignore[list-item]
    oa = Scripted("openai")
    d, _ = dispatcher(ds, oa)
    opened = await d.open_stream(BODY, d.plan("deepseek-chat"))
    seen: list[dict[str, Any]] = []

    async def drain() -> None:
        async for chunk in opened.chunks:
            seen.append(chunk)

    with pytest.raises(UpstreamError):
        await drain()
    assert seen == [{"choices": [{"delta": {"content": "He"}}]}]
    assert oa.calls == []  # no fallback once bytes went out
    assert d.board["deepseek:ds"].snapshot().failures == 1


async def test_slow_first_token_falls_back() -> None:
    d, _ = dispatcher(
        Scripted("deepseek", 5.0),
        Scripted("openai"),
        deadlines={"first_token_s": 0.2, "total_s": 3},
        retries={"attempts": 1},
    )
    opened = await d.open_stream(BODY, d.plan("deepseek-chat"))
    assert opened.target.provider == "openai"
