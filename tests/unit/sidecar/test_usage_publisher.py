"""The usage hook: records reach the Redis stream without holding up answers, and none is lost
silently when Redis is away."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
import redis.asyncio as aioredis

from deepgate.catalog import load_catalog
from deepgate.embedded_redis import EmbeddedRedis, free_port
from deepgate.request_facts import Facts
from deepgate.usage_record import STREAM, UsageRecord
from sidecar.answer_hooks import AnswerHooks, Exchange
from sidecar.hooks.usage import UsagePublisher
from sidecar.metrics import Metrics


def exchange(rid: str, consumer: str = "alice") -> Exchange:
    facts: Facts = {"consumer": consumer, "route": "chat", "alias": "fast", "cache_status": "miss"}
    ex = Exchange(rid, "openai", facts, {"model": "fast", "messages": []}, stream=False)
    ex.target = "deepseek:deepseek-chat"
    ex.answer = {"usage": {"prompt_tokens": 1000, "completion_tokens": 500}}
    ex.complete = True
    return ex


def stream_records(url: str) -> list[UsageRecord]:
    client = redis.Redis.from_url(url)
    try:
        return [UsageRecord.from_json(f[b"record"]) for _, f in client.xrange(STREAM)]
    finally:
        client.close()


def metric(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def test_each_finished_exchange_is_one_record_on_the_stream(redis_url: str) -> None:
    metrics = Metrics()
    hook = UsagePublisher(aioredis.Redis.from_url(redis_url), load_catalog(), metrics=metrics)
    hooks = AnswerHooks([hook])
    for i in range(5):
        await hooks.finish(exchange(f"req-{i}"))
    assert await hook.flush(5.0)
    records = stream_records(redis_url)
    assert [r.request_id for r in records] == [f"req-{i}" for i in range(5)]
    first = records[0]
    assert (first.consumer, first.route, first.alias) == ("alice", "chat", "fast")
    assert (first.provider, first.model) == ("deepseek", "deepseek-chat")
    assert (first.prompt_tokens, first.completion_tokens) == (1000, 500)
    assert first.cost_usd == pytest.approx((1000 * 0.28 + 500 * 0.42) / 1e6)
    assert first.cache == "miss"
    assert metric(metrics, "deepgate_usage_records_published_total") == 5
    await hook.close()


async def test_the_stream_is_trimmed_to_about_maxlen(redis_url: str) -> None:
    hook = UsagePublisher(aioredis.Redis.from_url(redis_url), load_catalog(), maxlen=100)
    for i in range(1000):
        await hook.on_finish(exchange(f"r{i}"))
    assert await hook.flush(10.0)
    client = redis.Redis.from_url(redis_url)
    length = client.xlen(STREAM)
    client.close()
    assert 100 <= length < 300  # approximate trimming removes whole nodes only
    await hook.close()


async def test_redis_away_then_back_nothing_is_lost(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    metrics = Metrics()
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.2)
    hook = UsagePublisher(client, load_catalog(), metrics=metrics)
    caplog.set_level(logging.WARNING, "sidecar.hooks.usage")
    for i in range(20):
        await asyncio.wait_for(hook.on_finish(exchange(f"r{i}")), 0.5)  # never waits on Redis
    for _ in range(100):
        if metric(metrics, "deepgate_usage_publish_failures_total") >= 2:
            break
        await asyncio.sleep(0.05)
    assert metric(metrics, "deepgate_usage_publish_failures_total") >= 2
    assert metric(metrics, "deepgate_usage_queue_depth") == 20
    with EmbeddedRedis(port=port) as server:
        assert await hook.flush(15.0)
        assert sorted(r.request_id for r in stream_records(server.url)) == sorted(
            f"r{i}" for i in range(20)
        )
        await hook.close()
    assert metric(metrics, "deepgate_usage_records_dropped_total") == 0
    assert "alice" not in caplog.text  # counts in the log, never record contents


async def test_a_full_queue_drops_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    hook = UsagePublisher(client, load_catalog(), metrics=metrics, queue_size=5, drain_s=0.2)
    caplog.set_level(logging.ERROR, "sidecar.hooks.usage")
    for i in range(12):
        await hook.on_finish(exchange(f"r{i}"))
    dropped = metric(metrics, "deepgate_usage_records_dropped_total")
    assert dropped >= 6  # 5 queued (one of them maybe in the batch being retried)
    assert "usage records are being lost" in caplog.text
    await hook.close()  # Redis never came back: the rest is counted too
    assert metric(metrics, "deepgate_usage_records_dropped_total") == 12
    assert "were not published before the sidecar stopped" in caplog.text


def test_without_redis_the_hook_is_off_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("DEEPGATE_REDIS_URL", raising=False)
    caplog.set_level(logging.INFO, "sidecar.hooks.usage")
    assert UsagePublisher.from_env() == []
    assert caplog.text.count("usage records are not published") == 1


def test_a_bad_stream_length_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGATE_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DEEPGATE_USAGE_STREAM_MAXLEN", "lots")
    with pytest.raises(ValueError, match="number of records to keep"):
        UsagePublisher.from_env()
