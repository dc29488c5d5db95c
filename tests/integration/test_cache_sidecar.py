"""Cache write-back: the sidecar keeps whole, successful answers where the plugin will look.

The sidecar runs in-process with a route key and the CacheWrite hook, over our fake providers and
a real Redis; requests carry what the runner would give them (a signed route and sealed facts with
the cache plan), sent by the official OpenAI and Anthropic SDKs. The last test closes the loop:
what the sidecar wrote, the real runner finds and replays.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import redis

from deepgate import response_cache as rc
from deepgate.request_facts import HEADER as FACTS_HEADER
from deepgate.request_facts import Facts, seal
from deepgate.route_signature import HEADER as ROUTE_HEADER
from deepgate.route_signature import sign_route
from plugins.registry import REGISTRY
from plugins.runner import codec
from plugins.runner.server import Runner
from sidecar.answer_hooks import AnswerHooks
from sidecar.app import Sidecar, build_answer_hooks, build_providers
from sidecar.config import load_config
from sidecar.hooks.cache_write import CacheWrite
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeOpenAI
from tests.integration.conftest import call, prepare, run_call

KEY = b"cache-sidecar-route-key"
QUESTION = [{"role": "user", "content": "What is the boiling point of water?"}]


class Stack:
    def __init__(self, sidecar: Sidecar, deepseek: FakeOpenAI, fakes: list[Any]) -> None:
        self.sidecar, self.deepseek, self.fakes = sidecar, deepseek, fakes
        self.oa = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{sidecar.http_port}/v1", api_key="unused", max_retries=0
        )
        self.an = anthropic.AsyncAnthropic(
            base_url=f"http://127.0.0.1:{sidecar.http_port}", api_key="unused", max_retries=0
        )


@pytest.fixture
async def stack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    ds, oa, an = FakeOpenAI("deepseek"), FakeOpenAI("openai"), FakeAnthropic()
    for fake in (ds, oa, an):
        await fake.start()
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-ds")
    monkeypatch.setenv("DEEPSEEK_BASE_URL", ds.url)
    config = load_config()
    sidecar = Sidecar(
        config,
        "gateway",
        http_address=("127.0.0.1", 0),
        grpc_address=None,
        providers=build_providers(config),
        route_key=KEY,
        hooks=AnswerHooks([CacheWrite(None)]),
    )
    await sidecar.start()
    s = Stack(sidecar, ds, [ds, oa, an])
    yield s
    await s.oa.close()
    await s.an.close()
    await sidecar.stop()
    for fake in s.fakes:
        await fake.stop()


def plan(redis_url: str, key: str, ttl: int = 300) -> dict[str, Any]:
    return {"key": key, "ttl": ttl, "scope": "consumer", "redis": redis_url}


def gateway_headers(rid: str, facts: Facts) -> dict[str, str]:
    """What the runner adds to a request on its way to the sidecar."""
    return {
        "x-request-id": rid,
        ROUTE_HEADER: sign_route(KEY, rid, ["deepseek:deepseek-chat"]),
        FACTS_HEADER: seal(KEY, rid, facts),
    }


def miss(redis_url: str, key: str, rid: str, **more: Any) -> dict[str, str]:
    facts: Facts = {"cache": plan(redis_url, key), "cache_status": "miss", **more}  # type: ignore[typeddict-item]
    return gateway_headers(rid, facts)


async def stored(redis_url: str, key: str, wait_s: float = 2.0) -> rc.CacheEntry | None:
    """The entry under ``key``; a stream's write lands just after its last byte, so wait a bit."""
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            raw = client.get(key)
            if raw is not None or asyncio.get_running_loop().time() > deadline:
                return rc.decode_entry(raw)  # type: ignore[arg-type]
            await asyncio.sleep(0.02)
    finally:
        client.close()


def ttl_of(redis_url: str, key: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.ttl(key))  # type: ignore[arg-type]
    finally:
        client.close()


async def test_a_json_answer_is_written_with_its_ttl(stack: Stack, redis_url: str) -> None:
    completion = await stack.oa.chat.completions.create(
        model="deepseek-chat",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_headers=miss(redis_url, "k:json", "rq-1"),
    )
    entry = await stored(redis_url, "k:json", wait_s=0)  # written before the answer returned
    assert entry is not None
    assert entry.target == "deepseek:deepseek-chat"
    assert entry.answer["choices"][0]["message"]["content"] == completion.choices[0].message.content
    assert 290 <= ttl_of(redis_url, "k:json") <= 300


