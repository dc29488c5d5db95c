"""An Anthropic ``Message`` as the canonical ``chat.completion`` dict.

Shared with the stream mapping: the stop-reason table and the usage arithmetic. Anthropic counts
``input_tokens`` without the prompt-cache reads and writes; OpenAI's ``prompt_tokens`` is the whole
prompt, so the three are added, and the cache reads are reported again as ``cached_tokens``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from anthropic.types import (
    Message,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
)

from deepgate.chat import FinishReason

# ``pause_turn`` (a server tool paused a long turn) has no OpenAI counterpart: the turn did end.
FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: str | None) -> FinishReason | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def usage(
    input_tokens: int,
    output_tokens: int,
    cache_read: int | None,
    cache_creation: int | None,
    thinking_tokens: int | None = None,
) -> dict[str, Any]:
    prompt = input_tokens + (cache_read or 0) + (cache_creation or 0)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": output_tokens,
        "total_tokens": prompt + output_tokens,
        "prompt_tokens_details": {"cached_tokens": cache_read or 0},
    }
    if thinking_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": thinking_tokens}
    return out


def from_message(msg: Message) -> dict[str, Any]:
    text: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.content:
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ThinkingBlock):
            thinking.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append(
                {
                    "id": block.id,
                    "type": "function",
                    "function": {"name": block.name, "arguments": json.dumps(block.input)},
                }
            )
        # Server-tool and redacted-thinking blocks have no canonical form and are left out.
    # OpenAI's shape: content is null on a pure tool-call answer, a string otherwise.
    content = "".join(text) if text or not calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    u = msg.usage
    details = u.output_tokens_details
    return {
        "id": msg.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": msg.model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason(msg.stop_reason)}
        ],
        "usage": usage(
            u.input_tokens,
            u.output_tokens,
            u.cache_read_input_tokens,
            u.cache_creation_input_tokens,
            details.thinking_tokens if details else None,
        ),
    }
