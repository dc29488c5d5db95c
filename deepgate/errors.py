"""The one error table of deepgate, and its projections.

Every failure a client can see is one of these classes. Each class carries, once, everything the
three faces of the product need: the HTTP status, the OpenAI error ``type`` and ``code``, the
Anthropic error ``type``, and the gRPC status name. The projections are derived from the table:

- ``to_openai()``     -> ``{"error": {"message", "type", "param", "code"}}`` (OpenAI routes)
- ``to_anthropic()``  -> ``{"type": "error", "error": {"type", "message"}}`` (``/v1/messages``)
- ``grpc_code`` and ``from_grpc_code()`` -> the gRPC status and back to the same class

The tree::

    DeepgateError                      500  api_error              INTERNAL
    ├── InvalidRequest                 400  invalid_request_error  INVALID_ARGUMENT
    │   ├── ContextLengthExceeded      400  code context_length_exceeded
    │   └── ContentPolicyViolation     400  code content_policy_violation
    ├── AuthenticationFailed           401  authentication_error   UNAUTHENTICATED
    ├── PermissionDenied               403  permission_error       PERMISSION_DENIED
    ├── NotFound                       404  not_found_error        NOT_FOUND
    ├── PayloadTooLarge                413  request_too_large      OUT_OF_RANGE
    ├── RateLimited                    429  rate_limit_error       RESOURCE_EXHAUSTED
    ├── InternalError                  500  api_error              INTERNAL
    ├── UpstreamError                  502  api_error              UNKNOWN
    ├── ServiceUnavailable             503  overloaded_error       UNAVAILABLE
    └── GatewayTimeout                 504  timeout_error          DEADLINE_EXCEEDED

Messages must say what went wrong and how to fix it, and must never echo a prompt or a secret.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class DeepgateError(Exception):
    """Base of every error a client can see."""

    status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "api_error"
    anthropic_type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = "internal_error"
    grpc_code: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        # A provider's own error text: kept off client responses unless the operator opts in.
        self.provider_detail: str | None = None

    def to_openai(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_anthropic(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}

    def http_headers(self) -> dict[str, str]:
        """Headers a client needs with this error (``Retry-After`` on 429/503, extras)."""
        out = dict(self.headers)
        if self.retry_after is not None:
            # Whole seconds, rounded up: a client must not come back before it may.
            out["retry-after"] = str(max(0, math.ceil(self.retry_after)))
        return out


class InvalidRequest(DeepgateError):
    status = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    default_code: ClassVar[str | None] = None
    grpc_code = "INVALID_ARGUMENT"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class ContentPolicyViolation(InvalidRequest):
    default_code = "content_policy_violation"


class AuthenticationFailed(DeepgateError):
    status = 401
    openai_type = "authentication_error"
    anthropic_type = "authentication_error"
    default_code = "invalid_api_key"
    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(DeepgateError):
    status = 403
    openai_type = "permission_error"
    anthropic_type = "permission_error"
    default_code = "permission_denied"
    grpc_code = "PERMISSION_DENIED"


class NotFound(DeepgateError):
    status = 404
    openai_type = "not_found_error"
    anthropic_type = "not_found_error"
    default_code = "not_found"
    grpc_code = "NOT_FOUND"


class PayloadTooLarge(DeepgateError):
    status = 413
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"
    default_code = "request_too_large"
    grpc_code = "OUT_OF_RANGE"


class RateLimited(DeepgateError):
    status = 429
    openai_type = "rate_limit_error"
    anthropic_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    grpc_code = "RESOURCE_EXHAUSTED"


class InternalError(DeepgateError):
    pass


class UpstreamError(DeepgateError):
    status = 502
    default_code = "upstream_error"
    grpc_code = "UNKNOWN"


class ServiceUnavailable(DeepgateError):
    status = 503
    anthropic_type = "overloaded_error"
    default_code = "service_unavailable"
    grpc_code = "UNAVAILABLE"


class GatewayTimeout(DeepgateError):
    status = 504
    openai_type = "timeout_error"
    anthropic_type = "api_error"
    default_code = "timeout"
    grpc_code = "DEADLINE_EXCEEDED"


# The classes the reverse projections return; for a shared status or gRPC code, the first listed.
TABLE: tuple[type[DeepgateError], ...] = (
    InvalidRequest,
    AuthenticationFailed,
    PermissionDenied,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    InternalError,
    UpstreamError,
    ServiceUnavailable,
    GatewayTimeout,
)
_BY_GRPC: dict[str, type[DeepgateError]] = {}
_BY_STATUS: dict[int, type[DeepgateError]] = {}
for _cls in TABLE:
    _BY_GRPC.setdefault(_cls.grpc_code, _cls)
    _BY_STATUS.setdefault(_cls.status, _cls)

_CODE_CLASSES: dict[str | None, type[DeepgateError]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "content_policy_violation": ContentPolicyViolation,
}


def from_grpc_code(grpc_code: str, message: str, *, code: str | None = None) -> DeepgateError:
    """Rebuild the error a peer raised from its gRPC status name (and our ``code`` detail)."""
    cls = _CODE_CLASSES.get(code) or _BY_GRPC.get(grpc_code, InternalError)
    return cls(message, code=code)


def from_http_status(status: int, message: str, *, code: str | None = None) -> DeepgateError:
    """Rebuild an error from its HTTP status (and our ``code`` detail)."""
    cls = _CODE_CLASSES.get(code) or _BY_STATUS.get(status, InternalError)
    return cls(message, code=code)
