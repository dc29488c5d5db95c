"""Usage publishing: one record per finished exchange, on the Redis stream the ledger reads.

``on_finish`` builds the record (``usage_record``) and puts it on a bounded in-memory queue; a
background task appends queued records to ``STREAM`` (``XADD … MAXLEN ~ N``, field ``record``) in
pipelined batches. The answer never waits on Redis: a slow or absent Redis only grows the queue.

Nothing is lost silently:
- a failed publish keeps its batch and retries it with a growing pause (0.1 s up to 5 s), counted
  in ``deepgate_usage_publish_failures``; a batch that partly got through before the failure is
  appended again, and the ledger's writer writes each request id once;
- a record that finds the queue full (Redis down long enough for ``queue_size`` records to pile
  up) is dropped and counted in ``deepgate_usage_records_dropped``, and the log says how many, never
  what;
- on shutdown the task gets ``drain_s`` to publish what is queued; whatever is left is counted
  and logged the same way.

Records carry counts, names and timings, never prompt or answer text, so ``log_opt_out`` (which
keeps a consumer's content out of logs) does not apply to them: an opted-out request is still
billed and still reconciled against its quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

from deepgate.catalog import Catalog, load_catalog
from deepgate.usage_record import DEFAULT_MAXLEN, MAXLEN_ENV, STREAM, UsageRecord
from sidecar.answer_hooks import AnswerHook, Exchange, usage_record
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

REDIS_ENV = "DEEPGATE_REDIS_URL"


class UsageMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "deepgate_usage_records_published",
            "Usage records appended to the ledger's Redis stream.",
            registry=registry,
        )
        self.failures = Counter(
            "deepgate_usage_publish_failures",
            "Failed attempts to append a batch of usage records (each is retried).",
            registry=registry,
        )
        self.dropped = Counter(
            "deepgate_usage_records_dropped",
            "Usage records lost: the queue was full, or the sidecar stopped before Redis had them.",
            registry=registry,
        )
        self.queued = Gauge(
            "deepgate_usage_queue_depth",
            "Usage records waiting to be appended to the Redis stream.",
            registry=registry,
        )


class UsagePublisher(AnswerHook):
    def __init__(
        self,
        client: aioredis.Redis,
        catalog: Catalog,
        *,
        metrics: Metrics | None = None,
        maxlen: int = DEFAULT_MAXLEN,
        queue_size: int = 10_000,
        batch_size: int = 500,
        drain_s: float = 5.0,
    ) -> None:
        self.client = client
        self.catalog = catalog
        self.maxlen = maxlen
        self.batch_size = batch_size
        self.drain_s = drain_s
        self.metrics = UsageMetrics((metrics or Metrics()).registry)
        self.queue: asyncio.Queue[UsageRecord] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self._pending: list[UsageRecord] = []  # the batch being published
        self._dropped_unlogged = 0

    @classmethod
    def from_env(
        cls, catalog: Catalog | None = None, metrics: Metrics | None = None
    ) -> list[AnswerHook]:
        """The hook when ``DEEPGATE_REDIS_URL`` is set; none (and one log line) otherwise."""
        publisher = cls.for_env(catalog, metrics)
        if publisher is None:
            log.warning("usage records are not published (no ledger): %s is not set", REDIS_ENV)
            return []
        log.info(
            "usage records go to the Redis stream %s (about %d kept)", STREAM, publisher.maxlen
        )
        return [publisher]

    @classmethod
    def for_env(
        cls, catalog: Catalog | None = None, metrics: Metrics | None = None
    ) -> UsagePublisher | None:
        """A publisher to ``DEEPGATE_REDIS_URL``, or ``None`` when it is not set."""
        url = os.environ.get(REDIS_ENV)
        if not url:
            return None
        raw = os.environ.get(MAXLEN_ENV) or str(DEFAULT_MAXLEN)
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(
                f"{MAXLEN_ENV}={raw!r}: give the number of records to keep, e.g. 100000"
            )
        client = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        return cls(client, catalog or load_catalog(), metrics=metrics, maxlen=int(raw))

    async def on_finish(self, ex: Exchange) -> None:
        self.submit(usage_record(ex, self.catalog))

    def submit(self, record: UsageRecord) -> None:
        """Queue ``record`` for the stream; never waits (a full queue counts a loss)."""
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self._drop(1, "the publish queue is full (is Redis reachable?)")
            return
        self.metrics.queued.set(self.queue.qsize() + len(self._pending))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._publish_forever(), name="usage-publisher")

    async def _publish_forever(self) -> None:
        pause = 0.1
        while True:
            if not self._pending:
                self._pending.append(await self.queue.get())
                while len(self._pending) < self.batch_size and not self.queue.empty():
                    self._pending.append(self.queue.get_nowait())
            try:
                await self._append(self._pending)
            except (RedisError, OSError, TimeoutError) as exc:
                self.metrics.failures.inc()
                log.warning(
                    "could not publish %d usage records (%s); retrying in %.1f s",
                    len(self._pending),
                    type(exc).__name__,
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            pause = 0.1
            self.metrics.published.inc(len(self._pending))
            self._pending = []
            self.metrics.queued.set(self.queue.qsize())
            if self._dropped_unlogged:
                self._drop(0, "")

    async def _append(self, records: list[UsageRecord]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for record in records:
                fields: dict[Any, Any] = {"record": record.to_json()}
                pipe.xadd(STREAM, fields, maxlen=self.maxlen, approximate=True)
            await pipe.execute()

    def _drop(self, count: int, why: str) -> None:
        """Count lost records; log the count (never the content) once per successful publish."""
        self.metrics.dropped.inc(count)
        self._dropped_unlogged += count
        if why and self._dropped_unlogged == count:
            log.error("usage records are being lost: %s", why)
        elif not why and self._dropped_unlogged:
            log.error("%d usage records were lost while the queue was full", self._dropped_unlogged)
            self._dropped_unlogged = 0

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued record is published; False when ``timeout_s`` ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.queue.qsize() or self._pending:
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._publish_forever(), name="usage-publisher")
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def close(self) -> None:
        if not await self.flush(self.drain_s):
            left = self.queue.qsize() + len(self._pending)
            self.metrics.dropped.inc(left)
            log.error("%d usage records were not published before the sidecar stopped", left)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()
