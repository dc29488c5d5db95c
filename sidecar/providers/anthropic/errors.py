"""The anthropic SDK's errors as deepgate's, by exception type and HTTP status only.

Message text is never matched: Anthropic rewords it freely. What the client sees names the provider
and what to do; Anthropic's own message goes on ``provider_detail`` for the logs of whoever runs
the gateway, never into a response (it can quote the request).

An ``error`` event inside a stream reaches us as an ``APIStatusError`` whose HTTP status is the
stream's 200; only the event's structured ``error.type`` then says what happened.
"""

from __future__ import annotations

import email.utils
import time

import anthropic
import httpx2

from deepgate.errors import (
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

# The attribute the original provider message travels on (see the report on deepgate.errors).
DETAIL_ATTR = "provider_detail"

_STREAM_ERROR_STATUS = {"overloaded_error": 529, "api_error": 500, "rate_limit_error": 429}


def _with_detail(err: DeepgateError, detail: str | None) -> DeepgateError:
    setattr(err, DETAIL_ATTR, detail)
    return err


def map_error(exc: anthropic.AnthropicError | httpx2.HTTPError) -> DeepgateError:
    """The deepgate error for a failed Anthropic call (before or during its stream)."""
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return GatewayTimeout(
            "anthropic did not answer within the time allowed. Retry, or raise the timeout for "
            "this route if long answers are expected."
        )
    if isinstance(exc, anthropic.APIConnectionError):
        return UpstreamError(
            "Could not connect to anthropic. Check the provider's base URL and the network.",
            code=PROVIDER_UNREACHABLE,
        )
    if isinstance(exc, httpx2.HTTPError):
        # Transport errors while reading a stream are not wrapped by the SDK.
        return UpstreamError(
            "The connection to anthropic broke before the answer was complete. Retry the request.",
            code=PROVIDER_STREAM_BROKEN,
        )
    if isinstance(exc, anthropic.APIStatusError):
        return _with_detail(_by_status(exc), exc.api_message)
    return UpstreamError(
        "anthropic sent an answer deepgate could not read. Retry the request.",
        code=PROVIDER_ERROR,
    )


def _by_status(exc: anthropic.APIStatusError) -> DeepgateError:
    status = exc.status_code
    in_stream = status < 400
    if in_stream:
        status = _STREAM_ERROR_STATUS.get(str(exc.type), 0)
    if status in (400, 422):
        return InvalidRequest(
            "anthropic rejected the request as invalid. Check the messages, tools and parameters "
            "against what Anthropic's Messages API accepts."
        )
    if status == 413:
        return PayloadTooLarge(
            "The request is too large for anthropic. Send fewer or smaller messages or images."
        )
    if status in (401, 402, 403):
        return UpstreamError(
            f"anthropic refused the gateway's credentials (HTTP {status}). The operator must "
            "check the Anthropic API key and its account.",
            code=PROVIDER_AUTH,
        )
    if status == 404:
        return UpstreamError(
            "anthropic does not know the model this route asks for. The operator must check the "
            "model name in the route's target.",
            code=PROVIDER_NOT_FOUND,
        )
    if status == 429:
        return RateLimited(
            "anthropic is rate-limiting the gateway. Retry after the time given.",
            retry_after=retry_after(exc.response.headers),
        )
    if status == 408:
        return GatewayTimeout("anthropic timed out handling the request. Retry the request.")
    if in_stream:
        # overloaded_error and api_error are the provider's 5xx, told after the 200.
        code = PROVIDER_ERROR if status >= 500 else PROVIDER_STREAM_BROKEN
        return UpstreamError(
            "anthropic ended the stream with an error before the answer was complete. "
            "Retry the request.",
            code=code,
        )
    if status >= 500:
        return UpstreamError(
            f"anthropic failed to answer (HTTP {status}). Retry the request; another provider "
            "may serve it meanwhile.",
            code=PROVIDER_ERROR,
        )
    return UpstreamError(
        f"anthropic answered with an unexpected HTTP {status}. Retry the request.",
        code=PROVIDER_ERROR,
    )


def retry_after(headers: httpx2.Headers, *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` in seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
