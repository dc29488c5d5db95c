"""SDK errors and broken answers to deepgate errors, by exception type and HTTP status only.

Messages say which provider failed and what to do; they never carry the provider's own text, which
may quote the request. That text goes on the error as ``provider_detail``, for a face that is
configured to show it. A status error is raised without its SDK cause for the same reason: the
SDK's exception text is the provider's body, and tracebacks end up in logs.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from datetime import UTC

import openai

from deepgate.errors import (
    ContentPolicyViolation,
    ContextLengthExceeded,
    DeepgateError,
    GatewayTimeout,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    UpstreamError,
)
from sidecar.providers.base import (
    PROVIDER_AUTH,
    PROVIDER_ERROR,
    PROVIDER_NOT_FOUND,
    PROVIDER_STREAM_BROKEN,
    PROVIDER_UNREACHABLE,
)

# 400s whose ``code`` field (structured, not message text) names one of our finer classes.
_INVALID_BY_CODE: dict[str | None, type[InvalidRequest]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "content_policy_violation": ContentPolicyViolation,
}


def map_error(exc: openai.OpenAIError, provider: str, model: str) -> DeepgateError:
    """Our error for an SDK error."""
    if isinstance(exc, openai.APIStatusError):
        err = _status_error(exc, provider, model)
        err.provider_detail = detail(exc.body)
        return err
    if isinstance(exc, openai.APITimeoutError):  # before its base, APIConnectionError
        return GatewayTimeout(
            f"Provider '{provider}' did not answer in time. Retry, or give the route a longer "
            "timeout."
        )
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamError(
            f"Could not connect to provider '{provider}'. Check its base_url and the network path "
            "to it.",
            code=PROVIDER_UNREACHABLE,
        )
    return unreadable(provider)


def _status_error(exc: openai.APIStatusError, provider: str, model: str) -> DeepgateError:
    status = exc.status_code
    said = f"Provider '{provider}' answered HTTP {status}"
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        cls = _INVALID_BY_CODE.get(exc.code, InvalidRequest)
        return cls(f"{said}: it refuses this request as invalid. Fix the request.", param=exc.param)
    if status == 413:
        return PayloadTooLarge(f"{said}: the request is too large. Send less, or smaller images.")
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return UpstreamError(
            f"{said}: it refuses deepgate's credentials. Check the API key configured for it.",
            code=PROVIDER_AUTH,
        )
    if status == 402:  # DeepSeek: the account's balance is spent; like a refused key
        return UpstreamError(f"{said}: top up the provider account.", code=PROVIDER_AUTH)
    if isinstance(exc, openai.NotFoundError):
        return UpstreamError(
            f"{said}: it does not serve model '{model}'. Check the model in the route's targets.",
            code=PROVIDER_NOT_FOUND,
        )
    retry_after = retry_after_s(exc.response.headers)
    if isinstance(exc, openai.RateLimitError):
        when = "later" if retry_after is None else f"in {math.ceil(retry_after)}s"
        return RateLimited(f"{said}: rate limited. Retry {when}.", retry_after=retry_after)
    return UpstreamError(
        f"{said}. Retry, or route to another provider.",
        code=PROVIDER_ERROR,
        retry_after=retry_after,
    )


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait: ``retry-after-ms``, else ``Retry-After`` in seconds or as an HTTP-date."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if not value:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if name != "retry-after":
                continue
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                continue
            if when.tzinfo is None:  # "-0000": an HTTP-date is GMT all the same
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - (time.time() if now is None else now)
        if math.isfinite(seconds):  # float() reads "inf" and "nan" too
            return max(0.0, seconds)
    return None


def detail(body: object) -> str | None:
    """The provider's own message: its ``error.message``, or the start of a non-JSON body."""
    if isinstance(body, dict):
        message = body.get("message")
        return message if isinstance(message, str) else None
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return None


def cause(exc: openai.OpenAIError) -> BaseException | None:
    """What to chain a mapped error to: nothing for a status error (see the module docstring)."""
    return None if isinstance(exc, openai.APIStatusError) else exc


def unreadable(provider: str) -> UpstreamError:
    return UpstreamError(
        f"Provider '{provider}' sent an answer deepgate cannot read. Retry, or route to another "
        "provider.",
        code=PROVIDER_ERROR,
    )


def cut_short(provider: str) -> UpstreamError:
    return UpstreamError(
        f"Provider '{provider}' stopped its answer early for lack of capacity. Retry, or route to "
        "another provider.",
        code=PROVIDER_ERROR,
    )


def broken(provider: str) -> UpstreamError:
    return UpstreamError(
        f"Provider '{provider}' ended its stream before finishing the answer. Retry the request.",
        code=PROVIDER_STREAM_BROKEN,
    )


def failed_mid_stream(provider: str, provider_detail: str | None) -> UpstreamError:
    err = UpstreamError(
        f"Provider '{provider}' reported an error in the middle of its answer. Retry the request.",
        code=PROVIDER_STREAM_BROKEN,
    )
    err.provider_detail = provider_detail
    return err
