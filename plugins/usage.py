"""Usage records for the requests the plugin runner answers itself.

Most requests end at the sidecar, which publishes their usage record. Some never get there: a
cache hit replayed by the runner, a policy 429, a safety block. The ledger still owes them a
row (one record per request, with its cache and safety outcome), so the runner publishes those
records to the same Redis stream, in the same shape (``deepgate.usage_record``): no provider, no
tokens spent, no cost. The reservation the policy made was released when the chain stopped, so
the record carries none to settle.

Publishing never delays the answer: the record is handed to a background task. Records go to
the Redis named by ``DEEPGATE_REDIS_URL``; without it nothing is published (a single-machine
setup without Redis has no ledger either).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from deepgate.usage_record import DEFAULT_MAXLEN, MAXLEN_ENV, STREAM, UsageRecord
from plugins.base import RequestContext
from plugins.runner.codec import Stop

log = logging.getLogger(__name__)

REDIS_ENV = "DEEPGATE_REDIS_URL"
CACHE_HEADER = "x-deepgate-cache"
MAX_IN_FLIGHT = 1024  # records being sent at once; past this, new ones are counted and dropped


class StopPublisher:
    """Publishes one record per stopped request, in the background, to the usage stream."""

    def __init__(self, url: str | None, maxlen: int = DEFAULT_MAXLEN) -> None:
        self._client: Any = aioredis.Redis.from_url(url, socket_timeout=2) if url else None
        self._maxlen = maxlen
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0

    @classmethod
    def from_env(cls) -> StopPublisher:
        raw = os.environ.get(MAXLEN_ENV, "")
        return cls(os.environ.get(REDIS_ENV), int(raw) if raw.isdigit() else DEFAULT_MAXLEN)

    def publish(self, ctx: RequestContext, stop: Stop, started: float) -> None:
        if self._client is None:
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.dropped += 1
            log.warning("usage records dropped: %d (Redis is not keeping up)", self.dropped)
            return
        task = asyncio.create_task(self._send(record_for(ctx, stop, started)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, record: UsageRecord) -> None:
        try:
            await self._client.xadd(
                STREAM, {"record": record.to_json()}, maxlen=self._maxlen, approximate=True
            )
        except (RedisError, OSError) as exc:
            self.dropped += 1
            log.warning(
                "a usage record was not published (%s); dropped so far: %d", exc, self.dropped
            )

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        if self._client is not None:
            await self._client.aclose()


def record_for(ctx: RequestContext, stop: Stop, started: float) -> UsageRecord:
    facts = ctx.facts
    headers = {name.lower(): value for name, value in stop.headers if value is not None}
    status = stop.status or 200
    alias = facts.get("alias") or _body_field(ctx, "model")
    return UsageRecord(
        request_id=ctx.request_id,
        ts=time.time(),
        consumer=facts.get("consumer", ""),
        route=facts.get("route", ""),
        alias=alias if isinstance(alias, str) else "",
        latency_ms=round((time.perf_counter() - started) * 1000, 3),
        status=status,
        error_code=_error_code(stop.body) if status >= 400 else None,
        stream=_body_field(ctx, "stream") is True,
        cache=headers.get(CACHE_HEADER) or facts.get("cache_status", ""),
        safety=list(facts.get("findings", [])),
    )


def _body_field(ctx: RequestContext, name: str) -> Any:
    body = ctx.parsed_json()
    return body.get(name) if isinstance(body, dict) else None


def _error_code(body: bytes) -> str | None:
    """The error's code (OpenAI shape) or type (Anthropic shape) of a refusal's body."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code") or error.get("type")
    return code if isinstance(code, str) else None
