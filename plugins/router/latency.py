"""The least-latency strategy's view of the providers: an EWMA per target, kept fresh in the
background.

A request never waits on the sidecar for numbers: the first request that needs latencies starts
one refresh task on the runner's event loop, which asks the sidecar's ``ProviderStats`` every
``refresh_s`` with a short deadline and folds each target's latency into an exponentially
weighted moving average. Requests read the last snapshot. When the sidecar does not answer, or
the snapshot is older than ``max_age_s``, there is no snapshot and the router keeps the
configured order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from plugins.router.config import StatsConfig
from plugins.sidecar_link import LINK

log = logging.getLogger(__name__)


class TargetStatsLike(Protocol):
    target: str
    available: bool
    calls: int
    latency_ms: float


StatsSource = Callable[[float], Awaitable[Sequence[TargetStatsLike]]]


async def _sidecar_stats(timeout_s: float) -> Sequence[TargetStatsLike]:
    stats: Sequence[Any] = await LINK.provider_stats(timeout_s)
    return stats


class LatencyBoard:
    """EWMA latency per ``provider:model``; only measured, available targets appear."""

    def __init__(self, source: StatsSource = _sidecar_stats) -> None:
        self._source = source
        self._ewma: dict[str, float] = {}
        self._snapshot: dict[str, float] = {}
        self._at = 0.0  # monotonic time of the last successful refresh
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conf = StatsConfig()

    def snapshot(self, conf: StatsConfig) -> dict[str, float] | None:
        """The latest latencies, or ``None`` when there are none fresh enough."""
        self._conf = conf
        self._ensure_refreshing()
        if not self._snapshot or time.monotonic() - self._at > conf.max_age_s:
            return None
        return self._snapshot

    def fold(self, stats: Sequence[TargetStatsLike], alpha: float) -> None:
        """One ProviderStats answer into the averages."""
        ewma = self._ewma
        snapshot: dict[str, float] = {}
        for s in stats:
            if s.calls <= 0 or s.latency_ms <= 0:
                continue  # never called: nothing measured yet
            old = ewma.get(s.target)
            value = s.latency_ms if old is None else alpha * s.latency_ms + (1 - alpha) * old
            ewma[s.target] = value
            if s.available:
                snapshot[s.target] = value
        self._snapshot = snapshot  # replaced whole: readers never see a half-built one
        self._at = time.monotonic()

    def _ensure_refreshing(self) -> None:
        task = self._task
        if task is not None and not task.done() and task.get_loop().is_running():
            return  # the usual case, without asking for the running loop (a system call on 3.11)
        loop = asyncio.get_running_loop()
        if task is not None and not task.done() and self._loop is loop:
            return
        self._loop = loop
        self._task = loop.create_task(self._refresh_forever(), name="router-latency-refresh")

    async def refresh_once(self) -> bool:
        conf = self._conf
        try:
            # asyncio.timeout, not wait_for: wait_for can swallow a cancellation (close())
            async with asyncio.timeout(conf.timeout_ms / 1000):
                stats = await self._source(conf.timeout_ms / 1000)
        except Exception as exc:  # noqa: BLE001 - any failure means "no stats": static order
            log.debug("provider stats unavailable: %s", type(exc).__name__)
            return False
        self.fold(stats, conf.ewma_alpha)
        return True

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh_once()
            await asyncio.sleep(self._conf.refresh_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
            self._task = None


BOARD = LatencyBoard()
"""The process's board (one refresh task per runner process)."""
