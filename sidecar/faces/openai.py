"""The OpenAI-compatible face's wire details: SSE framing and usage chunks.

The OpenAI SDK reads a stream as ``data: <json>`` events ending with ``data: [DONE]``. Adapters
always ask providers for usage, so every canonical stream ends with a usage chunk; OpenAI sends
it only when the client asked (``stream_options.include_usage``), and so do we.
"""

from __future__ import annotations

from typing import Any

import orjson

from deepgate.errors import DeepgateError

DONE = b"data: [DONE]\n\n"


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def sse_chunk(chunk: dict[str, Any], include_usage: bool) -> bytes | None:
    """One chunk as an SSE event, or ``None`` when the client should not see it."""
    if not include_usage and "usage" in chunk:
        if not chunk.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        chunk = {k: v for k, v in chunk.items() if k != "usage"}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def sse_error(err: DeepgateError) -> bytes:
    """An error after the stream started: the OpenAI SDK raises it as an APIError."""
    return b"data: " + orjson.dumps(err.to_openai()) + b"\n\n"
