"""The error table and its three projections (OpenAI body, Anthropic body, gRPC status)."""

from __future__ import annotations

import pytest

from deepgate import errors
from deepgate.errors import (
    AuthenticationFailed,
    ContentPolicyViolation,
    ContextLengthExceeded,
    DeepgateError,
    GatewayTimeout,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    from_grpc_code,
)

# class, HTTP status, OpenAI type, Anthropic type, default code, gRPC status
TABLE: list[tuple[type[DeepgateError], int, str, str, str | None, str]] = [
    (DeepgateError, 500, "api_error", "api_error", "internal_error", "INTERNAL"),
    (
        InvalidRequest,
        400,
        "invalid_request_error",
        "invalid_request_error",
        None,
        "INVALID_ARGUMENT",
    ),
    (
        ContextLengthExceeded,
        400,
        "invalid_request_error",
        "invalid_request_error",
        "context_length_exceeded",
        "INVALID_ARGUMENT",
    ),
    (
        ContentPolicyViolation,
        400,
        "invalid_request_error",
        "invalid_request_error",
        "content_policy_violation",
        "INVALID_ARGUMENT",
    ),
    (
        AuthenticationFailed,
        401,
        "authentication_error",
        "authentication_error",
        "invalid_api_key",
        "UNAUTHENTICATED",
    ),
    (
        PermissionDenied,
        403,
        "permission_error",
        "permission_error",
        "permission_denied",
        "PERMISSION_DENIED",
    ),
    (NotFound, 404, "not_found_error", "not_found_error", "not_found", "NOT_FOUND"),
    (
        PayloadTooLarge,
        413,
        "invalid_request_error",
        "request_too_large",
        "request_too_large",
        "OUT_OF_RANGE",
    ),
    (
        RateLimited,
        429,
        "rate_limit_error",
        "rate_limit_error",
        "rate_limit_exceeded",
        "RESOURCE_EXHAUSTED",
    ),
    (InternalError, 500, "api_error", "api_error", "internal_error", "INTERNAL"),
    (UpstreamError, 502, "api_error", "api_error", "upstream_error", "UNKNOWN"),
    (
        ServiceUnavailable,
        503,
        "api_error",
        "overloaded_error",
        "service_unavailable",
        "UNAVAILABLE",
    ),
    (GatewayTimeout, 504, "timeout_error", "api_error", "timeout", "DEADLINE_EXCEEDED"),
]

ALL = [row[0] for row in TABLE]
ids = [cls.__name__ for cls in ALL]


def test_the_table_covers_every_public_error_class() -> None:
    public = {
        obj
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, DeepgateError) and not name.startswith("_")
    }
    assert public == set(ALL)


@pytest.mark.parametrize(("cls", "status", "oai", "anth", "code", "grpc"), TABLE, ids=ids)
def test_class_carries_its_row(
    cls: type[DeepgateError], status: int, oai: str, anth: str, code: str | None, grpc: str
) -> None:
    err = cls("something went wrong")
    assert err.status == status
    assert err.openai_type == oai
    assert err.anthropic_type == anth
    assert err.code == code
    assert err.grpc_code == grpc
    assert str(err) == "something went wrong"
    assert isinstance(err, DeepgateError)


def test_subclasses_of_invalid_request_are_invalid_requests() -> None:
    assert issubclass(ContextLengthExceeded, InvalidRequest)
    assert issubclass(ContentPolicyViolation, InvalidRequest)
    assert not issubclass(PayloadTooLarge, InvalidRequest)


