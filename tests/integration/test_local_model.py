"""The local chat model (SmolLM2-135M-Instruct from its package's GGUF), for real.

The model loads once per module (10-15 s on a 2-core machine) with every outbound connection
refused, so a test run proves that nothing is fetched. Generation is greedy unless a test sets a
temperature, so the same request gives the same text however it is served.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any
from unittest import mock

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from deepgate.errors import InvalidRequest, RateLimited
from sidecar.app import Sidecar
from sidecar.config import SidecarConfig
from sidecar.pool.local_llm import MODEL_NAME, LocalChatModel
from sidecar.providers.base import PROVIDER_UNSUPPORTED, CallOptions
from sidecar.providers.local import LocalProvider

CONFIG = SidecarConfig.model_validate(
    {
        "providers": {"local": {"kind": "local"}},
        "aliases": {"local": ["local:smollm2-135m-instruct"]},
    }
)
OPTS = CallOptions(model=MODEL_NAME, timeout_s=60)
ASK = [{"role": "user", "content": "What is the capital of France?"}]
SDK_ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
OTHERS = [
    [{"role": "user", "content": "Name three colours."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]


def _no_network(sock: socket.socket, address: Any) -> None:
    raise OSError(f"the local model tried to connect to {address!r}")


@pytest.fixture(scope="module")
def model() -> Iterator[LocalChatModel]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    with mock.patch.object(socket.socket, "connect", _no_network):
        loaded = LocalChatModel("cpu", threads=1)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def provider(model: LocalChatModel) -> LocalProvider:
    return LocalProvider(model, owns_model=False)  # the module fixture closes the model


def _text(answer: dict[str, Any]) -> str:
    content = answer["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    return content


async def test_answers_a_short_prompt_with_usage(
    provider: LocalProvider, model: LocalChatModel
) -> None:
    answer = await provider.complete({"messages": ASK, "max_tokens": 24}, OPTS)
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-local-")
    assert answer["model"] == MODEL_NAME
    assert "Paris" in _text(answer)
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len(model.encode(ASK))
    assert 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_max_tokens_ends_with_length(provider: LocalProvider) -> None:
    short = await provider.complete({"messages": ASK, "max_tokens": 3}, OPTS)
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3
    assert _text(short)


async def test_stop_sequence_cuts_the_text(provider: LocalProvider) -> None:
    whole = _text(await provider.complete({"messages": ASK, "max_tokens": 24}, OPTS))
    stopped = await provider.complete({"messages": ASK, "max_tokens": 24, "stop": ["Paris"]}, OPTS)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert _text(stopped) == whole[: whole.index("Paris")]
    assert stopped["usage"]["completion_tokens"] < 24


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
    started = asyncio.get_running_loop().time()
    chunks = [c async for c in provider.stream({"messages": ASK, "max_tokens": 16}, OPTS)]
    elapsed = asyncio.get_running_loop().time() - started
    task.cancel()
    whole = await provider.complete({"messages": ASK, "max_tokens": 16}, OPTS)

    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert all(pieces)
    assert len(pieces) >= 3
    assert "".join(pieces) == _text(whole)
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    # generation ran off the event loop: the ticker kept its pace (allowing for a busy machine)
    assert ticks >= elapsed / 0.01 * 0.3


async def test_concurrent_requests_are_batched_and_equal_one_at_a_time(
    provider: LocalProvider, model: LocalChatModel
) -> None:
    prompts = [ASK, *OTHERS]
    alone = [
        _text(await provider.complete({"messages": p, "max_tokens": 12}, OPTS)) for p in prompts
    ]
    before = sum(n for size, n in model.batch_sizes.items() if size > 1)

    async def streamed(messages: list[dict[str, str]]) -> str:
        body = {"messages": messages, "max_tokens": 12}
        chunks = [c async for c in provider.stream(body, OPTS)]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])

    first, second, third = await asyncio.gather(
        provider.complete({"messages": prompts[0], "max_tokens": 12}, OPTS),
        provider.complete({"messages": prompts[1], "max_tokens": 12}, OPTS),
        streamed(prompts[2]),
    )
    assert [_text(first), _text(second), third] == alone
    assert sum(n for size, n in model.batch_sizes.items() if size > 1) > before
    assert model.queue_depth == 0


async def test_a_full_queue_is_refused_before_any_chunk(
    provider: LocalProvider, model: LocalChatModel
) -> None:
    model.max_queue = 1
    try:
        busy = asyncio.create_task(provider.complete({"messages": ASK, "max_tokens": 8}, OPTS))
        await asyncio.sleep(0)  # the task takes its place in the queue
        assert model.queue_depth == 1
        with pytest.raises(RateLimited) as refused:
            await provider.complete({"messages": ASK, "max_tokens": 8}, OPTS)
        assert refused.value.code == "pool_queue_full"
        assert refused.value.retry_after is not None
        assert refused.value.retry_after >= 1
        chunks = provider.stream({"messages": ASK, "max_tokens": 8}, OPTS)
        with pytest.raises(RateLimited):
            await anext(chunks)
        assert _text(await busy)
    finally:
        model.max_queue = 16
    assert model.queue_depth == 0


async def test_a_client_that_leaves_frees_its_place(
    provider: LocalProvider, model: LocalChatModel
) -> None:
    chunks = provider.stream({"messages": ASK, "max_tokens": 200}, OPTS)
    await anext(chunks)  # the role chunk: generation is under way
    await chunks.aclose()  # type: ignore[attr-defined]
    assert model.queue_depth == 0
    # the worker drops the row and serves the next request at once
    answer = await asyncio.wait_for(
        provider.complete({"messages": ASK, "max_tokens": 4}, OPTS), timeout=10
    )
    assert answer["usage"]["completion_tokens"] == 4


async def test_sampling_is_seeded_and_bad_parameters_are_refused(provider: LocalProvider) -> None:
    body = {"messages": ASK, "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    first = _text(await provider.complete(body, OPTS))
    assert first
    assert first == _text(await provider.complete(body, OPTS))
    for bad in ({"max_tokens": 0}, {"temperature": 3}, {"stop": [1]}, {"seed": "x"}):
        with pytest.raises(InvalidRequest) as refused:
            await provider.complete({"messages": ASK, **bad}, OPTS)
        assert refused.value.code != PROVIDER_UNSUPPORTED
    with pytest.raises(InvalidRequest) as unsupported:
        await provider.complete({"messages": ASK, "n": 2}, OPTS)
    assert unsupported.value.code == PROVIDER_UNSUPPORTED


async def test_tool_messages_are_read_as_text(provider: LocalProvider) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    answer = await provider.complete({"messages": messages, "max_tokens": 8}, OPTS)
    assert _text(answer)


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
            messages=SDK_ASK,
            max_tokens=12,
        )
        stream = await client.chat.completions.create(
            model="local",
            messages=SDK_ASK,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert raw.headers["x-deepgate-route"] == "local:smollm2-135m-instruct"
    answer = raw.parse()
    parts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in parts if p]) >= 2
    assert "".join(parts) == answer.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens  # type: ignore[union-attr]