async def test_a_whole_stream_is_written(stack: Stack, redis_url: str) -> None:
    stream = await stack.oa.chat.completions.create(
        model="deepseek-chat",
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
        extra_headers=miss(redis_url, "k:stream", "rq-2"),
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    entry = await stored(redis_url, "k:stream")
    assert entry is not None
    assert text
    assert entry.answer["choices"][0]["message"]["content"] == text
    assert entry.answer["choices"][0]["finish_reason"] == "stop"


async def test_an_anthropic_answer_is_written_canonically(stack: Stack, redis_url: str) -> None:
    message = await stack.an.messages.create(
        model="deepseek-chat",
        max_tokens=50,
        messages=QUESTION,  # type: ignore[arg-type]
        extra_headers=miss(redis_url, "k:anthropic", "rq-3"),
    )
    entry = await stored(redis_url, "k:anthropic", wait_s=0)
    assert entry is not None
    assert entry.answer["object"] == "chat.completion"
    assert entry.answer["choices"][0]["message"]["content"] == message.content[0].text  # type: ignore[union-attr]


async def test_errors_are_never_cached(stack: Stack, redis_url: str) -> None:
    stack.deepseek.behave(status=500)
    with pytest.raises(openai.APIStatusError):
        await stack.oa.chat.completions.create(
            model="deepseek-chat",
            messages=QUESTION,  # type: ignore[arg-type]
            extra_headers=miss(redis_url, "k:error", "rq-4"),
        )
    assert await stored(redis_url, "k:error", wait_s=0.3) is None


async def test_a_partial_stream_is_never_cached(stack: Stack, redis_url: str) -> None:
    stack.deepseek.behave(drop_after_events=2)
    stream = await stack.oa.chat.completions.create(
        model="deepseek-chat",
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
        extra_headers=miss(redis_url, "k:partial", "rq-5"),
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert await stored(redis_url, "k:partial", wait_s=0.3) is None


@pytest.mark.parametrize(
    "facts",
    [
        {"restore": {"<EMAIL_1>": "jane@example.com"}},  # masked personal data: never shared
        {"cache_status": "bypass"},
    ],
)
async def test_masked_personal_data_and_bypass_are_not_written(
    stack: Stack, redis_url: str, facts: dict[str, Any]
) -> None:
    await stack.oa.chat.completions.create(
        model="deepseek-chat",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_headers=miss(redis_url, "k:skip", "rq-6", **facts),
    )
    assert await stored(redis_url, "k:skip", wait_s=0.3) is None


def test_the_sidecar_runs_the_cache_write_hook() -> None:
    hooks = build_answer_hooks(load_config(), None)
    assert any(isinstance(h, CacheWrite) for h in hooks.hooks)


async def test_what_the_sidecar_writes_the_runner_replays(
    stack: Stack, redis_url: str, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPGATE_ROUTE_KEY", KEY.decode())
    runner = Runner(REGISTRY, conf_expire_s=3600)
    sock = str(sock_dir / "r.sock")
    await runner.start(sock)
    try:
        token = await prepare(sock, [("deepgate-cache", {"redis_url": redis_url})])
        body = orjson.dumps({"model": "deepseek-chat", "messages": QUESTION, "temperature": 0})
        req = call(headers=[("x-request-id", "rq-7")])
        first, _ = await run_call(sock, token, body, req, consumer_name="alice", route_id="chat")
        assert isinstance(first.action, codec.Rewrite)
        facts = dict(first.action.headers)[FACTS_HEADER]
        assert facts is not None
        headers = gateway_headers("rq-7", {})
        headers[FACTS_HEADER] = facts  # the runner's own sealed facts, as APISIX forwards them
        completion = await stack.oa.chat.completions.create(
            model="deepseek-chat",
            messages=QUESTION,  # type: ignore[arg-type]
            temperature=0,
            extra_headers=headers,
        )
        req = call(headers=[("x-request-id", "rq-8")])
        second, _ = await run_call(sock, token, body, req, consumer_name="alice", route_id="chat")
        assert isinstance(second.action, codec.Stop)
        assert dict(second.action.headers)[rc.HEADER] == "hit-exact"
        replayed = orjson.loads(second.action.body)
        assert replayed["choices"][0]["message"]["content"] == completion.choices[0].message.content
        assert len(stack.deepseek.received) == 1
    finally:
        await runner.stop(grace_s=0.5)
        await rc.close_clients()