@pytest.mark.parametrize(("cls", "status", "oai", "anth", "code", "grpc"), TABLE, ids=ids)
def test_to_openai_has_exactly_the_openai_shape(
    cls: type[DeepgateError], status: int, oai: str, anth: str, code: str | None, grpc: str
) -> None:
    body = cls("Bad thing. Fix it.", param="messages").to_openai()
    assert body == {
        "error": {"message": "Bad thing. Fix it.", "type": oai, "param": "messages", "code": code}
    }
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_to_openai_keeps_param_and_code_keys_when_null() -> None:
    body = InvalidRequest("The request body must be a JSON object.").to_openai()
    assert body == {
        "error": {
            "message": "The request body must be a JSON object.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_explicit_code_overrides_the_default() -> None:
    err = RateLimited("Too many tokens.", code="tokens_per_minute")
    assert err.to_openai()["error"]["code"] == "tokens_per_minute"
    assert err.code == "tokens_per_minute"


@pytest.mark.parametrize(("cls", "status", "oai", "anth", "code", "grpc"), TABLE, ids=ids)
def test_to_anthropic_shape(
    cls: type[DeepgateError], status: int, oai: str, anth: str, code: str | None, grpc: str
) -> None:
    assert cls("Nope.", param="x").to_anthropic() == {
        "type": "error",
        "error": {"type": anth, "message": "Nope."},
    }


def test_http_headers_retry_after_in_whole_seconds() -> None:
    assert RateLimited("slow down", retry_after=7).http_headers() == {"retry-after": "7"}
    assert ServiceUnavailable("busy", retry_after=2.6).http_headers() == {"retry-after": "3"}
    assert RateLimited("slow down", retry_after=-5).http_headers() == {"retry-after": "0"}


def test_http_headers_without_retry_after_is_empty() -> None:
    assert RateLimited("slow down").http_headers() == {}
    assert InvalidRequest("bad").http_headers() == {}


def test_http_headers_keeps_extras_and_is_a_copy() -> None:
    extra = {"x-ratelimit-remaining-requests": "0"}
    err = RateLimited("slow down", retry_after=1, headers=extra)
    out = err.http_headers()
    assert out == {"x-ratelimit-remaining-requests": "0", "retry-after": "1"}
    out["mutated"] = "yes"
    extra["later"] = "yes"
    assert err.http_headers() == {"x-ratelimit-remaining-requests": "0", "retry-after": "1"}


# Classes that own their gRPC code: from_grpc_code must give back exactly this class.
ROUND_TRIP = [
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
]


@pytest.mark.parametrize("cls", ROUND_TRIP, ids=[c.__name__ for c in ROUND_TRIP])
def test_from_grpc_code_round_trip(cls: type[DeepgateError]) -> None:
    sent = cls("The peer said no.")
    back = from_grpc_code(sent.grpc_code, sent.message, code=sent.code)
    assert type(back) is cls
    assert back.message == "The peer said no."
    assert back.code == sent.code
    assert back.status == sent.status
    assert back.to_openai() == sent.to_openai()


@pytest.mark.parametrize("cls", ROUND_TRIP, ids=[c.__name__ for c in ROUND_TRIP])
def test_from_grpc_code_without_code_detail_gives_the_class_default(
    cls: type[DeepgateError],
) -> None:
    back = from_grpc_code(cls.grpc_code, "m")
    assert type(back) is cls
    assert back.code == cls.default_code


@pytest.mark.parametrize("cls", [ContextLengthExceeded, ContentPolicyViolation])
def test_from_grpc_code_picks_code_specific_classes(cls: type[DeepgateError]) -> None:
    sent = cls("Too long.")
    back = from_grpc_code(sent.grpc_code, sent.message, code=sent.code)
    assert type(back) is cls
    assert back.to_openai() == sent.to_openai()


def test_from_grpc_code_keeps_a_custom_code_on_the_status_class() -> None:
    back = from_grpc_code("INVALID_ARGUMENT", "bad temperature", code="invalid_value")
    assert type(back) is InvalidRequest
    assert back.code == "invalid_value"


def test_from_grpc_code_unknown_status_is_internal() -> None:
    back = from_grpc_code("DATA_LOSS", "lost")
    assert type(back) is InternalError
    assert back.status == 500
