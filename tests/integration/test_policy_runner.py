"""deepgate-policy as APISIX meets it: prepared and called over the runner's socket, real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from deepgate.embedded_redis import EmbeddedRedis
from deepgate.request_facts import HEADER as FACTS_HEADER
from deepgate.request_facts import unseal
from devgateway.driver import RunnerConnection, RunnerError
from plugins import policy, prompt_filter
from plugins.base import PluginSpec
from plugins.registry import build_registry
from plugins.runner import codec
from plugins.runner.server import Runner
from tests.integration.conftest import StopConfig, call, chat_body, stop_json, stop_now

ROUTE_KEY = "policy-test-route-key"
REGISTRY = build_registry(
    [policy.SPEC, prompt_filter.SPEC, PluginSpec("test-stop", StopConfig, on_request=stop_now)]
)


@pytest.fixture
async def runner(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setenv("DEEPGATE_ROUTE_KEY", ROUTE_KEY)
    r = Runner(REGISTRY, conf_expire_s=3600)
    path = str(sock_dir / "policy.sock")
    await r.start(path)
    yield path
    await r.stop(grace_s=0.5)
    await policy.close_stores()


def conf(redis_url: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "default_max_tokens": 100,
        "consumers": {
            "demo": {
                "groups": ["trial"],
                "labels": {"team": "search"},
                "log_opt_out": True,
                "quota": {"requests_per_minute": 50, "tokens_per_minute": 1000},
            },
            "intern": {"models": ["local", "deepseek-*"], "regions": ["local"]},
        },
        "groups": {"trial": {"models": ["deepseek-chat", "gpt-5-mini"], "personal_data": "local"}},
    }
    base.update(extra)
    return base


async def send(
    sock: str,
    chain: list[tuple[str, Any]],
    body: bytes,
    consumer: str | None = "demo",
    path: str = "/v1/chat/completions",
) -> codec.HTTPReqCallResp:
    conn = await RunnerConnection.open(sock)
    try:
        token = await conn.prepare([(n, orjson.dumps(v).decode()) for n, v in chain])
        variables = {"route_id": "chat-completions"}
        if consumer is not None:
            variables["consumer_name"] = consumer

        async def apisix(info: codec.ExtraInfo) -> bytes | None:
            if isinstance(info, codec.Var):
                value = variables.get(info.name)
                return None if value is None else value.encode()
            return body

        req = call(path=path, headers=[("x-request-id", "rid-1")])
        req.conf_token = token
        return await conn.req_call(req, apisix)
    finally:
        await conn.close()


def counters(redis_url: str, kind: str) -> dict[str, int]:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = client.keys(f"{{dgq}}:c:*:{kind}:*")
        return {k.decode(): int(client.get(k) or 0) for k in keys}
    finally:
        client.close()


async def test_answer_carries_rate_headers_and_sealed_facts(runner: str, redis_url: str) -> None:
    resp = await send(runner, [("deepgate-policy", conf(redis_url))], chat_body("Hello there"))
    assert isinstance(resp.action, codec.Rewrite)
    headers = dict(resp.action.resp_headers)
    assert headers["x-ratelimit-limit-requests"] == "50"
    assert headers["x-ratelimit-remaining-requests"] == "49"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    used = 1000 - int(headers["x-ratelimit-remaining-tokens"] or 0)
    assert 100 < used < 120  # 100 completion tokens reserved + the prompt's
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    facts = unseal(ROUTE_KEY.encode(), "rid-1", dict(resp.action.headers)[FACTS_HEADER])
    assert facts["consumer"] == "demo"
    assert facts["groups"] == ["trial"]
    assert facts["labels"] == {"team": "search"}
    assert facts["route"] == "chat-completions"
    assert facts["alias"] == "deepseek-chat"
    assert facts["log_opt_out"] is True
    assert facts["personal_data_rule"] == "local"
    assert facts["prompt_tokens"] == used - 100
    assert facts["reservation"]["store"] == "redis"
    assert facts["reservation"]["tokens"] == used
    assert sum(counters(redis_url, "tokens").values()) == used


async def test_a_reservation_over_what_remains_is_429_before_any_call(
    runner: str, redis_url: str
) -> None:
    chain = [("deepgate-policy", conf(redis_url))]
    ok = await send(runner, chain, chat_body("hi", max_tokens=600))
    assert isinstance(ok.action, codec.Rewrite)
    status, err, headers = stop_json(await send(runner, chain, chat_body("hi", max_tokens=600)))
    assert status == 429
    assert err["error"]["type"] == "rate_limit_error"
    assert err["error"]["code"] == "rate_limit_exceeded"
    assert "consumers.demo.quota.tokens_per_minute" in err["error"]["message"]
    assert 1 <= int(headers["retry-after"] or 0) <= 60
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(headers["x-ratelimit-remaining-tokens"] or 0) < 600
    assert headers["x-ratelimit-remaining-requests"] == "49"  # the refused one added nothing


async def test_request_limit_and_anthropic_shape(runner: str, redis_url: str) -> None:
    c = conf(redis_url)
    c["consumers"]["demo"]["quota"] = {"requests_per_minute": 2}
    chain = [("deepgate-policy", c)]
    body = orjson.dumps(
        {"model": "deepseek-chat", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    )
    for _ in range(2):
        assert (await send(runner, chain, body, path="/v1/messages")).action is not None
    status, err, headers = stop_json(await send(runner, chain, body, path="/v1/messages"))
    assert status == 429
    assert err["type"] == "error"
    assert err["error"]["type"] == "rate_limit_error"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["retry-after"]


async def test_denied_model_is_403_naming_the_rule(runner: str, redis_url: str) -> None:
    chain = [("deepgate-policy", conf(redis_url))]
    status, err, _ = stop_json(await send(runner, chain, chat_body(model="gpt-5")))
    assert status == 403
    assert err["error"]["type"] == "permission_error"
    assert err["error"]["code"] == "permission_denied"
    assert err["error"]["param"] == "model"
    assert "groups.trial.models" in err["error"]["message"]
    assert counters(redis_url, "tokens") == {}  # nothing reserved for a denied request


async def test_residency_excludes_every_target_of_a_known_chain(
    runner: str, redis_url: str
) -> None:
    c = conf(redis_url, aliases={"deepseek-chat": ["deepseek:deepseek-chat", "openai:gpt-5"]})
    chain = [("deepgate-policy", c)]
    status, err, _ = stop_json(await send(runner, chain, chat_body(), consumer="intern"))
    assert status == 403
    assert "consumers.intern.regions" in err["error"]["message"]
    resp = await send(runner, chain, chat_body(model="local"), consumer="intern")
    assert isinstance(resp.action, codec.Rewrite)
    facts = unseal(ROUTE_KEY.encode(), "rid-1", dict(resp.action.headers)[FACTS_HEADER])
    assert facts["allowed_regions"] == ["local"]
    assert facts["log_opt_out"] is False


async def test_unknown_consumer_and_anonymous(runner: str, redis_url: str) -> None:
    chain = [("deepgate-policy", conf(redis_url))]
    status, err, _ = stop_json(await send(runner, chain, chat_body(), consumer="stranger"))
    assert status == 403
    assert "no policy" in err["error"]["message"]
    status, err, _ = stop_json(await send(runner, chain, chat_body(), consumer=None))
    assert status == 401
    default = conf(redis_url, default={"quota": {"requests_per_minute": 1}})
    chain = [("deepgate-policy", default)]
    assert (await send(runner, chain, chat_body(), consumer="stranger")).action is not None
    status, _, _ = stop_json(await send(runner, chain, chat_body(), consumer="stranger"))
    assert status == 429  # the default quota is per consumer...
    assert (await send(runner, chain, chat_body(), consumer="other")).action is not None


async def test_a_later_stop_releases_the_tokens(runner: str, redis_url: str) -> None:
    chain = [("deepgate-policy", conf(redis_url)), ("test-stop", {"text": "cached answer"})]
    resp = await send(runner, chain, chat_body(max_tokens=500))
    assert isinstance(resp.action, codec.Stop)
    assert resp.action.body == b"cached answer"
    headers = dict(resp.action.headers)
    assert headers["x-ratelimit-limit-tokens"] == "1000"  # rate headers on stops too
    assert sum(counters(redis_url, "tokens").values()) == 0
    assert sum(counters(redis_url, "requests").values()) == 1  # the request still counts


async def test_redis_down_fails_closed_or_open(runner: str) -> None:
    server = EmbeddedRedis().start()
    url = server.url
    closed = [("deepgate-policy", conf(url))]
    opened = [("deepgate-policy", conf(url, store_unreachable="open"))]
    assert isinstance((await send(runner, closed, chat_body())).action, codec.Rewrite)
    server.stop()
    status, err, headers = stop_json(await send(runner, closed, chat_body()))
    assert status == 503
    assert err["error"]["code"] == "quota_store_unavailable"
    assert headers["retry-after"] == "1"
    resp = await send(runner, opened, chat_body())
    assert isinstance(resp.action, codec.Rewrite)  # through, uncounted
    assert not any(k.startswith("x-ratelimit") for k, _ in resp.action.resp_headers)


async def test_memory_store_counts_in_process(runner: str) -> None:
    c = conf("redis://unused.invalid", store="memory")
    c["consumers"]["demo"]["quota"] = {"requests_per_minute": 1}
    chain = [("deepgate-policy", c)]
    assert isinstance((await send(runner, chain, chat_body())).action, codec.Rewrite)
    status, _, _ = stop_json(await send(runner, chain, chat_body()))
    assert status == 429


async def test_bad_config_is_a_prepare_error_naming_the_field(runner: str) -> None:
    bad = {"consumers": {"demo": {"groups": ["nope"]}}}
    conn = await RunnerConnection.open(runner)
    try:
        with pytest.raises(RunnerError):
            await conn.prepare([("deepgate-policy", orjson.dumps(bad).decode())])
    finally:
        await conn.close()


async def test_template_requests_are_judged_before_the_prompt_filter_renders_them(
    runner: str, redis_url: str
) -> None:
    template = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Sum {{t}}"}]}
    chain = [
        ("deepgate-policy", conf(redis_url)),
        ("deepgate-prompt-filter", {"templates": [{"name": "sum", "template": template}]}),
    ]
    body = orjson.dumps({"template_name": "sum", "model": "deepseek-chat", "t": "the news"})
    resp = await send(runner, chain, body)
    assert isinstance(resp.action, codec.Rewrite)
    assert orjson.loads(resp.action.body)["messages"][0]["content"] == "Sum the news"
    assert "x-ratelimit-limit-tokens" in dict(resp.action.resp_headers)
    denied = orjson.dumps({"template_name": "sum", "model": "gpt-5", "t": "x"})
    status, _, _ = stop_json(await send(runner, chain, denied))
    assert status == 403
    status, err, _ = stop_json(await send(runner, chain, orjson.dumps({"model": "deepseek-chat"})))
    assert status == 400
    assert err["error"]["param"] == "messages"


async def test_a_denied_route_reserves_nothing(runner: str, redis_url: str) -> None:
    c = conf(redis_url)
    c["consumers"]["demo"]["routes"] = ["anthropic-messages"]
    status, err, _ = stop_json(await send(runner, [("deepgate-policy", c)], chat_body()))
    assert status == 403
    assert "consumers.demo.routes" in err["error"]["message"]
    assert counters(redis_url, "tokens") == {}  # refused before the store was asked


async def test_an_unset_redis_reference_is_an_unreachable_store(
    runner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEEPGATE_POLICY_TEST_REDIS", raising=False)
    ref = "$env://DEEPGATE_POLICY_TEST_REDIS"
    status, err, _ = stop_json(await send(runner, [("deepgate-policy", conf(ref))], chat_body()))
    assert status == 503
    assert err["error"]["code"] == "quota_store_unavailable"
    opened = [("deepgate-policy", conf(ref, store_unreachable="open"))]
    assert isinstance((await send(runner, opened, chat_body())).action, codec.Rewrite)
