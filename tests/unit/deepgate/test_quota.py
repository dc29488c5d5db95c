"""Quota windows and the in-process store: the same contract the Redis store keeps."""

from __future__ import annotations

import calendar
import time

import pytest

from deepgate.quota import (
    Counter,
    MemoryQuotaStore,
    counter_key,
    new_reservation_id,
    reservation_key,
    window_bounds,
)


def ts(*parts: int) -> float:
    return float(calendar.timegm((*parts, 0, 0, 0)[:6]))


def test_minute_window_label_and_reset() -> None:
    now = ts(2026, 11, 28, 11, 41, 0) + 17.5
    label, reset = window_bounds("minute", now)
    assert reset == ts(2026, 11, 28, 11, 42, 0)
    assert window_bounds("minute", reset - 0.001)[0] == label
    assert window_bounds("minute", reset)[0] != label


def test_day_window_is_the_utc_day() -> None:
    label, reset = window_bounds("day", ts(2026, 11, 28, 23, 59, 59))
    assert label == "20261128"
    assert reset == ts(2026, 11, 29, 0, 0, 0)


@pytest.mark.parametrize(
    ("now", "label", "reset"),
    [
        (ts(2026, 11, 28, 12, 0, 0), "202611", ts(2026, 12, 1, 0, 0, 0)),
        (ts(2026, 12, 31, 23, 0, 0), "202612", ts(2027, 1, 1, 0, 0, 0)),
        (ts(2028, 2, 29, 1, 0, 0), "202802", ts(2028, 3, 1, 0, 0, 0)),
    ],
)
def test_month_window_rolls_over_years(now: float, label: str, reset: float) -> None:
    assert window_bounds("month", now) == (label, reset)


def test_keys_share_one_cluster_slot_tag() -> None:
    key = counter_key("consumer:demo", "tokens", "minute", "123")
    assert key.startswith("{dgq}:")
    assert reservation_key("abc").startswith("{dgq}:")
    assert new_reservation_id() != new_reservation_id()


def counter(key: str, limit: int, amount: int, kind: str = "tokens") -> Counter:
    return Counter(key, kind, limit, amount, time.time() + 60, f"rule.{key}")  # type: ignore[arg-type]


async def test_memory_store_reserves_all_or_nothing() -> None:
    store = MemoryQuotaStore()
    a, b = counter("a", 100, 60), counter("b", 1000, 60)
    first = await store.reserve("r1", [a, b], 900)
    assert first.granted
    assert first.values == (60, 60)
    second = await store.reserve("r2", [a, b], 900)
    assert not second.granted
    assert second.refused == 0
    assert second.values == (60, 60)  # nothing was added to b either
    third = await store.reserve("r3", [counter("b", 1000, 10)], 900)
    assert third.values == (70,)


async def test_memory_store_settles_once_and_releases() -> None:
    store = MemoryQuotaStore()
    tokens, spend = counter("t", 1000, 500), counter("s", 10_000, 4000, "spend")
    requests = counter("q", 10, 1, "requests")
    await store.reserve("r1", [tokens, spend, requests], 900)
    assert await store.settle("r1", 120, 900)
    assert not await store.settle("r1", 120, 900)  # idempotent
    after = await store.reserve("r2", [tokens, spend, requests], 900)
    assert after.values == (620, 4900, 2)  # real 120 + next 500; real 900 + next 4000
    assert await store.release("r2")
    assert not await store.release("r2")
    probe = await store.reserve("r3", [counter("t", 1000, 0), counter("q", 10, 0, "requests")], 900)
    assert probe.values == (120, 2)  # tokens handed back; requests still count


async def test_memory_store_refuses_a_single_request_over_the_limit() -> None:
    store = MemoryQuotaStore()
    outcome = await store.reserve("r", [counter("t", 100, 101)], 900)
    assert not outcome.granted
    assert outcome.refused == 0
    assert outcome.values == (0,)


async def test_memory_store_forgets_expired_windows() -> None:
    store = MemoryQuotaStore()
    gone = Counter("t", "tokens", 100, 90, time.time() - 120, "r")  # ttl floor: 1 s
    await store.reserve("r1", [gone], 900)
    store._counters["t"] = (90, time.time() - 1)  # the window ended
    assert (await store.reserve("r2", [counter("t", 100, 90)], 900)).granted
