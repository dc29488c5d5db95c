"""The semantic layer: a question asked in other words is answered from the cache.

Real parts throughout: the sidecar in role ``all`` with the pool's embedding model (gRPC ``Embed``
for the runner, ``inference.embed`` for the write-back), sqlite-vec as the vector store, a real
Redis, the real runner and plugin, a fake DeepSeek behind the official OpenAI SDK. The runner's
call and the sidecar's request are glued as APISIX glues them: the runner's sealed facts travel
with the request to the sidecar.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import pytest_asyncio

from deepgate import response_cache as rc
from deepgate.request_facts import HEADER as FACTS_HEADER
from deepgate.route_signature import HEADER as ROUTE_HEADER
from deepgate.route_signature import sign_route
from plugins.registry import REGISTRY
from plugins.runner import codec
from plugins.runner.server import Runner
from plugins.sidecar_link import LINK
from sidecar.app import Sidecar
from sidecar.hooks.cache_write import CacheWrite
from tests.fakes.openai_server import FakeOpenAI
from tests.integration.conftest import call, prepare, run_call, started_pool_sidecar

KEY = b"cache-semantic-route-key"
ASKED = "What is the boiling point of water at sea level?"
REPHRASED = "At sea level, what is the boiling point of water?"
UNRELATED = "How do I bake sourdough bread at home?"


class Setup:
    def __init__(self, sidecar: Sidecar, hook: CacheWrite, deepseek: FakeOpenAI, sock: str):
        self.sidecar, self.hook, self.deepseek, self.sock = sidecar, hook, deepseek, sock
        self.calls = 0

    async def conf(self, redis_url: str, store: str, **semantic: Any) -> int:
        conf = {
            "redis_url": redis_url,
            "semantic": {"threshold": 0.85, "store": store, "timeout_ms": 5000, **semantic},
        }
        return await prepare(self.sock, [("deepgate-cache", conf)])

    async def ask(
        self, token: int, text: str, consumer: str = "alice", **extra: Any
    ) -> tuple[str, str]:
        """One request as the gateway runs it: the runner's chain, then (on a miss) the sidecar.

        Returns the cache status and the answer text the client got.
        """
        self.calls += 1
        rid = f"rq-{self.calls}"
        body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": text}], **extra}
        req = call(headers=[("x-request-id", rid)])
        resp, _ = await run_call(
            self.sock, token, orjson.dumps(body), req, consumer_name=consumer, route_id="chat"
        )
        action = resp.action
        if isinstance(action, codec.Stop):
            status = dict(action.headers)[rc.HEADER]
            answer = orjson.loads(action.body)
            return str(status), answer["choices"][0]["message"]["content"]
        assert isinstance(action, codec.Rewrite)
        status = str(dict(action.resp_headers)[rc.HEADER])
        headers = {
            "x-request-id": rid,
            ROUTE_HEADER: sign_route(KEY, rid, ["deepseek:deepseek-chat"]),
            FACTS_HEADER: str(dict(action.headers)[FACTS_HEADER]),
        }
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{self.sidecar.http_port}/v1",
            api_key="unused",
            max_retries=0,
        ) as client:
            completion = await client.chat.completions.create(
                extra_headers=headers,
                **body,
            )
        await self.hook.settle()  # the semantic index is written in the background
        return status, completion.choices[0].message.content or ""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool_sidecar() -> AsyncIterator[tuple[Sidecar, CacheWrite, FakeOpenAI]]:
    hook: CacheWrite | None = None

    def hooks(inference: Any) -> list[Any]:
        nonlocal hook
        hook = CacheWrite(inference)
        return [hook]

    async with started_pool_sidecar(KEY, hooks) as (sidecar, deepseek):
        assert hook is not None
        yield sidecar, hook, deepseek


@pytest_asyncio.fixture(loop_scope="module")
async def setup(
    pool_sidecar: tuple[Sidecar, CacheWrite, FakeOpenAI],
    sock_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Setup]:
    sidecar, hook, deepseek = pool_sidecar
    monkeypatch.setenv("DEEPGATE_ROUTE_KEY", KEY.decode())
    monkeypatch.setattr(LINK, "address", f"127.0.0.1:{sidecar.grpc_port}")
    await LINK.close()
    runner = Runner(REGISTRY, conf_expire_s=3600)
    sock = str(sock_dir / "sem.sock")
    await runner.start(sock)
    yield Setup(sidecar, hook, deepseek, sock)
    await runner.stop(grace_s=0.5)
    await LINK.close()
    await rc.close_clients()
    await rc.close_stores()


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'vectors.db'}"


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_a_rephrased_question_is_a_semantic_hit(
    setup: Setup, redis_url: str, store: str
) -> None:
    token = await setup.conf(redis_url, store)
    status, first = await setup.ask(token, ASKED)
    assert status == "miss"
    calls = len(setup.deepseek.received)
    assert await setup.ask(token, ASKED) == ("hit-exact", first)
    assert await setup.ask(token, REPHRASED) == ("hit-semantic", first)
    assert len(setup.deepseek.received) == calls
    status, _ = await setup.ask(token, UNRELATED)
    assert status == "miss"
    assert len(setup.deepseek.received) == calls + 1


async def test_semantic_hits_stay_within_scope_model_and_conversation(
    setup: Setup, redis_url: str, store: str
) -> None:
    token = await setup.conf(redis_url, store)
    assert (await setup.ask(token, ASKED))[0] == "miss"
    assert (await setup.ask(token, REPHRASED, consumer="bob"))[0] == "miss"
    assert (await setup.ask(token, REPHRASED, temperature=0.5))[0] == "miss"
    assert (await setup.ask(token, REPHRASED, max_tokens=20))[0] == "miss"
    assert (await setup.ask(token, REPHRASED))[0] == "hit-semantic"


async def test_the_threshold_decides(setup: Setup, redis_url: str, store: str) -> None:
    token = await setup.conf(redis_url, store, threshold=0.999)
    assert (await setup.ask(token, ASKED))[0] == "miss"
    assert (await setup.ask(token, REPHRASED))[0] == "miss"


async def test_an_expired_entry_is_not_a_semantic_hit(
    setup: Setup, redis_url: str, store: str
) -> None:
    import redis

    token = await setup.conf(redis_url, store)
    assert (await setup.ask(token, ASKED))[0] == "miss"
    client = redis.Redis.from_url(redis_url)
    client.flushall()  # what TTL expiry does to the entry; the vector stays behind
    client.close()
    vectors = rc.vector_store(store)
    assert await vectors.count("deepgate-cache") == 1
    assert (await setup.ask(token, REPHRASED))[0] == "miss"
    await asyncio.sleep(0.2)
    # the stale question left the index; the new miss was indexed in its place
    assert await vectors.count("deepgate-cache") == 1
    assert (await setup.ask(token, ASKED))[0] == "hit-semantic"


async def test_an_unreachable_pool_falls_back_to_exact_only(
    setup: Setup, redis_url: str, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await setup.conf(redis_url, store, timeout_ms=500)
    assert (await setup.ask(token, ASKED))[0] == "miss"
    monkeypatch.setattr(LINK, "address", "127.0.0.1:1")
    await LINK.close()
    assert (await setup.ask(token, ASKED))[0] == "hit-exact"
    status, answer = await setup.ask(token, REPHRASED)
    assert status == "miss"
    assert answer
