"""An OpenAI-compatible provider's SSE stream to canonical ``chat.completion.chunk`` dicts.

The events are read from the response bytes here rather than through the SDK's typed stream,
which builds a pydantic model per chunk. Chunks pass through as the provider sent them, tool-call
argument deltas and DeepSeek's ``reasoning_content`` deltas included; only usage is normalised.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import orjson

from sidecar.providers.openai_compat.errors import broken, detail, failed_mid_stream, unreadable
from sidecar.providers.openai_compat.response import CUT_SHORT, normalise_usage


async def sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The ``data`` of each complete server-sent event; comments (``: keep-alive``) skipped.

    An event cut off by the end of the bytes is dropped, as the SSE standard says.
    """
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:  # what providers send
                yield event[6:]
                continue
            lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                yield b"\n".join(line[6:] if line[5:6] == b" " else line[5:] for line in lines)


def read_chunk(data: bytes, provider: str) -> tuple[dict[str, Any], bool]:
    """The canonical chunk in one event's data, and whether it finishes a choice."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        chunk = None
    if not isinstance(chunk, dict):
        raise unreadable(provider)
    if "error" in chunk and "choices" not in chunk:  # the provider failed after its 200
        raise failed_mid_stream(provider, detail(chunk["error"]))
    finishes = False
    for choice in chunk.get("choices") or ():
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if reason in CUT_SHORT:
            raise broken(provider)
        finishes = finishes or reason is not None
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        normalise_usage(usage)
    return chunk, finishes
