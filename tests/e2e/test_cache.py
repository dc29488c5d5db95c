"""End to end: deepgate-cache with its shipped config, through the official SDKs.

A stack of its own: a real Redis, the sidecar (gateway role, fake providers), and the APISIX
stand-in serving the shipped routes with the chat routes' post-req chain cut down to the cache
(and the router, once it ships: the sidecar then opens the chain's facts and writes answers
back), plus a second consumer ``bob`` to show that consumers do not share entries.

Hits are seeded the way the sidecar writes them, under the key the plugin computes for the body
the SDK sends; with the router shipped, the round trip (miss, write-back, hit) runs as well.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import redis
import yaml

from deepgate import response_cache as rc
from deepgate.chat import Dialect
from deepgate.embedded_redis import EmbeddedRedis
from tests.e2e.conftest import KEY, Fakes, answers, free_port

ROOT = Path(__file__).resolve().parents[2]
BOB_KEY = "sk-e2e-bob-key-8910"
KEPT = ("deepgate-cache", "deepgate-router")
CACHED = "Water boils at 100 degrees Celsius at sea level."


def shipped_router() -> bool:
    """Whether the shipped chat route has the router (which signs routes for the sidecar)."""
    return "deepgate-router" in (ROOT / "apisix-conf" / "apisix.yaml").read_text()


@dataclass
class CacheStack:
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

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.base, api_key=KEY, max_retries=0, timeout=30)

    def seed(
        self,
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
        client = redis.Redis.from_url(self.redis_url)
        try:
            client.set(key, rc.encode_entry(answer, "deepseek:deepseek-chat"), ex=60)
        finally:
            client.close()

    def provider_calls(self) -> int:
        return sum(len(f.received) for f in self.fakes.all())


def routes_file(path: Path, sidecar_port: int) -> None:
    """The shipped routes, pointed at this stack's sidecar, with the cache alone (and router)."""
    routes = yaml.safe_load((ROOT / "apisix-conf" / "apisix.yaml").read_text())
    routes["upstreams"][0]["nodes"] = {f"127.0.0.1:{sidecar_port}": 1}
    routes["consumers"].append({"username": "bob", "plugins": {"key-auth": {"key": BOB_KEY}}})
    for route in routes["routes"]:
        post = route["plugins"].get("ext-plugin-post-req")
        if post is not None:
            post["conf"] = [c for c in post["conf"] if c["name"] in KEPT]
    path.write_text(yaml.safe_dump(routes, sort_keys=False) + "#END\n")


def wait_until(ok: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen in {timeout_s}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheStack]:
    tmp = tmp_path_factory.mktemp("cache")
    fakes = Fakes()
    server = EmbeddedRedis().start()
    sidecar_port, port = free_port(), free_port()
    routes_file(tmp / "apisix.yaml", sidecar_port)
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DEEPGATE_DEMO_KEY=KEY,
        DEEPGATE_REDIS_URL=server.url,
        DEEPSEEK_API_KEY="sk-fake-deepseek",
        DEEPSEEK_BASE_URL=fakes.deepseek.url,
        OPENAI_API_KEY="sk-fake-openai",
        OPENAI_BASE_URL=f"{fakes.openai.url}/v1",
        ANTHROPIC_API_KEY="sk-fake-anthropic",
        ANTHROPIC_BASE_URL=fakes.anthropic.url,
    )
    if shipped_router():
        env["DEEPGATE_ROUTE_KEY"] = "e2e-cache-route-key"
    else:
        env.pop("DEEPGATE_ROUTE_KEY", None)
    log = tmp / "stack.log"
    procs: list[subprocess.Popen[bytes]] = []
    s = CacheStack(port, server.url, fakes, procs, log)
    with log.open("wb") as out:
        sidecar = [sys.executable, "-m", "sidecar", "--role", "gateway"]
        sidecar += ["--http", f"127.0.0.1:{sidecar_port}", "--grpc", f"127.0.0.1:{free_port()}"]
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


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_a_hit_is_answered_without_a_provider(stack: CacheStack) -> None:
    q = ask("At what temperature does water boil?")
    stack.seed({"messages": q, "model": "deepseek-chat", "temperature": 0}, "chat-completions")
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
    stack.seed({"messages": q, "model": "deepseek-chat"}, "chat-completions")
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
    stack.seed({"messages": q, "model": "deepseek-chat"}, "chat-completions")
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
    stack.seed(body, "anthropic-messages", dialect="anthropic")
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
    stack.seed({"messages": q, "model": "deepseek-chat"}, "chat-completions")
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
    stack.seed({"messages": q, "model": "deepseek-chat", **extra}, "chat-completions")
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

round_trip = pytest.mark.skipif(
    not shipped_router(), reason="write-back needs the router's signed routes and sealed facts"
)


@round_trip
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


@round_trip
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


@round_trip
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
