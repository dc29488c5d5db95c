"""The ``local`` provider: chat answered by the inference pool's own model.

It speaks the same contract as the SDK adapters (canonical chat.completion and chunk dicts), so
aliases can put it in any chain; the shipped config gives it the alias ``local`` and ends
``deepseek-chat``'s chain with it, which is how ``make run`` with no provider key still answers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from deepgate.errors import DeepgateError, ServiceUnavailable
from sidecar.pool.local_llm import MODEL_NAME, Generation, LocalChatModel
from sidecar.providers.base import CallOptions


class LocalProvider:
    name = "local"

    def __init__(self, model: LocalChatModel) -> None:
        self.model = model

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        stats = Generation(prompt_tokens=0)
        text = "".join([piece async for piece in self._pieces(body, stats)])
        return {
            "id": f"chatcmpl-local-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL_NAME,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": stats.finish_reason,
                }
            ],
            "usage": _usage(stats),
        }

    async def stream(
        self, body: dict[str, Any], opts: CallOptions
    ) -> AsyncIterator[dict[str, Any]]:
        stats = Generation(prompt_tokens=0)
        base = {
            "id": f"chatcmpl-local-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": MODEL_NAME,
        }
        yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        async for piece in self._pieces(body, stats):
            yield {**base, "choices": [{"index": 0, "delta": {"content": piece}}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": stats.finish_reason}]}
        yield {**base, "choices": [], "usage": _usage(stats)}

    async def _pieces(self, body: dict[str, Any], stats: Generation) -> AsyncIterator[str]:
        try:
            async for piece in self.model.generate(body, stats):
                yield piece
        except DeepgateError:
            raise
        except RuntimeError:
            raise ServiceUnavailable(
                "The local model failed on this request; retry.", code="pool_worker_failed"
            ) from None

    async def aclose(self) -> None:
        return None


def _usage(stats: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    }
