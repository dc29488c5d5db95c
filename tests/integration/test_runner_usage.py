"""Requests the runner answers itself (cache hits, refusals) still get their usage record."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from deepgate.usage_record import STREAM, UsageRecord
from plugins.runner import codec
from plugins.runner.server import Runner
from tests.integration.conftest import TEST_REGISTRY, chat_body, prepare, run_call

REFUSAL = '{"error": {"message": "Too many requests.", "code": "rate_limit_exceeded"}}'


async def test_a_stopped_request_is_published_to_the_usage_stream(
    sock_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPGATE_REDIS_URL", redis_url)
    runner = Runner(TEST_REGISTRY, conf_expire_s=3600)
    path = str(sock_dir / "usage.sock")
    await runner.start(path)
    try:
        token = await prepare(
            path, [("test-read-body", {}), ("test-stop", {"status": 429, "text": REFUSAL})]
        )
        resp, _ = await run_call(path, token, chat_body("Hi"), consumer_name="alice")
        assert isinstance(resp.action, codec.Stop)
    finally:
        await runner.stop(grace_s=0.5)  # waits for the record to be sent
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(STREAM)
    finally:
        client.close()
    assert len(entries) == 1
    record = UsageRecord.from_json(entries[0][1][b"record"])
    assert record.status == 429
    assert record.error_code == "rate_limit_exceeded"
    assert record.alias == "deepseek-chat"
    assert record.provider == ""
    assert record.cost_usd == 0.0
    assert record.request_id
    assert b"Hi" not in entries[0][1][b"record"]  # counts and names, never the prompt


async def test_without_redis_nothing_is_published_and_the_answer_is_the_same(
    inproc_runner: str,
) -> None:
    token = await prepare(inproc_runner, [("test-stop", {"status": 429, "text": REFUSAL})])
    resp, _ = await run_call(inproc_runner, token, chat_body("Hi"))
    assert isinstance(resp.action, codec.Stop)
    assert resp.action.status == 429
