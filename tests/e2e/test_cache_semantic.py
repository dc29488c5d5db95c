"""End to end: the semantic cache layer through the official SDKs.

A stack of its own: a real Redis, the sidecar in role ``all`` (fake providers, and the pool's real
embedding model behind gRPC ``Embed`` for the runner and ``inference.embed`` for the write-back),
sqlite-vec as the vector store, and the APISIX stand-in serving the shipped routes with the
cache's semantic layer switched on. A question asked again in other words is answered from the
cache, as JSON or as a replayed stream, without a provider call.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import orjson
import pytest
import yaml

from deepgate.vectorstore import VectorStoreError, open_store
from tests.e2e.conftest import KEY, Fakes, answers, free_port
from tests.e2e.test_cache import BOB_KEY, shipped_router, wait_until

ROOT = Path(__file__).resolve().parents[2]
KEPT = ("deepgate-cache", "deepgate-router")

pytestmark = pytest.mark.skipif(
    not shipped_router(), reason="write-back needs the router's signed routes and sealed facts"
)


@dataclass
class SemanticStack:
    port: int
    fakes: Fakes
    store: str

    def indexed(self) -> int:
        """How many questions the sidecar has indexed so far."""

        async def count() -> int:
            store = open_store(self.store)
            try:
                return await store.count("deepgate-cache")
            except VectorStoreError:
                return 0  # the collection is created with the first entry
            finally:
                await store.close()

        return asyncio.run(count())

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60
        )

    def provider_calls(self) -> int:
        return sum(len(f.received) for f in self.fakes.all())


def routes_file(path: Path, sidecar_port: int, store: str) -> None:
    """The shipped routes with the cache (semantic on) and the router alone on the chat routes."""
    routes = yaml.safe_load((ROOT / "apisix-conf" / "apisix.yaml").read_text())
    routes["upstreams"][0]["nodes"] = {f"127.0.0.1:{sidecar_port}": 1}
    routes["consumers"].append({"username": "bob", "plugins": {"key-auth": {"key": BOB_KEY}}})
    for route in routes["routes"]:
        post = route["plugins"].get("ext-plugin-post-req")
        if post is None:
            continue
        post["conf"] = [c for c in post["conf"] if c["name"] in KEPT]
        for conf in post["conf"]:
            if conf["name"] == "deepgate-cache":
                value = orjson.loads(conf["value"])
                value["semantic"] = {"threshold": 0.9, "store": store, "timeout_ms": 5000}
                conf["value"] = orjson.dumps(value).decode()
    path.write_text(yaml.safe_dump(routes, sort_keys=False) + "#END\n")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SemanticStack]:
    from deepgate.embedded_redis import EmbeddedRedis

    tmp = tmp_path_factory.mktemp("semantic")
    fakes = Fakes()
    server = EmbeddedRedis().start()
    sidecar_port, grpc_port, port = free_port(), free_port(), free_port()
    store = f"sqlite://{tmp / 'vectors.db'}"
    routes_file(tmp / "apisix.yaml", sidecar_port, store)
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        DEEPGATE_DEMO_KEY=KEY,
        DEEPGATE_REDIS_URL=server.url,
        DEEPGATE_ROUTE_KEY="e2e-semantic-route-key",
        DEEPGATE_SIDECAR_GRPC=f"127.0.0.1:{grpc_port}",
        DEEPGATE_DATA_DIR=str(tmp),
        DEEPSEEK_API_KEY="sk-fake-deepseek",
        DEEPSEEK_BASE_URL=fakes.deepseek.url,
        OPENAI_API_KEY="sk-fake-openai",
        OPENAI_BASE_URL=f"{fakes.openai.url}/v1",
        ANTHROPIC_API_KEY="sk-fake-anthropic",
        ANTHROPIC_BASE_URL=fakes.anthropic.url,
    )
    procs: list[subprocess.Popen[bytes]] = []
    with (tmp / "stack.log").open("wb") as out:
        sidecar = [sys.executable, "-m", "sidecar", "--role", "all"]
        sidecar += ["--http", f"127.0.0.1:{sidecar_port}", "--grpc", f"127.0.0.1:{grpc_port}"]
        procs.append(subprocess.Popen(sidecar, cwd=ROOT, env=env, stdout=out, stderr=out))
        gateway = [sys.executable, "-m", "devgateway", "--config", "apisix-conf/config.yaml"]
        gateway += ["--routes", str(tmp / "apisix.yaml"), "--listen", f"127.0.0.1:{port}"]
        procs.append(subprocess.Popen(gateway, cwd=ROOT, env=env, stdout=out, stderr=out))
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{sidecar_port}/healthz"), "the sidecar", 180)
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/v1/models"), "the gateway")
        yield SemanticStack(port, fakes, store)
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


def first_then(stack: SemanticStack, asked: str) -> str:
    """Ask once (a miss the sidecar writes back and indexes); the answer the client got."""
    before = stack.indexed()
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=ask(asked),  # type: ignore[arg-type]
        )
    assert raw.headers["x-deepgate-cache"] == "miss"
    # the semantic index is written in the background, just after the answer
    wait_until(lambda: stack.indexed() > before, "the semantic index", 30)
    return raw.parse().choices[0].message.content or ""


def test_a_question_in_other_words_is_a_semantic_hit(stack: SemanticStack) -> None:
    answer = first_then(stack, "What is the boiling point of water at sea level?")
    calls = stack.provider_calls()
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=ask("At sea level, what is the boiling point of water?"),  # type: ignore[arg-type]
        )
        stream = oa.chat.completions.create(
            model="deepseek-chat",
            messages=ask("At sea level, what's the boiling point of water?"),  # type: ignore[arg-type]
            stream=True,
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert raw.headers["x-deepgate-cache"] == "hit-semantic"
    assert raw.parse().choices[0].message.content == answer
    assert streamed == answer
    assert stack.provider_calls() == calls


def test_another_question_or_consumer_is_a_miss(stack: SemanticStack) -> None:
    first_then(stack, "How do I reset my password?")
    calls = stack.provider_calls()
    with stack.openai() as oa:
        other = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=ask("How do I bake sourdough bread at home?"),  # type: ignore[arg-type]
        )
    with stack.openai(BOB_KEY) as oa:
        bob = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=ask("I forgot my password, how can I reset it?"),  # type: ignore[arg-type]
        )
    assert other.headers["x-deepgate-cache"] == "miss"
    assert bob.headers["x-deepgate-cache"] == "miss"
    assert stack.provider_calls() == calls + 2
