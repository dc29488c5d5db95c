"""What happens to an answer between the provider and the client, and after it is sent.

The plugin chain decides before the call; some of its decisions can only be carried out once the
answer exists: output safety (on the whole answer, or on a stream as it passes), putting back
personal data a mask replaced, writing the answer to the cache, publishing the usage record that
the ledger and the quota reconciliation read. Each of those is an ``AnswerHook``; the HTTP face
runs them in order for every chat request (OpenAI and Anthropic faces alike, streamed or not).

- ``on_answer`` sees a whole canonical ``chat.completion`` and returns it (changed or not), or
  raises a ``DeepgateError`` to answer with that error instead;
- ``on_stream`` wraps the canonical chunk stream (it may hold chunks back, change or end it);
- ``on_finish`` runs once the client has its answer or its error; it must not raise.

``Exchange`` is the request as the hooks see it: the sealed facts from the plugin chain, the
canonical body, which target answered, timings, usage, and the assembled answer (for a stream,
built from the chunks the client actually got; ``complete`` says whether it ended cleanly).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from deepgate.catalog import Catalog
from deepgate.chat import Dialect
from deepgate.request_facts import Facts
from deepgate.usage_record import UsageRecord

log = logging.getLogger(__name__)

Chunks = AsyncIterator[dict[str, Any]]


@dataclass(slots=True)
class Exchange:
    request_id: str
    dialect: Dialect
    facts: Facts
    body: dict[str, Any]  # the canonical request the providers got
    stream: bool
    started: float = field(default_factory=time.monotonic)
    wall_started: float = field(default_factory=time.time)
    target: str | None = None  # provider:model that answered
    first_token_s: float | None = None
    finished_s: float | None = None
    status: int = 200
    error_code: str | None = None
    answer: dict[str, Any] | None = None  # canonical chat.completion (assembled for streams)
    complete: bool = False  # the answer reached the client whole

    @property
    def usage(self) -> dict[str, Any]:
        usage = (self.answer or {}).get("usage")
        return usage if isinstance(usage, dict) else {}


def usage_record(ex: Exchange, catalog: Catalog) -> UsageRecord:
    """The one usage record of a finished exchange (the ledger's row, the quota's truth)."""
    usage = ex.usage
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    provider, _, model = (ex.target or "").partition(":")
    facts = ex.facts
    return UsageRecord(
        request_id=ex.request_id,
        ts=ex.wall_started,
        consumer=facts.get("consumer", ""),
        route=facts.get("route", ""),
        alias=facts.get("alias") or str(ex.body.get("model") or ""),
        provider=provider,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=catalog.cost(ex.target, prompt, completion) if ex.target else 0.0,
        latency_ms=round((ex.finished_s or 0.0) * 1000, 3),
        ttft_ms=None if ex.first_token_s is None else round(ex.first_token_s * 1000, 3),
        status=ex.status,
        error_code=ex.error_code,
        stream=ex.stream,
        cache=facts.get("cache_status", ""),
        safety=list(facts.get("findings", [])),
        reservation=dict(facts.get("reservation", {})),
    )


class AnswerHook:
    """A step on the answer's way out. The defaults change nothing."""

    async def on_answer(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]:
        return answer

    def on_stream(self, ex: Exchange, chunks: Chunks) -> Chunks:
        return chunks

    async def on_finish(self, ex: Exchange) -> None:
        return None

    async def close(self) -> None:
        """Release connections when the sidecar stops."""
        return None


class AnswerHooks:
    """The hooks of one sidecar, in the order they run."""

    def __init__(self, hooks: Sequence[AnswerHook] = ()) -> None:
        self.hooks = list(hooks)

    async def answer(self, ex: Exchange, answer: dict[str, Any]) -> dict[str, Any]:
        for hook in self.hooks:
            answer = await hook.on_answer(ex, answer)
        ex.answer = answer
        return answer

    def stream(self, ex: Exchange, chunks: Chunks) -> Chunks:
        """The client-bound stream: every hook's wrapper, then assembly into ``ex.answer``."""
        for hook in self.hooks:
            chunks = hook.on_stream(ex, chunks)
        return _assemble(ex, chunks)

    async def finish(self, ex: Exchange) -> None:
        ex.finished_s = time.monotonic() - ex.started
        for hook in self.hooks:
            try:
                await hook.on_finish(ex)
            except Exception:
                log.exception("an answer hook failed after the answer was sent")

    async def close(self) -> None:
        for hook in self.hooks:
            await hook.close()


async def _assemble(ex: Exchange, chunks: Chunks) -> Chunks:
    """Pass chunks through while building the ``chat.completion`` they amount to."""
    text: list[str] = []
    tool_calls: dict[int, dict[str, Any]] = {}
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model = ""
    ident = ""
    async for chunk in chunks:
        if ex.first_token_s is None:
            ex.first_token_s = time.monotonic() - ex.started
        model = chunk.get("model") or model
        ident = chunk.get("id") or ident
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                text.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = tool_calls.setdefault(
                    int(call.get("index", 0)),
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                slot["id"] = call.get("id") or slot["id"]
                function = call.get("function") or {}
                slot["function"]["name"] += function.get("name") or ""
                slot["function"]["arguments"] += function.get("arguments") or ""
            finish_reason = choice.get("finish_reason") or finish_reason
        yield chunk
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if tool_calls:
        message["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
    ex.answer = {
        "id": ident,
        "object": "chat.completion",
        "created": int(ex.wall_started),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
    }
    if usage is not None:
        ex.answer["usage"] = usage
    ex.complete = True
