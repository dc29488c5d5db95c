"""The local chat model (SmolLM2-135M-Instruct from its package), through the openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import openai
import pytest

from sidecar.app import Sidecar, build_local_chat
from sidecar.config import SidecarConfig
from sidecar.providers.base import CallOptions
from sidecar.providers.local import LocalProvider

CONFIG = SidecarConfig.model_validate(
    {
        "providers": {"local": {"kind": "local"}},
        "aliases": {"local": ["local:smollm2-135m-instruct"]},
    }
)
OPTS = CallOptions(model="smollm2-135m-instruct", timeout_s=60)
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def provider() -> LocalProvider:
    built = build_local_chat(CONFIG)
    assert isinstance(built, LocalProvider)
    return built


async def test_answers_with_usage_and_limits(provider: LocalProvider) -> None:
    answer = await provider.complete({"messages": ASK, "max_tokens": 24}, OPTS)
    text = answer["choices"][0]["message"]["content"]
    assert "Paris" in text
    assert answer["usage"]["prompt_tokens"] > 5
    assert 0 < answer["usage"]["completion_tokens"] <= 24
    short = await provider.complete({"messages": ASK, "max_tokens": 3}, OPTS)
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3
    stopped = await provider.complete({"messages": ASK, "max_tokens": 24, "stop": ["Paris"]}, OPTS)
    assert "Paris" not in stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"


async def test_stream_equals_the_greedy_answer_and_the_loop_stays_free(
    provider: LocalProvider,
) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    chunks = [c async for c in provider.stream({"messages": ASK, "max_tokens": 16}, OPTS)]
    task.cancel()
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    text = "".join(p for p in pieces if p)
    whole = await provider.complete({"messages": ASK, "max_tokens": 16}, OPTS)
    assert text == whole["choices"][0]["message"]["content"]
    assert len([p for p in pieces if p]) >= 2
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert ticks >= 5  # generation ran off the event loop


@pytest.fixture
async def sidecar(provider: LocalProvider) -> AsyncIterator[Sidecar]:
    s = Sidecar(
        CONFIG, "all", http_address=("127.0.0.1", 0), grpc_address=None,
        providers={"local": provider},
    )  # fmt: skip
    await s.start()
    yield s
    await s.stop()


async def test_openai_sdk_streams_from_the_local_model(sidecar: Sidecar) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{sidecar.http_port}/v1", api_key="x", max_retries=0
    ) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="local",
            messages=ASK,
            max_tokens=12,  # type: ignore[arg-type]
        )
        stream = await client.chat.completions.create(
            model="local",
            messages=ASK,
            max_tokens=12,
            stream=True,  # type: ignore[arg-type]
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert raw.headers["x-deepgate-route"] == "local:smollm2-135m-instruct"
    assert raw.parse().choices[0].message.content
    assert len([p for p in parts if p]) >= 2
