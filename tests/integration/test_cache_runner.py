"""deepgate-cache as APISIX meets it: the real runner and plugin, a real Redis, real sockets.

Entries are written here as the sidecar writes them (``encode_entry`` under the plugin's key);
the write-back itself is tested in test_cache_sidecar.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from deepgate import response_cache as rc
from deepgate.request_facts import HEADER as FACTS_HEADER
from deepgate.request_facts import unseal
from devgateway.driver import RunnerError
from plugins.registry import REGISTRY
from plugins.runner import codec
from plugins.runner.server import Runner
from tests.integration.conftest import call, prepare, run_call

ROUTE_KEY = "cache-test-route-key"
QUESTION = "What is the boiling point of water at sea level?"
ANSWER = {
    "id": "chatcmpl-abc",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "deepseek-chat",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "100 degrees Celsius."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19},
}


@pytest.fixture
async def runner(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setenv("DEEPGATE_ROUTE_KEY", ROUTE_KEY)
    r = Runner(REGISTRY, conf_expire_s=3600)
    path = str(sock_dir / "cache.sock")
    await r.start(path)
    yield path
    await r.stop(grace_s=0.5)
    await rc.close_clients()


def chat(text: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": text}], **extra}


def anthropic_chat(text: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"max_tokens": 100, **chat(text, **extra)}


class Route:
    """One prepared cache conf and a way to call it as a given consumer."""

    def __init__(self, sock: str, token: int, route: str = "chat-completions") -> None:
        self.sock, self.token, self.route = sock, token, route

    async def call(
        self,
        body: dict[str, Any],
        consumer: str | None = "alice",
        path: str = "/v1/chat/completions",
        headers: list[tuple[str, str | None]] | None = None,
    ) -> codec.Stop | codec.Rewrite | None:
        req = call(path=path, headers=[("x-request-id", "req-1"), *(headers or [])])
        variables = {"route_id": self.route}
        if consumer is not None:
            variables["consumer_name"] = consumer
        resp, apisix = await run_call(self.sock, self.token, orjson.dumps(body), req, **variables)
        assert apisix.asked.count("body") == 1
        return resp.action


async def route(sock: str, redis_url: str, **conf: Any) -> Route:
    token = await prepare(sock, [("deepgate-cache", {"redis_url": redis_url, **conf})])
    return Route(sock, token)


def status_of(action: codec.Stop | codec.Rewrite | None) -> str | None:
    headers = action.headers if isinstance(action, codec.Stop) else action.resp_headers  # type: ignore[union-attr]
    return dict(headers).get(rc.HEADER)


def plan_of(action: codec.Stop | codec.Rewrite | None) -> dict[str, Any]:
    assert isinstance(action, codec.Rewrite), action
    sealed = dict(action.headers)[FACTS_HEADER]
    facts = unseal(ROUTE_KEY.encode(), "req-1", sealed)
    assert facts["cache_status"] == "miss"
    return dict(facts["cache"])


def store(redis_url: str, key: str, answer: dict[str, Any] = ANSWER, ttl: int = 60) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set(key, rc.encode_entry(answer, "deepseek:deepseek-chat"), ex=ttl)
    client.close()


def sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


async def test_miss_hands_the_write_plan_to_the_sidecar(runner: str, redis_url: str) -> None:
    r = await route(runner, redis_url, ttl_s=120)
    action = await r.call(chat())
    assert status_of(action) == "miss"
    plan = plan_of(action)
    assert plan["ttl"] == 120
    assert plan["scope"] == "consumer"
    assert plan["redis"] == redis_url
    assert plan["key"].startswith(rc.KEY_PREFIX)
    assert "semantic" not in plan


async def test_exact_hit_is_answered_by_the_runner_as_json(runner: str, redis_url: str) -> None:
    r = await route(runner, redis_url)
    key = plan_of(await r.call(chat(temperature=0)))["key"]
    store(redis_url, key)
    hit = await r.call(chat(temperature=0.0))  # the same request, spelled differently
    assert isinstance(hit, codec.Stop)
    headers = dict(hit.headers)
    assert (hit.status, headers[rc.HEADER]) == (200, "hit-exact")
    assert headers["content-type"] == "application/json"
    assert orjson.loads(hit.body) == ANSWER


async def test_exact_hit_replays_as_openai_sse(runner: str, redis_url: str) -> None:
    r = await route(runner, redis_url)
    store(redis_url, plan_of(await r.call(chat()))["key"])
    hit = await r.call(chat(stream=True))
    assert isinstance(hit, codec.Stop)
    assert dict(hit.headers)["content-type"] == "text/event-stream"
    events = sse_events(hit.body)
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "100 degrees Celsius."
    assert all("usage" not in c for c in chunks)  # not asked for
    with_usage = await r.call(chat(stream=True, stream_options={"include_usage": True}))
    assert isinstance(with_usage, codec.Stop)
    last = orjson.loads(sse_events(with_usage.body)[-2].removeprefix(b"data: "))
    assert last["usage"] == ANSWER["usage"]


async def test_anthropic_route_replays_in_its_own_dialect(runner: str, redis_url: str) -> None:
    r = await route(runner, redis_url)
    path = "/v1/messages"
    store(redis_url, plan_of(await r.call(anthropic_chat(), path=path))["key"])
    hit = await r.call(anthropic_chat(), path=path)
    assert isinstance(hit, codec.Stop)
    message = orjson.loads(hit.body)
    assert message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": "100 degrees Celsius."}]
    assert message["stop_reason"] == "end_turn"
    streamed = await r.call(anthropic_chat(stream=True), path=path)
    assert isinstance(streamed, codec.Stop)
    kinds = [e.split(b"\n")[0] for e in sse_events(streamed.body)]
    assert kinds[0] == b"event: message_start"
    assert kinds[-1] == b"event: message_stop"
    assert b"100 degrees Celsius." in streamed.body
    # an OpenAI request with the same text is another entry: other dialect, other shape
    assert status_of(await r.call(chat())) == "miss"


async def test_consumer_scope_keeps_consumers_apart(runner: str, redis_url: str) -> None:
    r = await route(runner, redis_url)
    store(redis_url, plan_of(await r.call(chat(), consumer="alice"))["key"])
    assert status_of(await r.call(chat(), consumer="alice")) == "hit-exact"
    assert status_of(await r.call(chat(), consumer="bob")) == "miss"


async def test_route_scope_is_shared_by_consumers(runner: str, redis_url: str) -> None:
    r = await route(runner, redis_url, scope="route")
    store(redis_url, plan_of(await r.call(chat(), consumer="alice"))["key"])
    assert status_of(await r.call(chat(), consumer="bob")) == "hit-exact"
    other_route = Route(r.sock, r.token, route="another-route")
    assert status_of(await other_route.call(chat(), consumer="bob")) == "miss"


async def test_entries_expire_with_their_ttl(runner: str, redis_url: str) -> None:
    r = await route(runner, redis_url)
    store(redis_url, plan_of(await r.call(chat()))["key"], ttl=1)
    assert status_of(await r.call(chat())) == "hit-exact"
    await asyncio.sleep(1.1)
    assert status_of(await r.call(chat())) == "miss"


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (chat(), [("cache-control", "no-cache")]),
        (chat(), [("Cache-Control", "max-age=0, no-store")]),
        (chat(temperature=1.5), []),
        (chat(n=2), []),
    ],
)
async def test_bypass_neither_reads_nor_plans_a_write(
    runner: str, redis_url: str, body: dict[str, Any], headers: list[tuple[str, str | None]]
) -> None:
    r = await route(runner, redis_url)
    plain = {k: v for k, v in body.items() if k not in ("temperature", "n")}
    store(redis_url, plan_of(await r.call(plain))["key"])
    # even with an entry for the same messages, a bypass goes to the provider
    action = await r.call(body, headers=headers)
    assert isinstance(action, codec.Rewrite)
    assert status_of(action) == "bypass"
    facts = unseal(ROUTE_KEY.encode(), "req-1", dict(action.headers)[FACTS_HEADER])
    assert facts["cache_status"] == "bypass"
    assert "cache" not in facts


async def test_max_temperature_and_tools_are_configurable(runner: str, redis_url: str) -> None:
    r = await route(runner, redis_url, max_temperature=0.2, tools="bypass")
    assert status_of(await r.call(chat(temperature=0.2))) == "miss"
    assert status_of(await r.call(chat(temperature=0.3))) == "bypass"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert status_of(await r.call(chat(tools=tools))) == "bypass"


async def test_unreachable_redis_fails_open_by_default(runner: str, redis_url: str) -> None:
    dead = "redis://127.0.0.1:1/0"
    r = await route(runner, dead)
    action = await r.call(chat())
    assert isinstance(action, codec.Rewrite)
    assert status_of(action) == "bypass"
    closed = await route(runner, dead, on_error="closed")
    stop = await closed.call(chat())
    assert isinstance(stop, codec.Stop)
    err = orjson.loads(stop.body)["error"]
    assert (stop.status, err["code"]) == (503, "cache_unavailable")
    assert "redis" in err["message"].lower()


async def test_unreadable_entry_is_a_miss(runner: str, redis_url: str) -> None:
    r = await route(runner, redis_url)
    key = plan_of(await r.call(chat()))["key"]
    client = redis.Redis.from_url(redis_url)
    client.set(key, b"{not an entry")
    client.close()
    assert status_of(await r.call(chat())) == "miss"


@pytest.mark.parametrize(
    "conf",
    [
        {"ttl_s": 0},
        {"scope": "everyone"},
        {"redis_url": "localhost:6379"},
        {"semantic": {"threshold": 1.5}},
        {"semantic": {"store": "mysql://x"}},
        {"unknown": 1},
    ],
)
async def test_bad_config_is_refused_at_prepare(runner: str, conf: dict[str, Any]) -> None:
    with pytest.raises(RunnerError, match="BAD_REQUEST"):
        await prepare(runner, [("deepgate-cache", conf)])


async def test_redis_url_may_be_a_file_reference(
    runner: str, redis_url: str, tmp_path: Path
) -> None:
    secret = tmp_path / "redis-url"
    secret.write_text(redis_url + "\n")
    r = await route(runner, f"$file://{secret}")
    plan = plan_of(await r.call(chat()))
    assert plan["redis"] == f"$file://{secret}"  # the reference travels, never the URL
    store(redis_url, plan["key"])
    assert status_of(await r.call(chat())) == "hit-exact"
