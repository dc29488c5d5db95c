"""Logging for every deepgate process: one JSON object a line, the request id in each.

Entry points call ``setup_logging`` once. Code logs with the stdlib (``logging.getLogger``) and
lazy ``%`` arguments; the request id comes from a context variable set where a request starts, so
it follows the request through every ``await``. Prompts, completions and keys are never passed to
a logger: log sizes, counts and rule names instead.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "deepgate_request_id", default=None
)

# Attributes every LogRecord has; anything else passed via ``extra=`` is emitted as a field.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


@contextmanager
def request_scope(rid: str | None) -> Iterator[None]:
    """Run a block with ``rid`` as the request id of every log line it writes."""
    token = request_id.set(rid)
    try:
        yield
    finally:
        request_id.reset(token)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message, request id, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry, default=str).decode()
        except orjson.JSONEncodeError:
            # Text decoded from the wire may hold lone surrogates, which orjson refuses.
            return json.dumps(entry, default=str)


def setup_logging(service: str, level: str | None = None, stream: IO[str] | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) as JSON lines.

    The level comes from ``level``, else ``DEEPGATE_LOG_LEVEL``, else ``INFO``.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("DEEPGATE_LOG_LEVEL") or "INFO").upper())
    # The SDKs and HTTP clients log whole requests, prompts and headers included, at DEBUG:
    # they stay at WARNING unless an operator asks for them by name.
    if not os.environ.get("DEEPGATE_DEBUG_SDK_LOGS"):
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)


_CHATTY = ("openai", "anthropic", "httpx", "httpx2", "httpcore", "grpc", "aiohttp.access")
