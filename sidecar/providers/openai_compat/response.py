"""An OpenAI-compatible provider's JSON answer to the canonical ``chat.completion``.

The provider's answer already is one; the bytes are parsed once (orjson, no pydantic model) and
only usage is touched: DeepSeek reports cache hits as ``prompt_cache_hit_tokens``, which becomes
``prompt_tokens_details.cached_tokens`` so the ledger reads one field for every provider.
DeepSeek's ``reasoning_content`` already sits where the canonical message keeps it.
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.providers.openai_compat.errors import cut_short, unreadable

# Finish reasons that mean the provider gave up mid-answer (DeepSeek: out of inference capacity).
CUT_SHORT = frozenset({"insufficient_system_resource"})


def normalise_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """``usage`` with ``prompt_tokens_details.cached_tokens`` filled where DeepSeek's field says."""
    hits = usage.get("prompt_cache_hit_tokens")
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    if isinstance(hits, int) and details.get("cached_tokens") is None:
        usage["prompt_tokens_details"] = {**details, "cached_tokens": hits}
    return usage


def read_completion(raw: bytes, provider: str) -> dict[str, Any]:
    """The canonical ``chat.completion`` from the provider's answer bytes."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        raise unreadable(provider)
    for choice in answer["choices"]:
        if isinstance(choice, dict) and choice.get("finish_reason") in CUT_SHORT:
            raise cut_short(provider)
    usage = answer.get("usage")
    if isinstance(usage, dict):
        normalise_usage(usage)
    return answer
