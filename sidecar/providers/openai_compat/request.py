"""The canonical request to an OpenAI-compatible provider's request, and where providers differ.

The canonical request is already an OpenAI Chat Completions body, so this is a shallow copy with
our target's model, our stream settings and a provider's few departures. Every field the client
sent is kept (providers add fields faster than we could list them), and the caller's dict is never
changed: the dispatcher hands the same body to the next target when one fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Dialect:
    """Where one provider's API departs from OpenAI's Chat Completions."""

    base_url: str | None = None  # its public endpoint (the SDK appends ``/chat/completions``)
    developer_role: bool = True  # False: ``developer`` messages are sent as ``system``
    limit_field: str | None = None  # the one output-limit field it honours; None: send as given


# A provider is a row here, as APISIX declares ai-providers/deepseek.lua over its OpenAI base.
DIALECTS: dict[str, Dialect] = {
    # max_tokens is deprecated at OpenAI and refused by its reasoning models.
    "openai": Dialect("https://api.openai.com/v1", limit_field="max_completion_tokens"),
    # DeepSeek answers 400 to the developer role and silently ignores max_completion_tokens.
    "deepseek": Dialect("https://api.deepseek.com", developer_role=False, limit_field="max_tokens"),
}

PLAIN = Dialect()  # any other OpenAI-compatible server: sent as the client wrote it


def to_provider_request(
    body: dict[str, Any], model: str, dialect: Dialect, *, stream: bool
) -> dict[str, Any]:
    """The provider's request body: a new dict with ``model`` and the stream settings replaced."""
    out = dict(body)
    out["model"] = model
    if stream:
        out["stream"] = True
        given = body.get("stream_options")
        # Usage always: the ledger needs it; the HTTP face drops it if the client did not ask.
        out["stream_options"] = {
            **(given if isinstance(given, dict) else {}),
            "include_usage": True,
        }
    else:
        out.pop("stream", None)
        out.pop("stream_options", None)  # OpenAI refuses stream_options without stream
    if dialect.limit_field is not None and ("max_tokens" in out or "max_completion_tokens" in out):
        newer, older = out.pop("max_completion_tokens", None), out.pop("max_tokens", None)
        limit = newer if newer is not None else older  # as ``ChatRequest.output_budget`` reads it
        if limit is not None:
            out[dialect.limit_field] = limit
    messages = body.get("messages")
    if not dialect.developer_role and isinstance(messages, list) and any(map(_developer, messages)):
        # Only the renamed messages are copied; the others are shared with ``body``, unchanged.
        out["messages"] = [{**m, "role": "system"} if _developer(m) else m for m in messages]
    return out


def _developer(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") == "developer"
