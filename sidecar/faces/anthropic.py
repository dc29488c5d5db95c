"""The Anthropic-compatible face (``/v1/messages``): canonical answers in Anthropic's wire format.

Requests come in through ``deepgate.chat.from_anthropic``; this module is the way back out: a
canonical ``chat.completion`` as an Anthropic ``message`` object, and a canonical chunk stream as
the SSE event sequence the Anthropic SDKs parse (``message_start``, then per content block
``content_block_start`` / ``content_block_delta`` / ``content_block_stop``, then ``message_delta``
with the stop reason and usage, then ``message_stop``). Pure translation, no I/O, no SDK: the
server owns the sockets, the tests hold the SDK to these bytes.

What cannot cross exactly:

- thinking blocks get an empty ``signature``: the canonical shape carries reasoning text, not
  Anthropic's signature, so a client cannot send these blocks back to Anthropic as they are;
- ``stop`` becomes ``end_turn`` (the canonical answer does not say which stop sequence matched);
- canonical ``prompt_tokens`` counts cache reads and writes; Anthropic's ``input_tokens`` does not,
  so the cache reads are taken out again (cache writes are not reported canonically and stay in);
- a canonical stream reports usage only at its end, so ``message_start`` says 0 input tokens and
  the final ``message_delta`` carries the real counts (the SDKs take them from there).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson

from deepgate.errors import DeepgateError

STOP_REASONS: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish_reason: str | None) -> str:
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def message_id(canonical_id: str | None) -> str:
    """An Anthropic-style id that still leads back to the canonical (provider's) one."""
    if not canonical_id:
        return f"msg_{uuid.uuid4().hex}"
    return canonical_id if canonical_id.startswith("msg_") else f"msg_{canonical_id}"


def usage(canonical: dict[str, Any] | None) -> dict[str, Any]:
    u = canonical or {}
    cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": max(0, int(u.get("prompt_tokens") or 0) - cached),
        "output_tokens": int(u.get("completion_tokens") or 0),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def tool_input(arguments: str | None) -> dict[str, Any]:
    """A tool call's JSON arguments as Anthropic's ``input`` object.

    Anthropic's ``input`` must be an object; arguments a model got wrong (not JSON, or not an
    object) become ``{}`` rather than failing an answer that is otherwise complete.
    """
    try:
        parsed = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def to_anthropic_message(canonical_response: dict[str, Any], model: str) -> dict[str, Any]:
    """A canonical ``chat.completion`` as an Anthropic ``message`` (the first choice only)."""
    choices = canonical_response.get("choices") or [{}]
    choice = choices[0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if reasoning := msg.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if text := _text(msg.get("content")):
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                "name": fn.get("name", ""),
                "input": tool_input(fn.get("arguments")),
            }
        )
    return {
        "id": message_id(canonical_response.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": usage(canonical_response.get("usage")),
    }


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def error_event(err: DeepgateError) -> bytes:
    """A failure after the stream started: the Anthropic SDKs raise it as an ``APIStatusError``."""
    return sse_event("error", err.to_anthropic())


class AnthropicStreamEncoder:
    """Canonical chunks in, Anthropic SSE events out, for one streamed answer.

    Anthropic content blocks are typed and opened one at a time, while a canonical delta may carry
    any of text, reasoning and tool-call pieces; a piece of another kind than the open block closes
    it and opens the next. Call ``finish`` once after the last chunk.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self._started = False
        self._finished = False
        self._blocks = 0  # content blocks opened so far (the next block's index)
        self._open: str | None = None  # "text", "thinking" or "tool_use:<n>" for tool call n
        self._tool_blocks: dict[int, int] = {}  # canonical tool call index -> block index
        self._stop: str | None = None
        self._usage: dict[str, Any] | None = None

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        out = self._start(chunk.get("id"))
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # Anthropic answers have one message; a face asks for one choice
            delta = choice.get("delta") or {}
            if reasoning := delta.get("reasoning_content"):
                out += self._to_block(
                    "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                )
                out.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
            if text := delta.get("content"):
                out += self._to_block("text", {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": text}))
            for call in delta.get("tool_calls") or []:
                out += self._tool_call(call)
            if choice.get("finish_reason"):
                self._stop = stop_reason(choice["finish_reason"])
        return out

    def finish(self) -> list[bytes]:
        if self._finished:
            return []
        out = self._start(None)
        out += self._close()
        self._finished = True
        out.append(
            sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self._stop or "end_turn", "stop_sequence": None},
                    "usage": usage(self._usage),
                },
            )
        )
        out.append(sse_event("message_stop", {"type": "message_stop"}))
        return out

    def _start(self, canonical_id: str | None) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        message: dict[str, Any] = {
            "id": message_id(canonical_id),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(None),
        }
        return [sse_event("message_start", {"type": "message_start", "message": message})]

    def _tool_call(self, call: dict[str, Any]) -> list[bytes]:
        n = int(call.get("index", 0))
        fn = call.get("function") or {}
        out: list[bytes] = []
        if n not in self._tool_blocks:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                "name": fn.get("name") or "",
                "input": {},
            }
            out += self._to_block(f"tool_use:{n}", block)
            self._tool_blocks[n] = self._blocks - 1
        if arguments := fn.get("arguments"):
            # OpenAI streams one call at a time; arguments for an earlier call (never seen in
            # practice) still go to that call's block, which the SDKs accumulate by index.
            index = self._tool_blocks[n]
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out.append(self._delta(delta, index))
        return out

    def _to_block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        if self._open == kind:
            return []
        out = self._close()
        self._open = kind
        out.append(
            sse_event(
                "content_block_start",
                {"type": "content_block_start", "index": self._blocks, "content_block": block},
            )
        )
        self._blocks += 1
        return out

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [
            sse_event(
                "content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1}
            )
        ]

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        index = self._blocks - 1 if index is None else index
        return sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )
