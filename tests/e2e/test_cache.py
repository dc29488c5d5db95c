"""End to end: deepgate-cache with its shipped config, through the official SDKs.

A stack of its own: a real Redis, the sidecar (gateway role, fake providers), and the APISIX
stand-in serving the shipped routes with the chat routes' post-req chain cut down to the cache
and the router (whose signed routes let the sidecar open the chain's facts and write answers
back), plus a second consumer ``bob`` to show that consumers do not share entries.

Hits are seeded the way the sidecar writes them, under the key the plugin computes for the body
the SDK sends; the round trip (miss, write-back, hit) runs as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
import redis

from deepgate import response_cache as rc
from deepgate.chat import Dialect
from tests.e2e.conftest import KEY, OwnStack, own_stack, shipped_routes

BOB_KEY = "sk-e2e-bob-key-8910"
KEPT = ("deepgate-cache", "deepgate-router")
CACHED = "Water boils at 100 degrees Celsius at sea level."


CacheStack = OwnStack


def seed(
    stack: CacheStack,
    body: dict[str, Any],
    route: str,
    dialect: Dialect = "openai",
    consumer: str = "demo",
    text: str = CACHED,
) -> None:
    """An entry as the sidecar writes it, under the key the plugin computes for ``body``."""
    key = rc.request_key(rc.scope_id("consumer", consumer, route), dialect, body)
    answer = {
        "id": "chatcmpl-seeded",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "deepseek-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 15, "completion_tokens": 11, "total_tokens": 26},
    }
    client = redis.Redis.from_url(stack.redis_url or "")
    try:
        client.set(key, rc.encode_entry(answer, "deepseek:deepseek-chat"), ex=60)
    finally:
        client.close()


def routes_file(sidecar_port: int) -> dict[str, Any]:
    """The shipped routes with the cache (and the router) alone on the chat routes."""
    return shipped_routes(sidecar_port, KEPT, bob=BOB_KEY)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheStack]:
    with own_stack(tmp_path_factory.mktemp("cache"), routes_file) as s:
        yield s


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_a_hit_is_answered_without_a_provider(stack: CacheStack) -> None:
    q = ask("At what temperature does water boil?")
    seed(stack, {"messages": q, "model": "deepseek-chat", "temperature": 0}, "chat-completions")
    calls = stack.provider_calls()
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=q,  # type: ignore[arg-type]
            temperature=0,
        )
    assert raw.headers["x-deepgate-cache"] == "hit-exact"
    completion = raw.parse()
    assert completion.choices[0].message.content == CACHED
    assert completion.usage is not None
    assert completion.usage.total_tokens == 26
    assert stack.provider_calls() == calls


def test_a_hit_is_replayed_as_a_stream_to_a_streaming_client(stack: CacheStack) -> None:
    q = ask("Where does water boil at 100 degrees?")
    seed(stack, {"messages": q, "model": "deepseek-chat"}, "chat-completions")
    calls = stack.provider_calls()
    with stack.openai() as oa:
        with oa.chat.completions.with_streaming_response.create(
            model="deepseek-chat",
            messages=q,  # type: ignore[arg-type]
            stream=True,
        ) as resp:
            assert resp.headers["x-deepgate-cache"] == "hit-exact"
        stream = oa.chat.completions.create(
            model="deepseek-chat",
            messages=q,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CACHED
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 11
    assert stack.provider_calls() == calls


async def test_the_async_client_reads_a_replayed_stream(stack: CacheStack) -> None:
    q = ask("Does water boil faster at altitude?")
    seed(stack, {"messages": q, "model": "deepseek-chat"}, "chat-completions")
    async with openai.AsyncOpenAI(base_url=f"{stack.base}/v1", api_key=KEY, max_retries=0) as oa:
        stream = await oa.chat.completions.create(
            model="deepseek-chat",
            messages=q,  # type: ignore[arg-type]
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == CACHED


def test_anthropic_clients_get_hits_in_their_format(stack: CacheStack) -> None:
    q = ask("Why does water boil?")
    body = {"max_tokens": 64, "messages": q, "model": "deepseek-chat"}
    seed(stack, body, "anthropic-messages", dialect="anthropic")
    calls = stack.provider_calls()
    with stack.anthropic() as an:
        raw = an.messages.with_raw_response.create(
            model="deepseek-chat",
            max_tokens=64,
            messages=q,  # type: ignore[arg-type]
        )
        with an.messages.stream(model="deepseek-chat", max_tokens=64, messages=q) as s:  # type: ignore[arg-type]
            streamed = "".join(s.text_stream)
            final = s.get_final_message()
    assert raw.headers["x-deepgate-cache"] == "hit-exact"
    message = raw.parse()
    assert message.content[0].text == CACHED  # type: ignore[union-attr]
    assert message.usage.output_tokens == 11
    assert streamed == CACHED
    assert final.stop_reason == "end_turn"
    assert stack.provider_calls() == calls


def test_consumers_do_not_share_entries(stack: CacheStack) -> None:
    q = ask("Is this answer only for the demo consumer?")
    seed(stack, {"messages": q, "model": "deepseek-chat"}, "chat-completions")
    with stack.openai(BOB_KEY) as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=q)  # type: ignore[arg-type]
    assert raw.headers["x-deepgate-cache"] == "miss"
    assert raw.parse().choices[0].message.content != CACHED


@pytest.mark.parametrize(
    ("extra", "headers"),
    [
        ({}, {"Cache-Control": "no-cache"}),
        ({"temperature": 1.8}, {}),
    ],
)
def test_bypass_goes_to_the_provider(
    stack: CacheStack, extra: dict[str, Any], headers: dict[str, str]
) -> None:
    q = ask(f"Please answer fresh ({sorted(extra)}).")
    seed(stack, {"messages": q, "model": "deepseek-chat", **extra}, "chat-completions")
    calls = len(stack.fakes.deepseek.received)
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=q,  # type: ignore[arg-type]
            extra_headers=headers,
            **extra,
        )
    assert raw.headers["x-deepgate-cache"] == "bypass"
    assert raw.parse().choices[0].message.content != CACHED
    assert len(stack.fakes.deepseek.received) == calls + 1


def test_a_miss_says_so_on_json_and_stream_answers(stack: CacheStack) -> None:
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=ask("A question nobody asked before, as JSON."),  # type: ignore[arg-type]
        )
        with oa.chat.completions.with_streaming_response.create(
            model="deepseek-chat",
            messages=ask("A question nobody asked before, streamed."),  # type: ignore[arg-type]
            stream=True,
        ) as streamed:
            assert streamed.headers["x-deepgate-cache"] == "miss"
            assert "[DONE]" in streamed.text()
    assert raw.headers["x-deepgate-cache"] == "miss"


# --- the round trip: the sidecar writes what the runner then replays -------------------------


def test_second_identical_request_is_an_exact_hit(stack: CacheStack) -> None:
    q = ask("What is the boiling point of water at sea level?")
    with stack.openai() as oa:
        first = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=q,  # type: ignore[arg-type]
            temperature=0,
        )
        calls = stack.provider_calls()
        second = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=q,  # type: ignore[arg-type]
            temperature=0,
        )
        stream = oa.chat.completions.create(
            model="deepseek-chat",
            messages=q,  # type: ignore[arg-type]
            temperature=0,
            stream=True,
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert first.headers["x-deepgate-cache"] == "miss"
    assert second.headers["x-deepgate-cache"] == "hit-exact"
    content = first.parse().choices[0].message.content
    assert second.parse().choices[0].message.content == content
    assert streamed == content
    assert stack.provider_calls() == calls


def test_errors_are_not_cached_end_to_end(stack: CacheStack) -> None:
    q = ask("Will this failure be remembered?")
    for fake in stack.fakes.all():
        fake.behave(status=500)
    try:
        with stack.openai() as oa, pytest.raises(openai.APIStatusError):
            oa.chat.completions.create(model="deepseek-chat", messages=q)  # type: ignore[arg-type]
    finally:
        stack.fakes.reset()
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=q)  # type: ignore[arg-type]
    assert raw.headers["x-deepgate-cache"] == "miss"
    assert raw.parse().choices[0].message.content


async def test_a_streamed_answer_is_cached_once_whole(stack: CacheStack) -> None:
    q = ask("Stream me an answer worth keeping.")
    with stack.openai() as oa:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in oa.chat.completions.create(
                model="deepseek-chat",
                messages=q,  # type: ignore[arg-type]
                stream=True,
            )
            if c.choices
        )
    await asyncio.sleep(0.3)  # the write lands just after the stream's last byte
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=q)  # type: ignore[arg-type]
    assert raw.headers["x-deepgate-cache"] == "hit-exact"
    assert raw.parse().choices[0].message.content == text
    assert orjson.loads(raw.content)["object"] == "chat.completion"
