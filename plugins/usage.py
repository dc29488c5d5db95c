"""Usage records for the requests the plugin runner answers itself.

Most requests end at the sidecar, which publishes their usage record. Some never get there: a
cache hit replayed by the runner, a policy 429, a safety block. The ledger still owes them a
row (one record per request, with its cache and safety outcome), so the runner builds their
records here and hands them to the same publisher the sidecar uses
(``sidecar.hooks.usage.UsagePublisher``: a bounded queue, batched ``XADD`` in the background, never
delaying the answer): no provider, no tokens spent, no cost. The reservation the policy made was
released when the chain stopped, so the record carries none to settle.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from deepgate.response_cache import HEADER as CACHE_HEADER
from deepgate.usage_record import UsageRecord
from plugins.base import RequestContext
from plugins.runner.codec import Stop


def record_for(ctx: RequestContext, stop: Stop, started: float) -> UsageRecord:
    facts = ctx.facts
    headers = {name.lower(): value for name, value in stop.headers if value is not None}
    status = stop.status or 200
    alias = facts.get("alias") or _body_field(ctx, "model")
    return UsageRecord(
        request_id=ctx.request_id,
        ts=time.time(),
        consumer=facts.get("consumer", ""),
        route=facts.get("route", ""),
        alias=alias if isinstance(alias, str) else "",
        latency_ms=round((time.perf_counter() - started) * 1000, 3),
        status=status,
        error_code=_error_code(stop.body) if status >= 400 else None,
        stream=_body_field(ctx, "stream") is True,
        cache=headers.get(CACHE_HEADER) or facts.get("cache_status", ""),
        safety=list(facts.get("findings", [])),
    )


def _body_field(ctx: RequestContext, name: str) -> Any:
    body = ctx.parsed_json()
    return body.get(name) if isinstance(body, dict) else None


def _error_code(body: bytes) -> str | None:
    """The error's code (OpenAI shape) or type (Anthropic shape) of a refusal's body."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code") or error.get("type")
    return code if isinstance(code, str) else None
