"""Dynamic micro-batching: many callers' items, one model call per batch.

Each model has one ``MicroBatcher``. Callers ``submit`` lists of items; a collector task packs
waiting items into a batch when ``max_batch_size`` of them wait or ``max_wait_ms`` after the
first one arrived, whichever comes first, runs the model on a worker thread (never on the event
loop), and hands each caller its own results in order. A caller's items may span batches.

- The queue is bounded (in items): when full, ``RateLimited`` with a ``Retry-After`` estimate.
- Items whose deadline passed while they waited are dropped, never computed.
- A model failure fails exactly the callers in that batch; the batcher goes on serving.
- ``drain`` refuses new work and finishes what is queued within a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from deepgate.errors import GatewayTimeout, NotFound, RateLimited, ServiceUnavailable
from sidecar.pool.base import BatchModel

log = logging.getLogger(__name__)


class PoolMetrics:
    """What the autoscaler and operators read: queue depth above all."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry or CollectorRegistry()
        self.queue_depth = Gauge(
            "deepgate_pool_queue_depth", "Items waiting for a batch, per model.", ["model"],
            registry=reg,
        )  # fmt: skip
        self.batch_size = Histogram(
            "deepgate_pool_batch_size", "Items per model call.", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=reg,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "deepgate_pool_queue_wait_seconds", "Time an item waited for its batch.", ["model"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5), registry=reg,
        )  # fmt: skip
        self.compute = Histogram(
            "deepgate_pool_compute_seconds", "Time of one model call.", ["model", "device"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=reg,
        )  # fmt: skip
        self.items = Counter(
            "deepgate_pool_items", "Items computed, per model and device.", ["model", "device"],
            registry=reg,
        )  # fmt: skip


@dataclass(eq=False)
class _Job:
    """One caller's items and where their results go."""

    items: list[Any]
    deadline: float | None
    future: asyncio.Future[list[Any]]
    enqueued: float
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # items handed to batches so far
    done: int = 0  # results received so far

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)


class MicroBatcher:
    def __init__(
        self,
        model: BatchModel,
        *,
        max_batch_size: int | None = None,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        executor: ThreadPoolExecutor | None = None,
        metrics: PoolMetrics | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max(1, max_batch_size or model.max_batch_size)
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics or PoolMetrics()
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"pool-{model.name}")
        self._jobs: deque[_Job] = deque()
        self._waiting = 0  # items not yet handed to a batch
        self._wakeup = asyncio.Event()
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self._compute_s = 0.05  # running estimate of one batch's time, for Retry-After

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._collect())

    async def submit(self, items: list[Any], deadline: float | None = None) -> list[Any]:
        """Results for ``items`` in order. ``deadline`` is on the loop's clock (``loop.time()``)."""
        if self._draining:
            raise ServiceUnavailable(
                "This pool replica is shutting down; retry on another.", code="pool_draining"
            )
        if not items:
            return []
        if self._waiting + len(items) > self.max_queue:
            batches_ahead = math.ceil(self._waiting / self.max_batch_size) + 1
            raise RateLimited(
                f"The {self.model.name} queue is full; retry shortly.",
                code="pool_queue_full",
                retry_after=max(1.0, batches_ahead * self._compute_s),
            )
        loop = asyncio.get_running_loop()
        job = _Job(list(items), deadline, loop.create_future(), loop.time())
        self._jobs.append(job)
        self._waiting += len(items)
        self.metrics.queue_depth.labels(self.model.name).set(self._waiting)
        self._ensure_running()
        self._wakeup.set()
        return await job.future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                if self._draining:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first_wait = self._jobs[0].enqueued + self.max_wait_s - loop.time()
            if self._waiting < self.max_batch_size and first_wait > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), first_wait)
                continue
            batch = self._take(loop.time())
            if batch:
                await self._run(batch, loop)

    def _take(self, now: float) -> list[tuple[_Job, int]]:
        """Up to max_batch_size (job, index) pairs; expired jobs are failed, not computed."""
        batch: list[tuple[_Job, int]] = []
        while self._jobs and len(batch) < self.max_batch_size:
            job = self._jobs[0]
            if job.deadline is not None and now > job.deadline and job.taken == 0:
                self._jobs.popleft()
                self._waiting -= len(job.items) - job.taken
                if not job.future.done():
                    job.future.set_exception(
                        GatewayTimeout(
                            "The request's deadline passed while it waited for the pool.",
                            code="deadline_exceeded",
                        )
                    )
                continue
            self.metrics.queue_wait.labels(self.model.name).observe(now - job.enqueued)
            n = min(len(job.items) - job.taken, self.max_batch_size - len(batch))
            batch.extend((job, job.taken + i) for i in range(n))
            job.taken += n
            self._waiting -= n
            if job.taken == len(job.items):
                self._jobs.popleft()
        self.metrics.queue_depth.labels(self.model.name).set(self._waiting)
        return batch

    async def _run(self, batch: list[tuple[_Job, int]], loop: asyncio.AbstractEventLoop) -> None:
        inputs = [job.items[i] for job, i in batch]
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self.model.run_batch, inputs)
            if len(outputs) != len(inputs):
                raise RuntimeError(f"{len(outputs)} outputs for {len(inputs)} inputs")
        except Exception:
            log.exception("model %s failed on a batch of %d", self.model.name, len(inputs))
            failure = ServiceUnavailable(
                f"The {self.model.name} model failed on this request; retry.",
                code="pool_worker_failed",
            )
            for job in {job for job, _ in batch}:
                if not job.future.done():
                    job.future.set_exception(failure)
                with contextlib.suppress(ValueError):
                    self._jobs.remove(job)  # its remaining items are not computed
                    self._waiting -= len(job.items) - job.taken
            return
        elapsed = time.perf_counter() - started
        self._compute_s = 0.8 * self._compute_s + 0.2 * elapsed
        device = self.model.device
        self.metrics.batch_size.labels(self.model.name).observe(len(inputs))
        self.metrics.compute.labels(self.model.name, device).observe(elapsed)
        self.metrics.items.labels(self.model.name, device).inc(len(inputs))
        for (job, i), out in zip(batch, outputs, strict=True):
            job.results[i] = out
            job.done += 1
            if job.done == len(job.items) and not job.future.done():
                job.future.set_result(job.results)

    async def drain(self, grace_s: float) -> None:
        """Refuse new work; finish queued work within ``grace_s``; fail what is left."""
        self._draining = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            except TimeoutError:
                self._task.cancel()
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(
                    ServiceUnavailable(
                        "The pool stopped before this work ran.", code="pool_draining"
                    )
                )
        self._jobs.clear()
        self._waiting = 0
        self._executor.shutdown(wait=False)


class Pool:
    """One batcher per model name."""

    def __init__(self, batchers: dict[str, MicroBatcher]) -> None:
        self.batchers = batchers

    async def submit(
        self, model: str, items: list[Any], deadline: float | None = None
    ) -> list[Any]:
        batcher = self.batchers.get(model)
        if batcher is None:
            raise NotFound(f"No pooled model {model!r}.", param="model", code="model_not_found")
        return await batcher.submit(items, deadline)

    def queue_depths(self) -> dict[str, int]:
        return {name: b.queue_depth for name, b in self.batchers.items()}

    async def drain(self, grace_s: float) -> None:
        await asyncio.gather(*(b.drain(grace_s) for b in self.batchers.values()))


def pick_device() -> str:
    """``cuda:0`` when torch sees a GPU, else ``cpu`` (torch imported only here, lazily)."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda:0" if torch.cuda.is_available() else "cpu"
