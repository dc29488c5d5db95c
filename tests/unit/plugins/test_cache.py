"""deepgate-cache's config rules and how a cached answer is replayed to each kind of client."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from deepgate import response_cache as rc
from plugins.base import RequestContext
from plugins.cache import Config, bypass_reason, replay
from plugins.runner import codec

TOOL_ANSWER = {
    "id": "chatcmpl-t",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "deepseek-chat",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
}
ENTRY = rc.CacheEntry(TOOL_ANSWER, "deepseek:deepseek-chat", 0.0)


async def _no_ask(info: codec.ExtraInfo) -> bytes | None:
    raise AssertionError("nothing should be asked of APISIX here")


def ctx(path: str = "/v1/chat/completions", **headers: str) -> RequestContext:
    call = codec.HTTPReqCallReq(
        id=1, conf_token=1, method=codec.Method.POST, path=path, headers=list(headers.items())
    )
    return RequestContext(call, _no_ask)


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_defaults_are_the_documented_ones() -> None:
    conf = Config()
    assert (conf.scope, conf.ttl_s, conf.on_error) == ("consumer", 3600, "open")
    assert conf.redis_url == "$env://DEEPGATE_REDIS_URL"
    assert conf.max_temperature == 1.0
    assert conf.semantic is None


@pytest.mark.parametrize(
    "bad",
    [
        {"ttl_s": -1},
        {"redis_url": "http://redis:6379"},
        {"tools": "sometimes"},
        {"semantic": {"collection": "Bad Name"}},
        {"semantic": {"threshold": 0}},
        {"semantic": {"extra": 1}},
    ],
)
def test_bad_configs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Config.model_validate(bad)


def test_secret_references_are_accepted() -> None:
    for ref in ("$env://X", "$file:///run/secrets/redis", "$vault://secret/r#url", "rediss://h"):
        assert Config.model_validate({"redis_url": ref}).redis_url == ref
    semantic = Config.model_validate({"semantic": {"store": "$env://DEEPGATE_VECTOR_DSN"}})
    assert semantic.semantic is not None


@pytest.mark.parametrize(
    ("request_body", "headers", "reason"),
    [
        (body(), {}, None),
        (body(), {"cache-control": "No-Cache"}, "cache-control"),
        (body(temperature=1.0), {}, None),
        (body(temperature=1.01), {}, "temperature"),
        (body(n=1), {}, None),
        (body(n=3), {}, "n"),
    ],
)
def test_bypass_reasons(
    request_body: dict[str, Any], headers: dict[str, str], reason: str | None
) -> None:
    assert bypass_reason(ctx(**headers), request_body, Config()) == reason


def test_masked_personal_data_bypasses() -> None:
    c = ctx()
    c.facts["restore"] = {"[EMAIL_ADDRESS_1]": "jane@example.com"}
    assert bypass_reason(c, body(), Config()) == "personal-data"


def test_openai_json_replay_is_the_cached_completion() -> None:
    stop = replay(ctx(), body(), ENTRY, "hit-exact")
    assert stop.status == 200
    assert (rc.HEADER, "hit-exact") in stop.headers
    assert orjson.loads(stop.body) == TOOL_ANSWER


def test_openai_stream_replay_carries_tool_calls() -> None:
    stop = replay(ctx(), body(stream=True), ENTRY, "hit-semantic")
    assert ("content-type", "text/event-stream") in stop.headers
    events = [e for e in stop.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    calls = [
        call for c in chunks for ch in c["choices"] for call in ch["delta"].get("tool_calls", [])
    ]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_replays_carry_tool_use_blocks() -> None:
    path = "/v1/messages"
    message = orjson.loads(replay(ctx(path), body(max_tokens=10), ENTRY, "hit-exact").body)
    assert [b["type"] for b in message["content"]] == ["text", "tool_use"]
    assert message["content"][1]["input"] == {"city": "Paris"}
    assert message["stop_reason"] == "tool_use"
    streamed = replay(ctx(path), body(max_tokens=10, stream=True), ENTRY, "hit-exact").body
    assert b'"partial_json":"{\\"city\\": \\"Paris\\"}"' in streamed
    assert b'"stop_reason":"tool_use"' in streamed
    assert streamed.rstrip().endswith(b'data: {"type":"message_stop"}')
