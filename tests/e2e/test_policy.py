"""End to end: deepgate-policy with the shipped demo quotas, through the official SDKs.

A stack of its own: a real Redis, the sidecar (gateway role, fake providers), and the APISIX
stand-in serving the shipped routes with the chat routes' post-req chain cut down to
deepgate-policy (its shipped config, plus a second consumer ``intern`` with a narrow policy), so
these tests judge the policy alone, whatever the other plugins do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
import redis

from tests.e2e.conftest import OwnStack, edit_plugin, own_stack, shipped_routes, wait_until

INTERN_KEY = "sk-e2e-intern-key-4567"
HI = [{"role": "user", "content": "What is the capital of France?"}]
KEPT = ("deepgate-policy", "deepgate-router")
INTERN = {
    "models": ["deepseek-chat"],
    "quota": {"requests_per_minute": 50, "tokens_per_minute": 2000},
}


PolicyStack = OwnStack


def tokens_used(stack: PolicyStack, consumer: str) -> int:
    client = redis.Redis.from_url(stack.redis_url or "")
    try:
        keys = client.keys(f"{{dgq}}:c:consumer:{consumer}:tokens:minute:*")
        return sum(int(client.get(k) or 0) for k in keys)
    finally:
        client.close()


def routes_file(sidecar_port: int) -> dict[str, Any]:
    """The shipped routes with the policy (and the router that signs routes) on the chat routes."""
    routes = shipped_routes(sidecar_port, KEPT, intern=INTERN_KEY)
    edit_plugin(routes, "deepgate-policy", lambda p: p["consumers"].update(intern=INTERN))
    return routes


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    with own_stack(tmp_path_factory.mktemp("policy"), routes_file) as s:
        yield s


def test_answers_carry_the_demo_quota_headers_and_settle_real_usage(stack: PolicyStack) -> None:
    with stack.openai() as oa:
        first = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
        second = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
    assert first.parse().choices[0].message.content
    h1, h2 = first.headers, second.headers
    assert h1["x-ratelimit-limit-requests"] == "600"
    assert h1["x-ratelimit-limit-tokens"] == "100000"
    assert (
        int(h2["x-ratelimit-remaining-requests"]) == int(h1["x-ratelimit-remaining-requests"]) - 1
    )
    assert h1["x-ratelimit-reset-requests"].endswith("s")
    assert h1["x-ratelimit-reset-tokens"].endswith("s")


def test_the_sidecar_settles_reservations_with_the_real_usage(stack: PolicyStack) -> None:
    before = tokens_used(stack, "demo")
    with stack.openai() as oa:
        for _ in range(2):
            oa.chat.completions.create(model="deepseek-chat", messages=HI, max_tokens=3000)  # type: ignore[arg-type]
    # The fake provider reports 1100 + 12 tokens per answer: once the sidecar has settled both
    # reservations, that is what the consumer's minute counter gained, not the 3000+ estimates.
    wait_until(lambda: tokens_used(stack, "demo") - before == 2 * 1112, "settlement", 10)


def test_a_reservation_over_what_remains_is_429_with_retry_after(stack: PolicyStack) -> None:
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
        remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
        calls = len(stack.fakes.deepseek.received)
        with pytest.raises(openai.RateLimitError) as info:
            oa.chat.completions.create(
                model="deepseek-chat",
                messages=HI,  # type: ignore[arg-type]
                max_tokens=remaining + 1000,
            )
    err = info.value
    assert err.status_code == 429
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.response.headers["x-ratelimit-limit-tokens"] == "100000"
    body = err.response.json()["error"]
    assert body["code"] == "rate_limit_exceeded"
    assert "consumers.demo.quota.tokens_per_minute" in body["message"]
    assert len(stack.fakes.deepseek.received) == calls  # no provider was called


def test_a_denied_alias_is_403_naming_the_rule(stack: PolicyStack) -> None:
    with stack.openai(INTERN_KEY) as oa, pytest.raises(openai.PermissionDeniedError) as info:
        oa.chat.completions.create(model="gpt-5", messages=HI)  # type: ignore[arg-type]
    body = info.value.response.json()["error"]
    assert body["code"] == "permission_denied"
    assert "consumers.intern.models" in body["message"]


def test_anthropic_sdk_streams_with_headers_and_hits_the_token_limit(stack: PolicyStack) -> None:
    an = anthropic.Anthropic(base_url=stack.base, api_key=INTERN_KEY, max_retries=0, timeout=30)
    with an.messages.with_streaming_response.create(
        model="deepseek-chat",
        max_tokens=100,
        messages=HI,  # type: ignore[arg-type]
        stream=True,
    ) as resp:
        text = resp.read().decode()
        assert resp.headers["x-ratelimit-limit-tokens"] == "2000"
    assert "message_stop" in text
    with pytest.raises(anthropic.RateLimitError) as info:
        an.messages.create(model="deepseek-chat", max_tokens=5000, messages=HI)  # type: ignore[arg-type]
    assert info.value.response.json()["error"]["type"] == "rate_limit_error"
    assert info.value.response.headers["retry-after"]
    an.close()
