"""Circuit breakers: open on consecutive failures or error rate, half-open probes, close."""

from __future__ import annotations

from sidecar.config import Breaker
from sidecar.health import TargetHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health(**conf: float) -> tuple[TargetHealth, Clock]:
    clock = Clock()
    return TargetHealth("p:m", Breaker.model_validate(conf), clock), clock


def test_opens_after_consecutive_failures_and_probes_after_open_s() -> None:
    h, clock = health(consecutive_failures=3, open_s=10, half_open_probes=1)
    for _ in range(2):
        assert h.allow()
        h.record_failure()
    assert h.state == "closed"
    h.record_failure()
    assert h.state == "open"
    assert not h.allow()
    clock.now += 10
    assert h.allow()  # the one probe
    assert not h.allow()  # no second probe while the first is out
    h.record_success(0.1)
    assert h.state == "closed"
    assert h.allow()


def test_a_failed_probe_opens_again() -> None:
    h, clock = health(consecutive_failures=1, open_s=5)
    h.record_failure()
    clock.now += 5
    assert h.allow()
    h.record_failure()
    assert h.state == "open"
    assert not h.allow()


def test_error_rate_opens_only_with_enough_calls_in_the_window() -> None:
    h, _clock = health(consecutive_failures=100, error_rate=0.5, min_calls=10, window_s=30)
    for i in range(9):
        h.record_success(0.01) if i % 2 else h.record_failure()
    assert h.state == "closed"  # 9 calls: below min_calls
    h.record_failure()
    assert h.state == "open"  # 6 of 10 failed
    h2, clock2 = health(consecutive_failures=100, error_rate=0.5, min_calls=4, window_s=30)
    for _ in range(3):
        h2.record_failure()
        h2.record_success(0.01)
    clock2.now += 31  # the old calls leave the window
    h2.record_failure()
    assert h2.state == "closed"


def test_latency_and_ttft_are_averaged() -> None:
    h, _ = health()
    h.record_success(0.100, ttft_s=0.020)
    h.record_success(0.200, ttft_s=0.040)
    snap = h.snapshot()
    assert snap.latency_ms == 120.0
    assert snap.ttft_ms == 24.0
    assert snap.calls == 2
