"""Dynamic micro-batching with a pure-Python model: batches, order, back-pressure, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from deepgate.errors import GatewayTimeout, RateLimited, ServiceUnavailable
from sidecar.pool.batcher import MicroBatcher, Pool, PoolMetrics


class Lengths:
    """A model whose output for a text is (len, first letter); records every batch it ran."""

    name = "lengths"
    device = "cpu"

    def __init__(
        self, max_batch_size: int = 8, delay_s: float = 0.0, fail_on: str | None = None
    ) -> None:
        self.max_batch_size = max_batch_size
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()

    def run_batch(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        return [(len(t), t[:1]) for t in items]


async def test_batched_results_equal_one_at_a_time_and_keep_order() -> None:
    model = Lengths(max_batch_size=8)
    batcher = MicroBatcher(model, max_wait_ms=20)
    texts = [[f"t{i}" * (i + 1) for i in range(k, k + 3)] for k in range(0, 30, 3)]
    results = await asyncio.gather(*(batcher.submit(t) for t in texts))
    assert results == [model.run_batch(t) for t in texts]
    sizes = [len(b) for b in model.batches[: -len(texts)]]
    assert max(sizes) == 8  # batches filled up to max_batch_size
    assert len(sizes) == 4  # 30 items in batches of 8
    assert model.threads != {threading.main_thread().name}  # never on the event loop's thread
    await batcher.drain(1)


async def test_a_lone_item_waits_at_most_max_wait() -> None:
    batcher = MicroBatcher(Lengths(max_batch_size=64), max_wait_ms=50)
    started = time.perf_counter()
    assert await batcher.submit(["abc"]) == [(3, "a")]
    assert 0.04 <= time.perf_counter() - started < 0.5
    await batcher.drain(1)


async def test_a_full_queue_refuses_with_retry_after() -> None:
    batcher = MicroBatcher(Lengths(max_batch_size=2, delay_s=0.2), max_wait_ms=1, max_queue=4)
    first = asyncio.create_task(batcher.submit(["a", "b"]))
    await asyncio.sleep(0.05)  # a batch is computing; the queue is empty again
    queued = asyncio.create_task(batcher.submit(["c", "d", "e", "f"]))
    await asyncio.sleep(0)
    with pytest.raises(RateLimited) as err:
        await batcher.submit(["g"])
    assert err.value.code == "pool_queue_full"
    assert err.value.retry_after is not None
    assert await first == [(1, "a"), (1, "b")]
    assert len(await queued) == 4
    await batcher.drain(1)


async def test_expired_work_is_dropped_not_computed() -> None:
    model = Lengths(max_batch_size=1, delay_s=0.2)
    batcher = MicroBatcher(model, max_wait_ms=0)
    loop = asyncio.get_running_loop()
    busy = asyncio.create_task(batcher.submit(["busy"]))
    await asyncio.sleep(0.02)
    with pytest.raises(GatewayTimeout) as err:
        await batcher.submit(["late"], deadline=loop.time() + 0.05)
    assert err.value.code == "deadline_exceeded"
    await busy
    assert ["late"] not in model.batches
    await batcher.drain(1)


async def test_a_failing_batch_fails_its_callers_and_the_pool_goes_on() -> None:
    model = Lengths(max_batch_size=4, fail_on="bad")
    batcher = MicroBatcher(model, max_wait_ms=20)
    outcomes = await asyncio.gather(
        batcher.submit(["ok1"]), batcher.submit(["bad"]), return_exceptions=True
    )
    assert all(isinstance(o, ServiceUnavailable) for o in outcomes)
    assert outcomes[0].code == "pool_worker_failed"  # type: ignore[union-attr]
    assert "boom" not in str(outcomes[0])
    assert await batcher.submit(["fine"]) == [(4, "f")]
    await batcher.drain(1)


async def test_drain_finishes_queued_work_and_refuses_new() -> None:
    batcher = MicroBatcher(Lengths(max_batch_size=2, delay_s=0.05), max_wait_ms=1)
    pending = [asyncio.create_task(batcher.submit([f"x{i}"])) for i in range(6)]
    await asyncio.sleep(0)
    await batcher.drain(5)
    assert [len(await p) for p in pending] == [1] * 6
    with pytest.raises(ServiceUnavailable) as err:
        await batcher.submit(["late"])
    assert err.value.code == "pool_draining"


async def test_pool_routes_by_model_and_exports_metrics() -> None:
    registry = CollectorRegistry()
    batcher = MicroBatcher(Lengths(), max_wait_ms=1, metrics=PoolMetrics(registry))
    pool = Pool({"lengths": batcher})
    assert await pool.submit("lengths", ["ab"]) == [(2, "a")]
    assert pool.queue_depths() == {"lengths": 0}
    text = generate_latest(registry).decode()
    assert 'deepgate_pool_queue_depth{model="lengths"} 0.0' in text
    assert 'deepgate_pool_items_total{device="cpu",model="lengths"} 1.0' in text
    assert "deepgate_pool_batch_size_bucket" in text
    await pool.drain(1)
