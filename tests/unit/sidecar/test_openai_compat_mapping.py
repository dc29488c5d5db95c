"""The OpenAI-compatible adapter's pure mappings: request, usage, answers, SSE, errors."""

from __future__ import annotations

import copy
import email.utils
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest

from deepgate.errors import (
    ContentPolicyViolation,
    ContextLengthExceeded,
    GatewayTimeout,
    InvalidRequest,
    UpstreamError,
)
from sidecar.providers.base import (
    PROVIDER_AUTH,
    PROVIDER_ERROR,
    PROVIDER_STREAM_BROKEN,
    PROVIDER_UNREACHABLE,
)
from sidecar.providers.openai_compat.errors import map_error, retry_after_s
from sidecar.providers.openai_compat.request import DIALECTS, PLAIN, to_provider_request
from sidecar.providers.openai_compat.response import normalise_usage, read_completion
from sidecar.providers.openai_compat.stream import read_chunk, sse_data

OPENAI, DEEPSEEK = DIALECTS["openai"], DIALECTS["deepseek"]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "alias", "messages": [{"role": "user", "content": "hi"}], **extra}


# --- request ------------------------------------------------------------------------------------


def test_model_is_the_targets_and_unknown_fields_stay() -> None:
    out = to_provider_request(body(x_new={"a": 1}, seed=3), "gpt-4.1", PLAIN, stream=False)
    assert out == {**body(x_new={"a": 1}, seed=3), "model": "gpt-4.1"}


def test_stream_always_asks_for_usage_and_keeps_other_stream_options() -> None:
    given = body(stream_options={"include_usage": False, "include_obfuscation": False})
    out = to_provider_request(given, "m", PLAIN, stream=True)
    assert out["stream"] is True
    assert out["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert given["stream_options"] == {"include_usage": False, "include_obfuscation": False}


def test_unstreamed_drops_stream_and_stream_options() -> None:
    out = to_provider_request(
        body(stream=True, stream_options={"include_usage": True}), "m", PLAIN, stream=False
    )
    assert "stream" not in out
    assert "stream_options" not in out


@pytest.mark.parametrize(
    ("given", "dialect", "expected"),
    [
        ({"max_tokens": 10}, OPENAI, {"max_completion_tokens": 10}),
        ({"max_completion_tokens": 10}, OPENAI, {"max_completion_tokens": 10}),
        ({"max_completion_tokens": 10}, DEEPSEEK, {"max_tokens": 10}),
        ({"max_tokens": 5, "max_completion_tokens": 10}, DEEPSEEK, {"max_tokens": 10}),
        ({"max_tokens": 5, "max_completion_tokens": None}, DEEPSEEK, {"max_tokens": 5}),
        ({"max_tokens": None}, DEEPSEEK, {}),
        (
            {"max_tokens": 5, "max_completion_tokens": 10},
            PLAIN,
            {"max_tokens": 5, "max_completion_tokens": 10},
        ),
        ({}, DEEPSEEK, {}),
    ],
)
def test_output_limit_goes_in_the_field_the_provider_honours(
    given: dict[str, Any], dialect: Any, expected: dict[str, Any]
) -> None:
    out = to_provider_request(body(**given), "m", dialect, stream=False)
    limits = {k: v for k, v in out.items() if k in ("max_tokens", "max_completion_tokens")}
    assert limits == expected


def test_developer_becomes_system_for_deepseek_only_and_nothing_is_mutated() -> None:
    developer = {"role": "developer", "content": "Be brief.", "name": "ops"}
    user = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    given = body(messages=[developer, user])
    before = copy.deepcopy(given)

    out = to_provider_request(given, "m", DEEPSEEK, stream=False)

    assert out["messages"] == [{**developer, "role": "system"}, user]
    assert out["messages"][1] is user  # untouched messages are not copied
    assert given == before
    assert to_provider_request(given, "m", OPENAI, stream=False)["messages"] == [developer, user]


def test_no_developer_message_keeps_the_same_list() -> None:
    given = body()
    assert to_provider_request(given, "m", DEEPSEEK, stream=False)["messages"] is given["messages"]


# --- answers ------------------------------------------------------------------------------------


def test_deepseek_cache_hits_become_cached_tokens() -> None:
    usage = {"prompt_tokens": 100, "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}
    assert normalise_usage(usage)["prompt_tokens_details"] == {"cached_tokens": 64}
    assert usage["prompt_cache_hit_tokens"] == 64  # DeepSeek's own fields stay


def test_cached_tokens_the_provider_reported_win() -> None:
    usage = {"prompt_cache_hit_tokens": 64, "prompt_tokens_details": {"cached_tokens": 60}}
    assert normalise_usage(usage)["prompt_tokens_details"] == {"cached_tokens": 60}
    usage = {"prompt_cache_hit_tokens": 64, "prompt_tokens_details": {"audio_tokens": 0}}
    assert normalise_usage(usage)["prompt_tokens_details"] == {
        "audio_tokens": 0,
        "cached_tokens": 64,
    }


def test_usage_without_cache_fields_is_left_alone() -> None:
    assert normalise_usage({"prompt_tokens": 3}) == {"prompt_tokens": 3}


@pytest.mark.parametrize("raw", [b"", b"<html>", b"[]", b'{"id": "x"}', b'{"choices": {}}'])
def test_an_answer_that_is_not_a_completion_is_unreadable(raw: bytes) -> None:
    with pytest.raises(UpstreamError) as info:
        read_completion(raw, "openai")
    assert info.value.code == PROVIDER_ERROR
    assert "'openai'" in info.value.message


def test_a_completion_cut_short_for_capacity_is_an_error() -> None:
    raw = b'{"choices": [{"index": 0, "finish_reason": "insufficient_system_resource"}]}'
    with pytest.raises(UpstreamError) as info:
        read_completion(raw, "deepseek")
    assert info.value.code == PROVIDER_ERROR


# --- stream -------------------------------------------------------------------------------------


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def data_of(*parts: bytes) -> list[bytes]:
    return [d async for d in sse_data(chunks_of(*parts))]


async def test_events_split_across_reads() -> None:
    assert await data_of(b'data: {"a"', b":1}\n", b"\ndata: [DO", b"NE]\n\n") == [
        b'{"a":1}',
        b"[DONE]",
    ]


async def test_crlf_comments_and_multiline_data() -> None:
    stream = (
        b': keep-alive\r\n\r\nevent: message\r\nid: 7\r\ndata:{"a":\r',
        b"\ndata: 1}\r\n\r\n",
    )
    assert await data_of(*stream) == [b'{"a":\n1}']


async def test_an_event_cut_off_by_the_end_is_dropped() -> None:
    assert await data_of(b'data: 1\n\ndata: {"trunc') == [b"1"]


def test_chunk_finishing_and_usage() -> None:
    chunk, finishes = read_chunk(
        b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],'
        b' "usage": {"prompt_cache_hit_tokens": 5}}',
        "deepseek",
    )
    assert finishes
    assert chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 5}
    _, finishes = read_chunk(b'{"choices": [{"index": 0, "delta": {"content": "x"}}]}', "x")
    assert not finishes
    _, finishes = read_chunk(b'{"choices": [], "usage": {"total_tokens": 3}}', "x")
    assert not finishes


