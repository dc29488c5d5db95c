"""Anthropic's raw stream events as canonical ``chat.completion.chunk`` dicts.

Anthropic streams typed content blocks (``content_block_start`` / ``_delta`` / ``_stop``, each with
an index); OpenAI streams one delta per chunk, with tool calls numbered among tool calls only. The
translator keeps the little state that needs: which block index is which tool call, and the usage
counts, which arrive in two halves (input in ``message_start``, output in ``message_delta``).

The finish chunk and the usage chunk are only sent on ``message_stop``: a stream cut before it is
broken (the adapter raises), and its consumer must never have seen a finish reason.
"""

from __future__ import annotations

import time
from typing import Any

from anthropic.types import (
    InputJSONDelta,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
)

from deepgate.chat import FinishReason
from sidecar.providers.anthropic.response import finish_reason, usage


class StreamTranslator:
    """Feed it each raw event in order; it returns the chunks that event produces."""

    def __init__(self, model: str) -> None:
        self.id = ""
        self.model = model
        self.created = int(time.time())
        self.finished = False  # message_stop seen: the stream is complete
        self._tool_index: dict[int, int] = {}  # content block index -> OpenAI tool call index
        self._stop: FinishReason | None = None
        self._input = 0
        self._output = 0
        self._cache_read: int | None = None
        self._cache_creation: int | None = None
        self._thinking_tokens: int | None = None

    def feed(self, event: RawMessageStreamEvent) -> list[dict[str, Any]]:
        if isinstance(event, RawMessageStartEvent):
            msg = event.message
            self.id, self.model = msg.id, msg.model or self.model
            self._input = msg.usage.input_tokens
            self._output = msg.usage.output_tokens
            self._cache_read = msg.usage.cache_read_input_tokens
            self._cache_creation = msg.usage.cache_creation_input_tokens
            return [self._chunk({"role": "assistant", "content": ""})]
        if isinstance(event, RawContentBlockStartEvent):
            return self._block_start(event)
        if isinstance(event, RawContentBlockDeltaEvent):
            return self._block_delta(event)
        if isinstance(event, RawMessageDeltaEvent):
            self._stop = finish_reason(event.delta.stop_reason)
            # message_delta counts are cumulative totals: they replace, never add.
            u = event.usage
            self._output = u.output_tokens
            if u.input_tokens is not None:
                self._input = u.input_tokens
            if u.cache_read_input_tokens is not None:
                self._cache_read = u.cache_read_input_tokens
            if u.cache_creation_input_tokens is not None:
                self._cache_creation = u.cache_creation_input_tokens
            if u.output_tokens_details is not None:
                self._thinking_tokens = u.output_tokens_details.thinking_tokens
            return []
        if isinstance(event, RawMessageStopEvent):
            self.finished = True
            return [
                self._chunk({}, finish=self._stop or "stop"),
                {**self._chunk_head(), "choices": [], "usage": self._usage()},
            ]
        return []  # content_block_stop: nothing to say in OpenAI's shape

    def _block_start(self, event: RawContentBlockStartEvent) -> list[dict[str, Any]]:
        block = event.content_block
        if isinstance(block, ToolUseBlock):
            n = self._tool_index[event.index] = len(self._tool_index)
            call = {
                "index": n,
                "id": block.id,
                "type": "function",
                "function": {"name": block.name, "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        # Text and thinking blocks start empty on the wire; carry any text they start with.
        if isinstance(block, TextBlock) and block.text:
            return [self._chunk({"content": block.text})]
        if isinstance(block, ThinkingBlock) and block.thinking:
            return [self._chunk({"reasoning_content": block.thinking})]
        return []

    def _block_delta(self, event: RawContentBlockDeltaEvent) -> list[dict[str, Any]]:
        delta = event.delta
        if isinstance(delta, TextDelta):
            return [self._chunk({"content": delta.text})]
        if isinstance(delta, ThinkingDelta):
            return [self._chunk({"reasoning_content": delta.thinking})]
        if isinstance(delta, InputJSONDelta) and event.index in self._tool_index:
            if not delta.partial_json:
                return []
            call = {
                "index": self._tool_index[event.index],
                "function": {"arguments": delta.partial_json},
            }
            return [self._chunk({"tool_calls": [call]})]
        # Signatures and citations have no canonical form.
        return []

    def _chunk_head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }

    def _chunk(self, delta: dict[str, Any], finish: FinishReason | None = None) -> dict[str, Any]:
        return {
            **self._chunk_head(),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _usage(self) -> dict[str, Any]:
        return usage(
            self._input, self._output, self._cache_read, self._cache_creation, self._thinking_tokens
        )
