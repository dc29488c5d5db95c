"""Prometheus metrics of the sidecar, served on ``GET /metrics``.

Per provider and model: calls by outcome, errors by code, latency, time to first token, tokens.
Each ``Metrics`` has its own registry, so tests (and several sidecars in one process) never share
counters.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("provider", "model")
        self.requests = Counter(
            "deepgate_provider_requests",
            "Calls to provider targets, by outcome (ok, error).",
            [*labels, "outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "deepgate_provider_errors",
            "Failed calls to provider targets, by error code.",
            [*labels, "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "deepgate_provider_latency_seconds",
            "Time from sending a call to its complete answer.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "deepgate_provider_time_to_first_token_seconds",
            "Time from sending a streamed call to its first chunk.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "deepgate_tokens",
            "Tokens used, by kind (prompt, completion, cached, reasoning).",
            [*labels, "kind"],
            registry=self.registry,
        )
        self.output_findings = Counter(
            "deepgate_output_safety_findings",
            "Findings of the output safety checks in answers, by detector and action.",
            ("detector", "action"),
            registry=self.registry,
        )
        self.client_requests = Counter(
            "deepgate_http_requests",
            "Requests to the sidecar's HTTP face, by route and status.",
            ("route", "status"),
            registry=self.registry,
        )

    def call_ok(self, provider: str, model: str, seconds: float) -> None:
        self.requests.labels(provider, model, "ok").inc()
        self.latency.labels(provider, model).observe(seconds)

    def call_failed(self, provider: str, model: str, code: str | None) -> None:
        self.requests.labels(provider, model, "error").inc()
        self.errors.labels(provider, model, code or "unknown").inc()

    def first_token(self, provider: str, model: str, seconds: float) -> None:
        self.ttft.labels(provider, model).observe(seconds)

    def usage(self, provider: str, model: str, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        counts = {
            "prompt": usage.get("prompt_tokens"),
            "completion": usage.get("completion_tokens"),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "reasoning": (usage.get("completion_tokens_details") or {}).get("reasoning_tokens"),
        }
        for kind, value in counts.items():
            if isinstance(value, int) and value > 0:
                self.tokens.labels(provider, model, kind).inc(value)

    def output_finding(self, detector: str, action: str) -> None:
        self.output_findings.labels(detector, action).inc()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
