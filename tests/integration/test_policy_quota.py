"""The quota store against a real Redis: atomic across stores and processes, settled once.

Several ``RedisQuotaStore`` instances (each its own connection pool, as separate runner processes
have) and several OS processes race for the same counters; the limit must hold exactly. The
sidecar's reconciliation hook is driven with real exchanges and real usage records.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import pytest
import redis

from deepgate.catalog import load_catalog
from deepgate.embedded_redis import EmbeddedRedis
from deepgate.quota import (
    Counter,
    QuotaStoreUnavailable,
    RedisQuotaStore,
    counter_key,
    new_reservation_id,
    reservation_key,
)
from deepgate.request_facts import Facts
from sidecar.answer_hooks import Exchange
from sidecar.hooks.quota import QuotaReconciler


def counter(name: str, limit: int, amount: int, kind: str = "tokens") -> Counter:
    key = counter_key(f"test:{name}", kind, "minute", "1")  # type: ignore[arg-type]
    return Counter(key, kind, limit, amount, time.time() + 60, name)  # type: ignore[arg-type]


def value(url: str, c: Counter) -> int:
    client = redis.Redis.from_url(url)
    try:
        raw = client.get(c.key)
        return int(raw) if raw is not None else 0
    finally:
        client.close()


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[list[RedisQuotaStore]]:
    opened = [RedisQuotaStore(redis_url, timeout_s=2.0) for _ in range(4)]
    yield opened
    for store in opened:
        await store.close()


async def test_concurrent_reservations_never_overshoot(
    redis_url: str, stores: list[RedisQuotaStore]
) -> None:
    tokens, requests = counter("tok", 1000, 7), counter("req", 120, 1, "requests")

    async def one(i: int) -> bool:
        store = stores[i % len(stores)]
        return (await store.reserve(new_reservation_id(), [tokens, requests], 900)).granted

    granted = await asyncio.gather(*(one(i) for i in range(400)))
    assert sum(granted) == 120  # the request limit binds first (120 * 7 = 840 tokens)
    assert value(redis_url, tokens) == 840
    assert value(redis_url, requests) == 120


RACER = textwrap.dedent(
    """
    import asyncio, sys, time
    from deepgate.quota import Counter, RedisQuotaStore, counter_key, new_reservation_id

    async def main(url):
        store = RedisQuotaStore(url, timeout_s=5.0)
        key = counter_key("test:procs", "tokens", "minute", "1")
        c = Counter(key, "tokens", 250, 1, time.time() + 60, "procs")
        outcomes = await asyncio.gather(
            *(store.reserve(new_reservation_id(), [c], 900) for _ in range(100))
        )
        await store.close()
        sys.stdout.write(str(sum(o.granted for o in outcomes)))

    asyncio.run(main(sys.argv[1]))
    """
)


def test_processes_share_one_limit(redis_url: str) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, redis_url], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    granted = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(granted) == 250  # 400 attempts by 4 processes, exactly the limit admitted
    assert all(p.returncode == 0 for p in procs)


async def test_refusal_adds_nothing_anywhere(redis_url: str, stores: list[RedisQuotaStore]) -> None:
    small, big = counter("small", 10, 8), counter("big", 10_000, 8)
    assert (await stores[0].reserve("r1", [small, big], 900)).granted
    refused = await stores[1].reserve("r2", [big, small], 900)
    assert not refused.granted
    assert refused.refused == 1
    assert refused.values == (8, 8)
    assert value(redis_url, big) == 8
    client = redis.Redis.from_url(redis_url)
    assert client.exists(reservation_key("r2")) == 0
    client.close()


async def test_settle_replaces_the_estimate_exactly_once(
    redis_url: str, stores: list[RedisQuotaStore]
) -> None:
    tokens, spend = counter("t", 100_000, 1500), counter("s", 10**9, 9000, "spend")
    requests = counter("q", 100, 1, "requests")
    rid = new_reservation_id()
    assert (await stores[0].reserve(rid, [tokens, spend, requests], 900)).granted
    done = await asyncio.gather(*(s.settle(rid, 230, 120) for s in stores))
    assert sorted(done) == [False, False, False, True]
    assert (value(redis_url, tokens), value(redis_url, spend)) == (230, 120)
    assert value(redis_url, requests) == 1
    assert not await stores[0].release(rid)  # already settled: nothing handed back twice
    assert value(redis_url, tokens) == 230


async def test_release_hands_tokens_back_and_keeps_the_request(
    redis_url: str, stores: list[RedisQuotaStore]
) -> None:
    tokens, requests = counter("t", 2000, 1500), counter("q", 100, 1, "requests")
    rid = new_reservation_id()
    await stores[0].reserve(rid, [tokens, requests], 900)
    assert not (await stores[1].reserve("other", [tokens], 900)).granted
    assert await stores[1].release(rid)
    assert (value(redis_url, tokens), value(redis_url, requests)) == (0, 1)
    assert (await stores[2].reserve("other", [tokens], 900)).granted


async def test_unreachable_redis_is_a_store_error() -> None:
    from deepgate.embedded_redis import free_port

    store = RedisQuotaStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    with pytest.raises(QuotaStoreUnavailable):
        await store.reserve("r", [counter("t", 10, 1)], 900)
    await store.close()


async def test_a_restarted_redis_is_reconnected_and_the_script_reloaded() -> None:
    server = EmbeddedRedis().start()
    store = RedisQuotaStore(server.url, timeout_s=1.0)
    try:
        assert (await store.reserve("r1", [counter("t", 10, 1)], 900)).granted
        server.stop()
        server.start()  # same port, empty: the pooled connection is dead, the script unknown
        outcome = await store.reserve("r2", [counter("t", 10, 1)], 900)
        assert outcome.granted
        assert outcome.values == (1,)
    finally:
        await store.close()
        server.stop()


# --- the sidecar's reconciliation ------------------------------------------------------------


def exchange(facts: Facts, **kw: object) -> Exchange:
    body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
    return Exchange("req-1", "openai", facts, body, False, **kw)  # type: ignore[arg-type]


def answer(prompt: int, completion: int) -> dict[str, object]:
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    }


async def test_sidecar_settles_with_the_real_usage_and_cost(redis_url: str) -> None:
    catalog = load_catalog()
    hook = QuotaReconciler(RedisQuotaStore(redis_url), catalog)
    tokens, spend = counter("t", 100_000, 1536), counter("s", 10**9, 5000, "spend")
    rid = new_reservation_id()
    await hook.store.reserve(rid, [tokens, spend], 900)
    facts = Facts(reservation={"id": rid, "store": "redis", "tokens": 1536})
    ex = exchange(facts, target="anthropic:claude-haiku-4-5", answer=answer(20, 10), complete=True)
    await hook.on_finish(ex)
    await hook.on_finish(ex)  # a second report of the same request changes nothing
    assert value(redis_url, tokens) == 30
    expected = catalog.cost("anthropic:claude-haiku-4-5", 20, 10)
    assert value(redis_url, spend) == pytest.approx(expected * 1_000_000, abs=1)
    await hook.close()


async def test_sidecar_releases_a_failed_call_and_skips_memory_reservations(
    redis_url: str,
) -> None:
    hook = QuotaReconciler(RedisQuotaStore(redis_url), load_catalog())
    tokens = counter("t", 100_000, 700)
    rid, mem = new_reservation_id(), new_reservation_id()
    await hook.store.reserve(rid, [tokens], 900)
    await hook.store.reserve(mem, [tokens], 900)
    failed = exchange(Facts(reservation={"id": rid, "store": "redis"}), status=502)
    await hook.on_finish(failed)
    assert value(redis_url, tokens) == 700  # only the failed call's 700 went back
    await hook.on_finish(exchange(Facts(reservation={"id": mem, "store": "memory"}), status=502))
    assert value(redis_url, tokens) == 700
    await hook.close()


async def test_sidecar_keeps_the_estimate_when_no_usage_came_back(redis_url: str) -> None:
    hook = QuotaReconciler(RedisQuotaStore(redis_url), load_catalog())
    tokens = counter("t", 100_000, 700)
    rid = new_reservation_id()
    await hook.store.reserve(rid, [tokens], 900)
    cut = exchange(
        Facts(reservation={"id": rid, "store": "redis"}),
        target="deepseek:deepseek-chat",
        answer={"choices": []},
        complete=False,
    )
    await hook.on_finish(cut)
    assert value(redis_url, tokens) == 700
    await hook.close()


async def test_the_sidecar_reconciles_only_with_a_redis_to_reach(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEEPGATE_REDIS_URL", raising=False)
    assert QuotaReconciler.from_env() == []
    monkeypatch.setenv("DEEPGATE_REDIS_URL", redis_url)
    hooks = QuotaReconciler.from_env()
    assert len(hooks) == 1
    assert isinstance(hooks[0], QuotaReconciler)
    await hooks[0].close()
