"""The ``local`` provider: chat answered by the inference pool's own model.

It speaks the same contract as the SDK adapters (canonical chat.completion and chunk dicts), so
aliases can put it in any chain; the shipped config gives it the alias ``local`` and ends
``deepseek-chat``'s chain with it, which is how ``make run`` with no provider key still answers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from deepgate.errors import DeepgateError, InvalidRequest, ServiceUnavailable
from sidecar.pool.local_llm import MODEL_NAME, Generation, LocalChatModel
from sidecar.providers.base import PROVIDER_UNSUPPORTED, CallOptions


class LocalProvider:
    """The ``local`` target: one ``LocalChatModel``, closed with the provider when it owns it."""

    name = "local"

    def __init__(self, model: LocalChatModel, *, owns_model: bool = True) -> None:
        self.model = model
        self._owns_model = owns_model

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        stats = Generation(prompt_tokens=0)
        async with aclosing(self._pieces(body, stats)) as pieces:
            text = "".join([piece async for piece in pieces])
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
        pieces = self._pieces(body, stats)
        try:
            # The first piece before the first chunk: a refusal (queue full, a bad parameter)
            # comes before anything is sent, while the dispatcher can still retry or fall back.
            first = await anext(pieces, None)
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            if first is not None:
                yield {**base, "choices": [{"index": 0, "delta": {"content": first}}]}
            async for piece in pieces:
                yield {**base, "choices": [{"index": 0, "delta": {"content": piece}}]}
        finally:
            await pieces.aclose()
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": stats.finish_reason}]}
        yield {**base, "choices": [], "usage": _usage(stats)}

    async def _pieces(self, body: dict[str, Any], stats: Generation) -> AsyncGenerator[str, None]:
        _check_supported(body)
        try:
            async with aclosing(self.model.generate(body, stats)) as pieces:
                async for piece in pieces:
                    yield piece
        except DeepgateError:
            raise
        except RuntimeError:
            raise ServiceUnavailable(
                "The local model failed on this request; retry.", code="pool_worker_failed"
            ) from None

    async def aclose(self) -> None:
        if self._owns_model:
            self.model.close()


def _check_supported(body: dict[str, Any]) -> None:
    """Refuse what the model cannot do, so the dispatcher moves on to the next target."""
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest(
            "The local model answers with one choice (n=1).", param="n", code=PROVIDER_UNSUPPORTED
        )
    choice = body.get("tool_choice")
    if body.get("tools") and (choice == "required" or isinstance(choice, dict)):
        raise InvalidRequest(
            "The local model cannot call tools.", param="tool_choice", code=PROVIDER_UNSUPPORTED
        )


def _usage(stats: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
    }
