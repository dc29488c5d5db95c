"""How an alias's targets are put in order: the four strategies.

Each takes the targets left after the content and policy filters (in their configured order) and
returns the chain the sidecar will try, first to last. The sidecar falls back along the chain, so
every strategy returns every target it was given, only in a different order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from plugins.router.config import Strategy, TargetInfo


def priority(targets: Sequence[TargetInfo]) -> list[TargetInfo]:
    """The configured order."""
    return list(targets)


def weighted(
    targets: Sequence[TargetInfo], weights: Sequence[float], rng: random.Random
) -> list[TargetInfo]:
    """Weighted random order without replacement: the first target is drawn by weight, then
    the next among the rest, so the others stay in the chain as fallbacks."""
    pool = list(zip(targets, weights, strict=True))
    out: list[TargetInfo] = []
    while len(pool) > 1:
        total = sum(w for _, w in pool)
        pick = rng.random() * total
        chosen = len(pool) - 1  # rounding can leave pick just above the last bound
        for i, (_, w) in enumerate(pool):
            pick -= w
            if pick < 0:
                chosen = i
                break
        out.append(pool.pop(chosen)[0])
    out.extend(t for t, _ in pool)
    return out


def least_latency(
    targets: Sequence[TargetInfo], latency_ms: Mapping[str, float] | None
) -> list[TargetInfo]:
    """Fastest measured first; targets without a measure keep their order after them.

    Without a snapshot (the sidecar's stats are unavailable) the configured order stands.
    Targets whose breaker is open are not in the snapshot's latencies as measured ones (see
    ``LatencyBoard``), so they sink behind the measured ones.
    """
    if not latency_ms:
        return list(targets)
    measured = sorted(
        (t for t in targets if t.label in latency_ms), key=lambda t: latency_ms[t.label]
    )
    return measured + [t for t in targets if t.label not in latency_ms]


def lowest_cost(
    targets: Sequence[TargetInfo], prompt_tokens: int, completion_tokens: int
) -> list[TargetInfo]:
    """Cheapest estimated call first (catalog prices x estimated tokens); ties keep order."""
    return sorted(
        targets,
        key=lambda t: prompt_tokens * t.input_per_mtok + completion_tokens * t.output_per_mtok,
    )


def order(
    strategy: Strategy,
    targets: Sequence[TargetInfo],
    *,
    weights: Sequence[float],
    rng: random.Random,
    latency_ms: Mapping[str, float] | None,
    prompt_tokens: int,
    completion_tokens: int,
) -> list[TargetInfo]:
    if strategy == "weighted":
        return weighted(targets, weights, rng)
    if strategy == "least_latency":
        return least_latency(targets, latency_ms)
    if strategy == "lowest_cost":
        return lowest_cost(targets, prompt_tokens, completion_tokens)
    return priority(targets)
