"""One usage record per answered (or refused) chat request: the ledger's row, the quota's truth.

The sidecar builds it when a request ends and publishes it to a Redis stream (``STREAM``); the
plugin runner does the same for the requests it answers itself (cache hits, refusals).
``deepgate ledger`` writes the records to the ledger database, keyed by request id so a record
delivered twice is written once; the policy plugin's quota reconciliation replaces the
reservation it made before the call with the record's real token counts and cost.

Records carry counts, names and timings only: never a prompt, an answer or a key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

STREAM = "deepgate:usage"
"""The Redis stream the sidecar appends records to (field ``record``: the JSON below)."""

MAXLEN_ENV = "DEEPGATE_USAGE_STREAM_MAXLEN"
DEFAULT_MAXLEN = 100_000
"""Records the stream keeps (approximately: Redis trims whole nodes): about 41 MB of Redis."""


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    ts: float  # unix seconds when the request arrived at the sidecar
    consumer: str = ""
    route: str = ""
    alias: str = ""  # the model the client asked for
    provider: str = ""  # who answered ("" when nobody did)
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None  # time to first token (streams)
    status: int = 200
    error_code: str | None = None
    stream: bool = False
    cache: str = ""  # hit-exact | hit-semantic | miss | bypass | "" (no cache on the route)
    safety: list[str] = field(default_factory=list)  # detectors that fired on the prompt
    reservation: dict[str, Any] = field(default_factory=dict)  # policy's, to reconcile

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> UsageRecord:
        data = orjson.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
