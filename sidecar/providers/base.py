"""What a provider adapter is, for the dispatcher that calls it.

An adapter owns exactly one official SDK client and translates in four places: the canonical
request to the provider's request, the provider's response to the canonical response, its stream
to canonical chunks, and its SDK's typed errors to ours. The canonical shapes are OpenAI Chat
Completions dicts (``deepgate.chat`` documents them):

- ``complete`` returns a ``chat.completion`` dict;
- ``stream`` yields ``chat.completion.chunk`` dicts, and always ends with a chunk whose
  ``usage`` is set when the provider reports usage (the HTTP face decides whether the client
  asked for it);
- both raise ``deepgate.errors.DeepgateError`` subclasses only, chosen by SDK exception type and
  HTTP status, never by message text (see ``classify`` below for what the dispatcher does next).

Adapters never mutate the request they are given: the dispatcher hands the same dict to the next
target when one fails. SDK retries are off (``max_retries=0``): the dispatcher retries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from deepgate.errors import (
    DeepgateError,
    GatewayTimeout,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    UpstreamError,
)

# Codes adapters put on UpstreamError, so the dispatcher can tell failures apart without text.
PROVIDER_ERROR = "provider_error"  # 5xx or an unreadable answer: retry, then fall back
PROVIDER_UNREACHABLE = "provider_unreachable"  # connection refused/reset: retry, then fall back
PROVIDER_AUTH = "provider_auth_failed"  # our key was refused (401/403): fall back, no retry
PROVIDER_NOT_FOUND = "provider_model_not_found"  # 404: fall back, no retry
PROVIDER_STREAM_BROKEN = "provider_stream_broken"  # a stream ended without finishing
# A request this provider cannot serve but another might (Anthropic and n > 1, say):
# raised as InvalidRequest, yet the dispatcher moves on to the next target.
PROVIDER_UNSUPPORTED = "provider_unsupported"


@dataclass(frozen=True, slots=True)
class CallOptions:
    """Per-call settings the dispatcher passes to an adapter."""

    model: str  # the provider's model name for this target (replaces the body's ``model``)
    timeout_s: float  # read timeout for this attempt (the dispatcher also enforces deadlines)
    request_id: str | None = None


class Provider(Protocol):
    """One provider target family (``deepseek``, ``openai``, ``anthropic``, ``local``)."""

    name: str

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]: ...

    def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


Next = Literal["retry", "fallback", "give_up"]


def classify(err: DeepgateError) -> Next:
    """What the dispatcher does after ``err`` from a target.

    - ``retry``: the same target may succeed on another try (429, 5xx, timeouts, connection);
    - ``fallback``: this target cannot serve the request, another might (our credentials or the
      model refused by this provider);
    - ``give_up``: the request itself is wrong; every target would refuse it (400, 413).
    """
    if isinstance(err, InvalidRequest) and err.code == PROVIDER_UNSUPPORTED:
        return "fallback"
    if isinstance(err, InvalidRequest | PayloadTooLarge):
        return "give_up"
    if isinstance(err, RateLimited | GatewayTimeout):
        return "retry"
    if isinstance(err, UpstreamError) and err.code in (PROVIDER_AUTH, PROVIDER_NOT_FOUND):
        return "fallback"
    return "retry"
