"""plugins.router.strategies and the latency board: how each strategy orders a chain."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from plugins.router.config import StatsConfig, Strategy, TargetInfo
from plugins.router.latency import LatencyBoard
from plugins.router.strategies import least_latency, lowest_cost, order, priority, weighted


def target(label: str, inp: float = 0.0, out: float = 0.0) -> TargetInfo:
    return TargetInfo(label, label.partition(":")[0], "us", True, 100_000, inp, out)


A, B, C = target("a:1", 1.0, 2.0), target("b:1", 0.5, 8.0), target("c:1", 3.0, 1.0)


def labels(chain: list[TargetInfo]) -> list[str]:
    return [t.label for t in chain]


def test_priority_keeps_the_configured_order() -> None:
    assert labels(priority([C, A, B])) == ["c:1", "a:1", "b:1"]


def test_weighted_follows_the_weights_and_keeps_every_target() -> None:
    rng = random.Random(7)
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        chain = weighted([A, B, C], [6.0, 3.0, 1.0], rng)
        assert sorted(labels(chain)) == ["a:1", "b:1", "c:1"]  # the rest stay as fallbacks
        firsts[chain[0].label] += 1
    assert firsts["a:1"] / 4000 == pytest.approx(0.6, abs=0.03)
    assert firsts["b:1"] / 4000 == pytest.approx(0.3, abs=0.03)
    assert firsts["c:1"] / 4000 == pytest.approx(0.1, abs=0.02)


def test_weighted_second_place_is_drawn_among_the_rest() -> None:
    rng = random.Random(3)
    seconds: Counter[str] = Counter()
    for _ in range(3000):
        chain = weighted([A, B, C], [1000.0, 1.0, 3.0], rng)
        if chain[0] is A:
            seconds[chain[1].label] += 1
    assert seconds["c:1"] > 2 * seconds["b:1"]


def test_least_latency_fastest_first_unmeasured_after() -> None:
    chain = least_latency([A, B, C], {"c:1": 120.0, "b:1": 300.0})
    assert labels(chain) == ["c:1", "b:1", "a:1"]


@pytest.mark.parametrize("snapshot", [None, {}])
def test_least_latency_without_stats_is_the_static_order(snapshot: dict[str, float] | None) -> None:
    assert labels(least_latency([B, A, C], snapshot)) == ["b:1", "a:1", "c:1"]


def test_lowest_cost_depends_on_the_token_mix() -> None:
    # long prompts, short answers: input price rules; short prompts, long answers: output price
    assert labels(lowest_cost([A, B, C], 100_000, 10)) == ["b:1", "a:1", "c:1"]
    assert labels(lowest_cost([A, B, C], 10, 100_000)) == ["c:1", "a:1", "b:1"]


def chain_of(strategy: Strategy, latency: dict[str, float] | None = None) -> list[str]:
    rng = random.Random(1)
    return labels(
        order(
            strategy,
            [A, C],
            weights=[1.0, 1.0],
            rng=rng,
            latency_ms=latency,
            prompt_tokens=10,
            completion_tokens=100_000,
        )
    )


def test_order_dispatches_by_name() -> None:
    assert chain_of("lowest_cost") == ["c:1", "a:1"]
    assert chain_of("least_latency", {"a:1": 5.0, "c:1": 1.0}) == ["c:1", "a:1"]
    assert chain_of("priority", {"a:1": 5.0, "c:1": 1.0}) == ["a:1", "c:1"]


# --- the latency board ------------------------------------------------------------------------


@dataclass
class Stats:
    target: str
    available: bool
    calls: int
    latency_ms: float


def test_fold_is_an_ewma_of_measured_available_targets() -> None:
    board = LatencyBoard()
    board.fold([Stats("a:1", True, 3, 100.0), Stats("b:1", True, 0, 0.0)], alpha=0.5)
    board.fold([Stats("a:1", True, 4, 200.0), Stats("c:1", False, 9, 10.0)], alpha=0.5)
    assert board._snapshot == {"a:1": 150.0}  # b never called, c's breaker is open


async def test_board_refreshes_in_the_background_and_never_blocks() -> None:
    answers = [[Stats("a:1", True, 1, 50.0)], [Stats("a:1", True, 2, 150.0)]]
    asked = asyncio.Event()

    async def source(timeout_s: float) -> list[Stats]:
        assert timeout_s == 0.05
        asked.set()
        return answers.pop(0) if answers else [Stats("a:1", True, 3, 150.0)]

    board = LatencyBoard(source)
    conf = StatsConfig(refresh_s=0.01, timeout_ms=50, ewma_alpha=0.5)
    assert board.snapshot(conf) is None  # the first request does not wait for numbers
    await asyncio.wait_for(asked.wait(), 5)
    for _ in range(100):
        await asyncio.sleep(0.01)
        snap = board.snapshot(conf)
        if snap and snap["a:1"] > 100:
            break
    assert snap is not None
    assert 100 < snap["a:1"] <= 150
    await board.close()


async def test_board_without_answers_gives_no_snapshot() -> None:
    async def down(timeout_s: float) -> list[Stats]:
        raise ConnectionError("sidecar down")

    async def hangs(timeout_s: float) -> list[Stats]:
        await asyncio.sleep(10)
        return []

    for source in (down, hangs):
        board = LatencyBoard(source)
        conf = StatsConfig(refresh_s=0.01, timeout_ms=20)
        board.snapshot(conf)
        assert await board.refresh_once() is False
        assert board.snapshot(conf) is None
        await board.close()


async def test_a_stale_snapshot_counts_as_none() -> None:
    async def source(timeout_s: float) -> list[Stats]:
        return [Stats("a:1", True, 1, 50.0)]

    board = LatencyBoard(source)
    assert await board.refresh_once()
    assert board.snapshot(StatsConfig(max_age_s=60)) == {"a:1": 50.0}
    board._at -= 120
    assert board.snapshot(StatsConfig(max_age_s=60)) is None
    await board.close()
