"""End to end: deepgate-policy with the shipped demo quotas, through the official SDKs.

A stack of its own: a real Redis, the sidecar (gateway role, fake providers), and the APISIX
stand-in serving the shipped routes with the chat routes' post-req chain cut down to
deepgate-policy (its shipped config, plus a second consumer ``intern`` with a narrow policy), so
these tests judge the policy alone, whatever the other plugins do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import redis
import yaml

from deepgate.embedded_redis import EmbeddedRedis
from tests.e2e.conftest import KEY, Fakes, answers, free_port

ROOT = Path(__file__).resolve().parents[2]
INTERN_KEY = "sk-e2e-intern-key-4567"
HI = [{"role": "user", "content": "What is the capital of France?"}]
KEPT = ("deepgate-policy", "deepgate-router")
INTERN = {
    "models": ["deepseek-chat"],
    "quota": {"requests_per_minute": 50, "tokens_per_minute": 2000},
}


@dataclass
class PolicyStack:
    port: int
    redis_url: str
    fakes: Fakes
    procs: list[subprocess.Popen[bytes]]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=30)

    def tokens_used(self, consumer: str) -> int:
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = client.keys(f"{{dgq}}:c:consumer:{consumer}:tokens:minute:*")
            return sum(int(client.get(k) or 0) for k in keys)
        finally:
            client.close()


def routes_file(path: Path, sidecar_port: int) -> None:
    """The shipped routes, pointed at this stack's sidecar, with policy alone on the chat routes."""
    routes = yaml.safe_load((ROOT / "apisix-conf" / "apisix.yaml").read_text())
    routes["upstreams"][0]["nodes"] = {f"127.0.0.1:{sidecar_port}": 1}
    routes["consumers"].append({"username": "intern", "plugins": {"key-auth": {"key": INTERN_KEY}}})
    for route in routes["routes"]:
        post = route["plugins"].get("ext-plugin-post-req")
        if post is None:
            continue
        kept = [c for c in post["conf"] if c["name"] in KEPT]
        for conf in kept:
            if conf["name"] == "deepgate-policy":
                value = orjson.loads(conf["value"])
                value["consumers"]["intern"] = INTERN
                conf["value"] = orjson.dumps(value).decode()
        post["conf"] = kept
    path.write_text(yaml.safe_dump(routes, sort_keys=False) + "#END\n")


def shipped_router() -> bool:
    """Whether the shipped chat route has the router (which signs routes for the sidecar)."""
    return "deepgate-router" in (ROOT / "apisix-conf" / "apisix.yaml").read_text()


def wait_until(ok: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    tmp = tmp_path_factory.mktemp("policy")
    fakes = Fakes()
    server = EmbeddedRedis().start()
    sidecar_port, grpc_port, port = free_port(), free_port(), free_port()
    routes_file(tmp / "apisix.yaml", sidecar_port)
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DEEPGATE_DEMO_KEY=KEY,
        DEEPGATE_REDIS_URL=server.url,
        DEEPGATE_SIDECAR_GRPC=f"127.0.0.1:{grpc_port}",
        DEEPSEEK_API_KEY="sk-fake-deepseek",
        DEEPSEEK_BASE_URL=fakes.deepseek.url,
        OPENAI_API_KEY="sk-fake-openai",
        OPENAI_BASE_URL=f"{fakes.openai.url}/v1",
        ANTHROPIC_API_KEY="sk-fake-anthropic",
        ANTHROPIC_BASE_URL=fakes.anthropic.url,
    )
    if shipped_router():
        # The sidecar then takes only routes the router signed, and opens the chain's facts
        # (the policy's reservation) with the same key: settlement needs both.
        env["DEEPGATE_ROUTE_KEY"] = "e2e-policy-route-key"
    else:
        env.pop("DEEPGATE_ROUTE_KEY", None)
    log = tmp / "stack.log"
    procs: list[subprocess.Popen[bytes]] = []
    s = PolicyStack(port, server.url, fakes, procs, log)
    with log.open("wb") as out:
        sidecar = [sys.executable, "-m", "sidecar", "--role", "gateway"]
        sidecar += ["--http", f"127.0.0.1:{sidecar_port}", "--grpc", f"127.0.0.1:{grpc_port}"]
        procs.append(subprocess.Popen(sidecar, cwd=ROOT, env=env, stdout=out, stderr=out))
        gateway = [sys.executable, "-m", "devgateway", "--config", "apisix-conf/config.yaml"]
        gateway += ["--routes", str(tmp / "apisix.yaml"), "--listen", f"127.0.0.1:{port}"]
        procs.append(subprocess.Popen(gateway, cwd=ROOT, env=env, stdout=out, stderr=out))
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{sidecar_port}/healthz"), "the sidecar")
        wait_until(lambda: answers(f"{s.base}/v1/models"), "the gateway")
        yield s
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        server.stop()
        fakes.close()


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


@pytest.mark.skipif(not shipped_router(), reason="settlement needs the router's signed routes")
def test_the_sidecar_settles_reservations_with_the_real_usage(stack: PolicyStack) -> None:
    before = stack.tokens_used("demo")
    with stack.openai() as oa:
        for _ in range(2):
            oa.chat.completions.create(model="deepseek-chat", messages=HI, max_tokens=3000)  # type: ignore[arg-type]
    # The fake provider reports 1100 + 12 tokens per answer: once the sidecar has settled both
    # reservations, that is what the consumer's minute counter gained, not the 3000+ estimates.
    wait_until(lambda: stack.tokens_used("demo") - before == 2 * 1112, "settlement", 10)


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
