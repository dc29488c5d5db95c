"""deepgate-prompt-filter as APISIX meets it: prepared, called, answered over the socket."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from plugins.runner import codec
from tests.integration.conftest import call, chat_body, prepare, run_call, stop_json

PF = "deepgate-prompt-filter"


async def filter_call(
    sock: str, conf: dict[str, Any], body: bytes | None, **kw: Any
) -> codec.HTTPReqCallResp:
    token = await prepare(sock, [(PF, conf)])
    resp, apisix = await run_call(sock, token, body, call(**kw))
    assert apisix.asked.count("body") <= 1
    return resp


def rewritten(resp: codec.HTTPReqCallResp) -> dict[str, Any]:
    assert isinstance(resp.action, codec.Rewrite), resp.action
    return orjson.loads(resp.action.body)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}), "model"),
        (orjson.dumps({"model": "m", "messages": []}), "messages"),
        (
            orjson.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            orjson.dumps({"model": "m", "messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
    ],
)
async def test_not_a_chat_body_is_400(inproc_runner: str, body: bytes, param: str | None) -> None:
    status, err, headers = stop_json(await filter_call(inproc_runner, {}, body))
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param
    assert set(err["error"]) == {"message", "type", "param", "code"}


async def test_body_too_large_is_413(inproc_runner: str) -> None:
    body = chat_body("x" * 2000)
    status, err, _ = stop_json(await filter_call(inproc_runner, {"max_body_bytes": 1000}, body))
    assert status == 413
    assert "1000" in err["error"]["message"]
    resp = await filter_call(inproc_runner, {"max_body_bytes": len(body)}, body)
    assert resp.action is None


async def test_too_many_prompt_tokens(inproc_runner: str) -> None:
    conf = {"max_prompt_tokens": 50}
    status, err, _ = stop_json(await filter_call(inproc_runner, conf, chat_body("word " * 60)))
    assert (status, err["error"]["code"]) == (400, "context_length_exceeded")
    resp = await filter_call(inproc_runner, conf, chat_body("word " * 30))
    assert resp.action is None


async def test_deny_pattern_names_the_rule_never_the_text(inproc_runner: str) -> None:
    conf = {
        "deny_patterns": [
            "(?i)launch\\s+codes",
            {"name": "no-passwords", "pattern": "(?i)password"},
        ]
    }
    status, err, _ = stop_json(
        await filter_call(inproc_runner, conf, chat_body("give me the LAUNCH  codes"))
    )
    assert (status, err["error"]["code"]) == (400, "content_policy_violation")
    assert "deny_patterns[0]" in err["error"]["message"]
    assert "aunch" not in err["error"]["message"]
    _, err, _ = stop_json(await filter_call(inproc_runner, conf, chat_body("my password is x")))
    assert "'no-passwords'" in err["error"]["message"]


async def test_invisible_characters_cannot_split_a_denied_phrase(inproc_runner: str) -> None:
    conf = {"deny_patterns": ["launch codes"]}
    body = chat_body("launch\u200b co\u2060des")
    status, _, _ = stop_json(await filter_call(inproc_runner, conf, body))
    assert status == 400


async def test_allow_patterns_require_a_match(inproc_runner: str) -> None:
    conf = {"allow_patterns": ["(?i)weather"]}
    status, err, _ = stop_json(await filter_call(inproc_runner, conf, chat_body("tell me a joke")))
    assert (status, err["error"]["code"]) == (400, "content_policy_violation")
    resp = await filter_call(inproc_runner, conf, chat_body("what is the weather"))
    assert resp.action is None


async def test_pattern_scope_follows_ai_prompt_guard(inproc_runner: str) -> None:
    history = orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "never reveal the secret"},
                {"role": "user", "content": "secret please"},
                {"role": "assistant", "content": "no"},
                {"role": "user", "content": "ok then, hello"},
            ],
        }
    )
    deny = {"deny_patterns": ["secret"]}
    # default: only the last message, only if it is the user's
    assert (await filter_call(inproc_runner, deny, history)).action is None
    status, _, _ = stop_json(
        await filter_call(inproc_runner, {**deny, "match_all_conversation_history": True}, history)
    )
    assert status == 400


async def test_normalization_rewrites_only_when_something_changed(inproc_runner: str) -> None:
    resp = await filter_call(inproc_runner, {}, chat_body("Ｈｅｌｌｏ\u200b   world\U000e0041!"))
    assert rewritten(resp)["messages"][0]["content"] == "Hello world!"
    assert (await filter_call(inproc_runner, {}, chat_body("Hello world!"))).action is None
    assert (
        await filter_call(inproc_runner, {"normalize": False}, chat_body("a   b"))
    ).action is None


async def test_rewrite_keeps_fields_it_does_not_know(inproc_runner: str) -> None:
    body = chat_body("a   b", temperature=0.2, vendor_extension={"x": [1, 2]}, stream=True)
    out = rewritten(await filter_call(inproc_runner, {}, body))
    assert out["temperature"] == 0.2
    assert out["vendor_extension"] == {"x": [1, 2]}
    assert out["stream"] is True


async def test_prepend_and_append_decorate_openai_bodies(inproc_runner: str) -> None:
    conf = {
        "prepend": [{"role": "system", "content": "Answer in French."}],
        "append": [{"role": "user", "content": "Be brief."}],
    }
    out = rewritten(await filter_call(inproc_runner, conf, chat_body("Hi")))
    assert [m["role"] for m in out["messages"]] == ["system", "user", "user"]
    assert out["messages"][0]["content"] == "Answer in French."
    assert out["messages"][2]["content"] == "Be brief."


async def test_anthropic_bodies_are_normalized_and_decorated(inproc_runner: str) -> None:
    body = orjson.dumps(
        {
            "model": "claude-x",
            "max_tokens": 50,
            "system": "Be\u200b brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi\u200b there"}]}],
        }
    )
    conf = {"prepend": [{"role": "system", "content": "House rules."}]}
    out = rewritten(await filter_call(inproc_runner, conf, body, path="/v1/messages"))
    assert out["system"] == "House rules.\n\nBe brief"
    assert out["messages"][0]["content"][0]["text"] == "Hi there"
    assert out["max_tokens"] == 50


async def test_anthropic_errors_use_the_anthropic_shape(inproc_runner: str) -> None:
    status, err, _ = stop_json(await filter_call(inproc_runner, {}, b"{bad", path="/v1/messages"))
    assert status == 400
    assert err == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": err["error"]["message"]},
    }


async def test_templates_fill_placeholders_from_the_request(inproc_runner: str) -> None:
    conf = {
        "templates": [
            {
                "name": "explain",
                "template": {
                    "model": "deepseek-chat",
                    "messages": [
                        {"role": "system", "content": "You explain {{ topic }} to a {{level}}."},
                        {"role": "user", "content": "Explain {{topic}}."},
                    ],
                },
            }
        ]
    }
    body = orjson.dumps(
        {"template_name": "explain", "topic": "tides", "level": "child", "stream": True}
    )
    out = rewritten(await filter_call(inproc_runner, conf, body))
    assert out == {
        "stream": True,
        "model": "deepseek-chat",
        "messages": [
            {"role": "system", "content": "You explain tides to a child."},
            {"role": "user", "content": "Explain tides."},
        ],
    }
    status, err, _ = stop_json(
        await filter_call(
            inproc_runner, conf, orjson.dumps({"template_name": "explain", "topic": "x"})
        )
    )
    assert (status, err["error"]["param"]) == (400, "level")
    status, err, _ = stop_json(
        await filter_call(inproc_runner, conf, orjson.dumps({"template_name": "nope"}))
    )
    assert (status, err["error"]["param"]) == (400, "template_name")


async def test_get_requests_pass_without_a_body(inproc_runner: str) -> None:
    token = await prepare(inproc_runner, [(PF, {"max_prompt_tokens": 5})])
    resp, apisix = await run_call(
        inproc_runner, token, None, call(path="/v1/models", method=codec.Method.GET)
    )
    assert resp.action is None
    assert apisix.asked == []
