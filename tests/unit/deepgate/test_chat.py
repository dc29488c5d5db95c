"""deepgate.chat: body checks, text slots, the Anthropic -> canonical mapping."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from deepgate.chat import (
    ChatRequest,
    ImagePart,
    TextPart,
    check_chat_body,
    dialect_for_path,
    from_anthropic,
    text_slots,
)
from deepgate.errors import InvalidRequest


def openai_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **extra}


# --- check_chat_body ----------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_check_accepts_a_minimal_body_and_returns_it(dialect: Any) -> None:
    body = openai_body(temperature=0.2, some_future_field={"x": 1})
    assert check_chat_body(body, dialect) is body


def test_check_accepts_content_parts_and_null_content() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
    }
    assert check_chat_body(body, "openai") is body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "", "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0].role"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "robot"}]},
            "messages[1].role",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": {"text": "x"}}]},
            "messages[0].content",
        ),
    ],
)
def test_check_refuses_with_the_param_named(body: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_chat_body(body, "openai")
    assert info.value.param == param
    assert info.value.status == 400
    assert param.split("[")[0].split(".")[0] in info.value.message


@pytest.mark.parametrize("body", [[], "x", None, 3])
def test_check_refuses_a_non_object(body: Any) -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        check_chat_body(body, "openai")


@pytest.mark.parametrize("role", ["system", "developer", "tool"])
def test_anthropic_refuses_openai_only_roles(role: str) -> None:
    body = {"model": "claude", "messages": [{"role": role, "content": "x"}]}
    check_chat_body(copy.deepcopy(body), "openai")
    with pytest.raises(InvalidRequest) as info:
        check_chat_body(body, "anthropic")
    assert info.value.param == "messages[0].role"


def test_anthropic_accepts_system_string_and_list() -> None:
    for system in ("be brief", [{"type": "text", "text": "be brief"}]):
        body = openai_body(system=system)
        assert check_chat_body(body, "anthropic") is body


def test_anthropic_refuses_a_bad_system_naming_it() -> None:
    body = openai_body(system=5)
    with pytest.raises(InvalidRequest) as info:
        check_chat_body(body, "anthropic")
    assert "'system'" in info.value.message
    # Every other refusal names its parameter; a client needs it here too.
    assert info.value.param == "system"


# --- dialect_for_path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/v1/messages", "anthropic"),
        ("/v1/messages/", "anthropic"),
        ("/anthropic/v1/messages", "anthropic"),
        ("/v1/chat/completions", "openai"),
        ("/v1/completions", "openai"),
        ("/", "openai"),
        ("/v1/messages_archive", "openai"),
    ],
)
def test_dialect_for_path(path: str, dialect: str) -> None:
    assert dialect_for_path(path) == dialect


# --- text_slots ---------------------------------------------------------------------------


def test_openai_slots_cover_strings_and_text_parts_in_order() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    {"type": "text", "text": "here"},
                ],
            },
            {"role": "assistant", "content": None},
            {"role": "user", "content": "thanks"},
        ],
    }
    got = [(s.role, s.index, s.text) for s in text_slots(body, "openai")]
    assert got == [
        ("system", 0, "sys"),
        ("user", 1, "look"),
        ("user", 1, "here"),
        ("user", 3, "thanks"),
    ]


def test_anthropic_slots_system_first_then_tool_results() -> None:
    body = {
        "model": "claude",
        "system": "top",
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "plain result"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "t2",
                        "content": [
                            {"type": "text", "text": "block result"},
                            {"type": "image", "source": {"type": "url", "url": "u"}},
                        ],
                    },
                    {"type": "text", "text": "and now?"},
                ],
            },
        ],
    }
    got = [(s.role, s.index, s.text) for s in text_slots(body, "anthropic")]
    assert got == [
        ("system", -1, "top"),
        ("user", 0, "q"),
        ("tool", 2, "plain result"),
        ("tool", 2, "block result"),
        ("user", 2, "and now?"),
    ]


def test_anthropic_system_list_slots() -> None:
    body = {
        "model": "claude",
        "system": [
            {"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "two"},
        ],
        "messages": [{"role": "user", "content": "q"}],
    }
    got = [(s.role, s.index, s.text) for s in text_slots(body, "anthropic")]
    assert got == [("system", -1, "one"), ("system", -1, "two"), ("user", 0, "q")]


def test_openai_dialect_ignores_a_top_level_system() -> None:
    body = openai_body(system="not part of openai")
    assert [s.text for s in text_slots(body, "openai")] == ["hi"]


def test_writing_a_slot_changes_the_body_in_place() -> None:
    body = {
        "model": "claude",
        "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "plain"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "part"},
                    {"type": "tool_result", "tool_use_id": "t", "content": "res"},
                ],
            },
        ],
    }
    for slot in text_slots(body, "anthropic"):
        slot.text = slot.text.upper()
    assert body == {
        "model": "claude",
        "system": [{"type": "text", "text": "SYS", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "PLAIN"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "PART"},
                    {"type": "tool_result", "tool_use_id": "t", "content": "RES"},
                ],
            },
        ],
    }


def test_writing_anthropic_string_system_slot() -> None:
    body = openai_body(system="old")
    slot = next(iter(text_slots(body, "anthropic")))
    slot.text = "new"
    assert body["system"] == "new"


# --- from_anthropic -----------------------------------------------------------------------


def anthropic_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "hello"}],
        **extra,
    }


def test_from_anthropic_basic_fields() -> None:
    req = from_anthropic(
        anthropic_body(
            temperature=0.5,
            top_p=0.9,
            stream=True,
            stop_sequences=["END", "STOP"],
            metadata={"user_id": "u-42"},
        )
    )
    assert req.model == "claude-sonnet-4"
    assert req.max_tokens == 256
    assert req.temperature == 0.5
    assert req.top_p == 0.9
    assert req.stream is True
    assert req.stop == ["END", "STOP"]
    assert req.user == "u-42"
    assert [(m.role, m.content) for m in req.messages] == [("user", "hello")]
    assert req.tools is None
    assert req.tool_choice is None


def test_from_anthropic_system_string_becomes_first_message() -> None:
    req = from_anthropic(anthropic_body(system="be brief"))
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "be brief"),
        ("user", "hello"),
    ]


def test_from_anthropic_system_blocks_are_joined() -> None:
    req = from_anthropic(
        anthropic_body(system=[{"type": "text", "text": "one"}, {"type": "text", "text": "two"}])
    )
    assert req.messages[0].role == "system"
    assert req.messages[0].content == "one\ntwo"


def test_from_anthropic_text_blocks() -> None:
    single = from_anthropic(
        anthropic_body(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    )
    assert single.messages[0].content == "hi"
    multi = from_anthropic(
        anthropic_body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        )
    )
    assert multi.messages[0].text() == "a\nb"


def test_from_anthropic_images_base64_and_url() -> None:
    req = from_anthropic(
        anthropic_body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "compare"},
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/jpeg",
                                "data": "QUJD",
                            },
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://e.x/a.png"}},
                    ],
                }
            ]
        )
    )
    (msg,) = req.messages
    assert msg.role == "user"
    assert isinstance(msg.content, list)
    text, b64, url = msg.content
    assert isinstance(text, TextPart)
    assert text.text == "compare"
    assert isinstance(b64, ImagePart)
    assert b64.image_url.url == "data:image/jpeg;base64,QUJD"
    assert isinstance(url, ImagePart)
    assert url.image_url.url == "https://e.x/a.png"


def test_from_anthropic_tool_use_and_tool_result() -> None:
    req = from_anthropic(
        anthropic_body(
            messages=[
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me check."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Paris", "units": ["c"]},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                        {"type": "text", "text": "and tomorrow?"},
                    ],
                },
            ]
        )
    )
    roles = [m.role for m in req.messages]
    assert roles == ["user", "assistant", "tool", "user"]
    assistant = req.messages[1]
    assert assistant.content == "Let me check."
    assert assistant.tool_calls is not None
    (call,) = assistant.tool_calls
    assert call.id == "toolu_1"
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "units": ["c"]}
    tool = req.messages[2]
    assert tool.tool_call_id == "toolu_1"
    assert tool.content == "18C"
    assert req.messages[3].content == "and tomorrow?"


def test_from_anthropic_tool_use_alone_has_no_content_and_empty_input_is_object() -> None:
    req = from_anthropic(
        anthropic_body(
            messages=[
                {"role": "user", "content": "time?"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t", "name": "now", "input": {}}],
                },
            ]
        )
    )
    msg = req.messages[1]
    assert msg.content is None
    assert msg.tool_calls is not None
    assert json.loads(msg.tool_calls[0].function.arguments) == {}


def test_from_anthropic_tool_result_blocks_become_text() -> None:
    req = from_anthropic(
        anthropic_body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t9",
                            "content": [
                                {"type": "text", "text": "line 1"},
                                {"type": "image", "source": {"type": "url", "url": "u"}},
                                {"type": "text", "text": "line 2"},
                            ],
                        }
                    ],
                }
            ]
        )
    )
    (msg,) = req.messages
    assert msg.role == "tool"
    assert msg.tool_call_id == "t9"
    assert msg.content == "line 1\nline 2"


def test_from_anthropic_tools_and_choices() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"name": "get_weather", "description": "Weather now", "input_schema": schema}]
    req = from_anthropic(anthropic_body(tools=tools, tool_choice={"type": "any"}))
    assert req.tools is not None
    (tool,) = req.tools
    assert tool.type == "function"
    assert tool.function.name == "get_weather"
    assert tool.function.description == "Weather now"
    assert tool.function.parameters == schema
    assert req.tool_choice == "required"

    named = from_anthropic(
        anthropic_body(tools=tools, tool_choice={"type": "tool", "name": "get_weather"})
    )
    assert named.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert from_anthropic(anthropic_body(tool_choice={"type": "auto"})).tool_choice == "auto"
    assert from_anthropic(anthropic_body(tool_choice={"type": "none"})).tool_choice == "none"


def test_from_anthropic_result_serializes_as_openai_body() -> None:
    req = from_anthropic(anthropic_body(system="s", stop_sequences=["x"]))
    dumped = req.model_dump(exclude_none=True)
    assert dumped["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hello"},
    ]
    assert dumped["stop"] == ["x"]
    assert "stop_sequences" not in dumped
    assert "system" not in dumped


def test_from_anthropic_refuses_a_non_anthropic_body() -> None:
    with pytest.raises(InvalidRequest) as info:
        from_anthropic(anthropic_body(messages=[{"role": "system", "content": "x"}]))
    assert info.value.param == "messages[0].role"


def test_from_anthropic_refuses_malformed_blocks_as_invalid_request() -> None:
    # A client error must come back as a 400, not crash the caller with AttributeError.
    with pytest.raises(InvalidRequest):
        from_anthropic(anthropic_body(messages=[{"role": "user", "content": ["just a string"]}]))


# --- ChatRequest --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "budget"),
    [
        ({}, None),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50}, 50),
        ({"max_tokens": 100, "max_completion_tokens": 50}, 50),
    ],
)
def test_output_budget(fields: dict[str, int], budget: int | None) -> None:
    req = ChatRequest.model_validate(openai_body(**fields))
    assert req.output_budget() == budget


def test_chat_request_keeps_unknown_fields() -> None:
    req = ChatRequest.model_validate(openai_body(reasoning_effort="high"))
    assert req.model_dump(exclude_none=True)["reasoning_effort"] == "high"
