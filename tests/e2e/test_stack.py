"""End to end: the official SDKs against the whole stack on 127.0.0.1, as a user runs it.

Order matters only for the last tests (the runner is killed, then the stack is stopped).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import anthropic
import openai
import pytest

from tests.e2e.conftest import KEY, Stack

HI = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def client(stack: Stack, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_sdk_sync(stack: Stack) -> None:
    with client(stack) as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
    completion = raw.parse()
    assert "deepseek" in (completion.choices[0].message.content or "")
    assert raw.headers["x-deepgate-route"] == "deepseek:deepseek-chat"
    assert raw.headers.get("x-request-id")
    received = stack.fakes.deepseek.received[-1]
    assert KEY not in str(received.headers)  # the client's key never reaches a provider
    assert received.headers["Authorization"] == "Bearer sk-fake-deepseek"


def test_openai_sdk_sync_stream_and_tools(stack: Stack) -> None:
    with client(stack) as oa:
        stream = oa.chat.completions.create(model="deepseek-chat", messages=HI, stream=True)  # type: ignore[arg-type]
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        tools = oa.chat.completions.create(
            model="deepseek-chat",
            messages=HI,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
        )
    assert "deepseek" in text
    calls = tools.choices[0].message.tool_calls
    assert calls
    assert calls[0].function.name


def test_openai_sdk_async_stream(stack: Stack) -> None:
    async def go() -> str:
        async with openai.AsyncOpenAI(
            base_url=f"{stack.base}/v1", api_key=KEY, max_retries=0
        ) as oa:
            stream = await oa.chat.completions.create(
                model="deepseek-chat",
                messages=HI,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
        assert chunks[-1].usage is not None
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert "deepseek" in asyncio.run(go())


def test_anthropic_sdk(stack: Stack) -> None:
    with anthropic.Anthropic(base_url=stack.base, api_key=KEY, max_retries=0) as an:
        message = an.messages.create(model="deepseek-chat", max_tokens=50, messages=HI)  # type: ignore[arg-type]
        with an.messages.stream(model="deepseek-chat", max_tokens=50, messages=HI) as s:  # type: ignore[arg-type]
            text = "".join(s.text_stream)
    assert "deepseek" in message.content[0].text  # type: ignore[union-attr]
    assert "deepseek" in text


def test_prompt_filter_cleans_on_the_way(stack: Stack) -> None:
    with client(stack) as oa:
        oa.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": "Hello\u200b   world"}],
        )
    assert stack.fakes.deepseek.received[-1].body["messages"][0]["content"] == "Hello world"


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_missing_or_wrong_key_is_401_in_openai_shape(stack: Stack, key: str | None) -> None:
    before = len(stack.fakes.deepseek.received)
    headers = {"Authorization": ""} if key is None else {}
    with (
        client(stack, key or "placeholder") as oa,
        pytest.raises(openai.AuthenticationError) as err,
    ):
        oa.chat.completions.create(model="deepseek-chat", messages=HI, extra_headers=headers)  # type: ignore[arg-type]
    body = err.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_api_key"
    assert len(stack.fakes.deepseek.received) == before


def test_wrong_key_on_the_anthropic_route_is_anthropic_shaped(stack: Stack) -> None:
    with (
        anthropic.Anthropic(base_url=stack.base, api_key="sk-wrong", max_retries=0) as an,
        pytest.raises(anthropic.AuthenticationError) as err,
    ):
        an.messages.create(model="deepseek-chat", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    assert err.value.response.json()["error"]["type"] == "authentication_error"


def test_provider_failure_falls_back_visibly(stack: Stack) -> None:
    stack.fakes.deepseek.behave(status=500)
    with client(stack) as oa:
        raw = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=HI,  # type: ignore[arg-type]
            extra_headers={"Cache-Control": "no-cache"},  # a provider must answer, not the cache
        )
    assert raw.headers["x-deepgate-route"] == "openai:gpt-5-mini"
    assert "openai" in (raw.parse().choices[0].message.content or "")


def test_invalid_and_oversize_bodies_are_clear_4xx(stack: Stack) -> None:
    with client(stack) as oa:
        with pytest.raises(openai.BadRequestError) as bad:
            oa.chat.completions.create(model="deepseek-chat", messages=[])
        assert bad.value.response.json()["error"]["param"] == "messages"
        with pytest.raises(openai.APIStatusError) as big:
            oa.chat.completions.create(
                model="deepseek-chat",
                messages=[{"role": "user", "content": "x" * (9 * 1024 * 1024)}],
            )
        assert big.value.status_code == 413
        with pytest.raises(openai.NotFoundError):
            oa.chat.completions.create(model="no-such-model", messages=HI)  # type: ignore[arg-type]


def test_runner_killed_gives_503_then_serves_again(stack: Stack) -> None:
    runners = [
        pid for pid, cmd in stack.processes() if "deepgate-runner" in cmd or "plugins.runner" in cmd
    ]
    assert runners, stack.processes()
    for pid in runners:
        os.kill(pid, signal.SIGKILL)
    statuses: list[int] = []
    deadline = time.monotonic() + 20
    with client(stack) as oa:
        while time.monotonic() < deadline:
            try:
                oa.chat.completions.create(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
            except openai.APIStatusError as err:
                statuses.append(err.status_code)
                time.sleep(0.3)
                continue
            break
        else:
            pytest.fail(f"not served again after the runner was killed: {statuses}")
    assert statuses, "the gap after the kill went unseen"
    assert set(statuses) <= {503}


def test_stopping_leaves_nothing_running(stack: Stack) -> None:
    assert len(stack.processes()) >= 3  # launcher, sidecar, gateway (+ runner)
    os.killpg(stack.proc.pid, signal.SIGINT)
    assert stack.proc.wait(20) == 0
    time.sleep(0.5)
    assert stack.processes() == []
