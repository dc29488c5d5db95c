"""Live health of every provider target: a circuit breaker and the numbers the router reads.

Each target (``provider:model``) has one ``TargetHealth``. The breaker is closed while the target
answers; it opens after ``consecutive_failures`` failures in a row, or when the error rate over
the last ``window_s`` passes ``error_rate`` with at least ``min_calls`` calls. An open breaker
refuses calls for ``open_s``, then lets ``half_open_probes`` calls through: a success closes it,
a failure opens it again. Only failures that say something about the target count (5xx, 429,
timeouts, refused connections); a client's bad request does not.

The same object keeps latency and time-to-first-token (exponentially weighted), which
``ProviderStats`` serves to the router.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sidecar.config import Breaker

State = Literal["closed", "open", "half_open"]
_EWMA = 0.2  # weight of the newest sample


@dataclass(slots=True)
class Snapshot:
    target: str
    state: State
    calls: int
    failures: int
    error_rate: float
    latency_ms: float
    ttft_ms: float
    consecutive_failures: int


class TargetHealth:
    def __init__(
        self, target: str, conf: Breaker, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.target = target
        self.conf = conf
        self._clock = clock
        self.state: State = "closed"
        self._opened_at = 0.0
        self._probes = 0
        self._probe_at = 0.0
        self.consecutive_failures = 0
        self._window: deque[tuple[float, bool]] = deque()  # (time, ok)
        self.calls = 0
        self.failures = 0
        self.latency_ms = 0.0
        self.ttft_ms = 0.0

    # --- the breaker ----------------------------------------------------------------------

    def allow(self) -> bool:
        """May a call go to this target now? (Counts a half-open probe when it may.)"""
        if self.state == "open":
            if self._clock() - self._opened_at < self.conf.open_s:
                return False
            self.state = "half_open"
            self._probes = 0
        if self.state == "half_open":
            if self._probes >= self.conf.half_open_probes:
                # A probe whose outcome never came back (cancelled, or a client's bad request)
                # must not hold the breaker half-open for ever: its slot expires after open_s.
                if self._clock() - self._probe_at < self.conf.open_s:
                    return False
                self._probes = 0
            self._probes += 1
            self._probe_at = self._clock()
        return True

    def available(self) -> bool:
        """Would ``allow`` let a call through now? Changes nothing: no probe is used up."""
        if self.state == "open":
            # Past ``open_s``, ``allow`` turns half-open with every probe still free.
            return self._clock() - self._opened_at >= self.conf.open_s
        if self.state == "half_open":
            return (
                self._probes < self.conf.half_open_probes
                or self._clock() - self._probe_at >= self.conf.open_s
            )
        return True

    def record_success(self, latency_s: float, ttft_s: float | None = None) -> None:
        self._record(True)
        self.consecutive_failures = 0
        if self.state != "closed":
            self.state = "closed"
            self._window.clear()
        self.latency_ms = _ewma(self.latency_ms, latency_s * 1000)
        if ttft_s is not None:
            self.ttft_ms = _ewma(self.ttft_ms, ttft_s * 1000)

    def record_failure(self) -> None:
        self._record(False)
        self.failures += 1
        self.consecutive_failures += 1
        if self.state == "half_open" or self._should_open():
            self.state = "open"
            self._opened_at = self._clock()

    def _record(self, ok: bool) -> None:
        now = self._clock()
        self.calls += 1
        self._window.append((now, ok))
        horizon = now - self.conf.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()

    def _should_open(self) -> bool:
        if self.consecutive_failures >= self.conf.consecutive_failures:
            return True
        return (
            len(self._window) >= self.conf.min_calls and self.error_rate() >= self.conf.error_rate
        )

    def error_rate(self) -> float:
        if not self._window:
            return 0.0
        return sum(1 for _, ok in self._window if not ok) / len(self._window)

    def snapshot(self) -> Snapshot:
        if self.state == "open" and self._clock() - self._opened_at >= self.conf.open_s:
            state: State = "half_open"
        else:
            state = self.state
        return Snapshot(
            target=self.target,
            state=state,
            calls=self.calls,
            failures=self.failures,
            error_rate=round(self.error_rate(), 4),
            latency_ms=round(self.latency_ms, 3),
            ttft_ms=round(self.ttft_ms, 3),
            consecutive_failures=self.consecutive_failures,
        )


def _ewma(old: float, new: float) -> float:
    return new if old == 0.0 else old + _EWMA * (new - old)


class HealthBoard:
    """Every target's health, created on first use."""

    def __init__(self, conf: Breaker, clock: Callable[[], float] = time.monotonic) -> None:
        self.conf = conf
        self._clock = clock
        self._targets: dict[str, TargetHealth] = {}

    def __getitem__(self, target: str) -> TargetHealth:
        health = self._targets.get(target)
        if health is None:
            health = self._targets[target] = TargetHealth(target, self.conf, self._clock)
        return health

    def snapshots(self) -> list[Snapshot]:
        return [h.snapshot() for h in self._targets.values()]