def test_an_error_event_breaks_the_stream_with_the_providers_words() -> None:
    with pytest.raises(UpstreamError) as info:
        read_chunk(b'{"error": {"message": "overloaded", "type": "server_error"}}', "openai")
    assert info.value.code == PROVIDER_STREAM_BROKEN
    assert info.value.provider_detail == "overloaded"
    assert "overloaded" not in info.value.message


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1]", b'{"choices": [{"finish_reason": "insufficient_system_resource"}]}'],
)
def test_unreadable_or_cut_short_chunks(data: bytes) -> None:
    with pytest.raises(UpstreamError):
        read_chunk(data, "deepseek")


# --- errors -------------------------------------------------------------------------------------

NOW = 1_754_640_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "tomorrow"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(httpx2.Headers(headers), now=NOW) == expected


def status_error(status: int, body: object, headers: dict[str, str] | None = None) -> Exception:
    request = httpx2.Request("POST", "https://api.example.com/v1/chat/completions")
    response = httpx2.Response(status, headers=headers, request=request)
    client = openai.AsyncOpenAI(api_key="k", base_url="https://api.example.com/v1")
    return client._make_status_error(f"Error code: {status}", body=body, response=response)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("context_length_exceeded", ContextLengthExceeded),
        ("content_policy_violation", ContentPolicyViolation),
        ("invalid_type", InvalidRequest),
        (None, InvalidRequest),
    ],
)
def test_400_classes_follow_the_code_field(code: str | None, cls: type[InvalidRequest]) -> None:
    exc = status_error(400, {"error": {"message": "m", "type": "t", "param": "p", "code": code}})
    assert isinstance(exc, openai.APIStatusError)
    err = map_error(exc, "openai", "gpt-4.1")
    assert type(err) is cls
    assert err.param == "p"


@pytest.mark.parametrize(
    ("status", "code"), [(402, PROVIDER_AUTH), (409, PROVIDER_ERROR), (418, PROVIDER_ERROR)]
)
def test_other_statuses(status: int, code: str) -> None:
    exc = status_error(status, {"error": {"message": "m"}})
    assert isinstance(exc, openai.APIStatusError)
    err = map_error(exc, "deepseek", "deepseek-chat")
    assert isinstance(err, UpstreamError)
    assert err.code == code
    assert err.provider_detail == "m"


def test_transport_errors() -> None:
    request = httpx2.Request("POST", "https://api.example.com/v1/chat/completions")
    timeout = map_error(openai.APITimeoutError(request), "openai", "m")
    assert isinstance(timeout, GatewayTimeout)
    assert timeout.provider_detail is None
    refused = map_error(openai.APIConnectionError(request=request), "openai", "m")
    assert isinstance(refused, UpstreamError)
    assert refused.code == PROVIDER_UNREACHABLE
