"""Output safety and restore through the sidecar's HTTP face, driven by the official SDKs.

The sidecar runs in-process with the shipped config, its answer hooks from
``build_answer_hooks`` and a route key; the plugin chain's decisions arrive as they do from the
runner: a signed route and sealed facts (``safety_output``, ``restore``). DeepSeek is the fake
OpenAI-compatible server, made to answer with text that holds a secret split across chunks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import orjson
import pytest

from deepgate.request_facts import HEADER as FACTS_HEADER
from deepgate.request_facts import Facts, seal
from deepgate.route_signature import HEADER as ROUTE_HEADER
from deepgate.route_signature import sign_route
from sidecar.app import Sidecar, build_answer_hooks, build_providers
from sidecar.config import load_config
from sidecar.metrics import Metrics
from tests.fakes.openai_server import FakeOpenAI

KEY = b"route-key-for-tests-0123456789abcdef"
AWS = "AKIAZ7XQ4VLBN2PKW3RT"
HI = [{"role": "user", "content": "hi"}]
LEAD = "Here are the deployment notes you asked for, one line at a time. " * 6 + "The key is "
TAIL = ", keep it safe. " + "Rotate it every ninety days and never paste it anywhere. " * 5


@dataclass
class Stack:
    sidecar: Sidecar
    deepseek: FakeOpenAI
    metrics: Metrics

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.http_port}"


@pytest.fixture
async def stack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    ds = FakeOpenAI("deepseek")
    await ds.start()
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-ds")
    monkeypatch.setenv("DEEPSEEK_BASE_URL", ds.url)
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DEEPGATE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    config = load_config()
    metrics = Metrics()
    sidecar = Sidecar(
        config,
        "gateway",
        http_address=("127.0.0.1", 0),
        grpc_address=None,
        providers=build_providers(config),
        route_key=KEY,
        metrics=metrics,
        hooks=build_answer_hooks(config, None, metrics),
    )
    await sidecar.start()
    yield Stack(sidecar, ds, metrics)
    await sidecar.stop()
    await ds.stop()


def headers(rid: str, facts: Facts) -> dict[str, str]:
    return {
        "x-request-id": rid,
        ROUTE_HEADER: sign_route(KEY, rid, ["deepseek:deepseek-chat"]),
        FACTS_HEADER: seal(KEY, rid, facts),
    }


def sse(pieces: list[str], finish: str = "stop") -> str:
    """A DeepSeek-style SSE transcript: one text piece per chunk, then finish and usage."""

    def event(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        body = {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "deepseek-chat",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
        return "data: " + orjson.dumps(body).decode() + "\n\n"

    usage = {"prompt_tokens": 5, "completion_tokens": 60, "total_tokens": 65}
    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": p}) for p in pieces]
    events.append(event({}, finish))
    events.append(
        "data: "
        + orjson.dumps(
            {"id": "c1", "object": "chat.completion.chunk", "created": 1,
             "model": "deepseek-chat", "choices": [], "usage": usage}
        ).decode()
        + "\n\n"
    )  # fmt: skip
    return "".join(events) + "data: [DONE]\n\n"


def words(text: str) -> list[str]:
    return [text[i : i + 9] for i in range(0, len(text), 9)]


def secret_stream() -> str:
    return sse([*words(LEAD), AWS[:5], AWS[5:12], AWS[12:], *words(TAIL)])


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
    }


def oa(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def counted(stack: Stack, detector: str, action: str) -> float:
    value = stack.metrics.registry.get_sample_value(
        "deepgate_output_safety_findings_total", {"detector": detector, "action": action}
    )
    return value or 0.0


async def read_openai(stream: Any, into: list[str]) -> None:
    async for chunk in stream:
        if chunk.choices:
            into.append(chunk.choices[0].delta.content or "")


async def read_anthropic(stream: Any, into: list[str]) -> None:
    async for event in stream:
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            into.append(event.delta.text)


async def test_block_mid_stream_raises_in_the_openai_sdk(stack: Stack) -> None:
    stack.deepseek.behave(reply=secret_stream())
    facts = Facts(safety_output={"secrets": {"action": "block"}})
    seen: list[str] = []
    async with oa(stack) as client:
        stream = await client.chat.completions.create(
            model="deepseek-chat", messages=HI, stream=True, extra_headers=headers("rq-b", facts)
        )
        with pytest.raises(openai.APIError) as info:
            await read_openai(stream, seen)
    assert "output safety check 'secrets'" in info.value.message
    assert AWS not in info.value.message
    text = "".join(seen)
    assert text  # what came before the key was delivered as it came, nothing after
    assert LEAD.startswith(text)
    assert AWS[:5] not in text
    assert counted(stack, "secrets", "block") == 1.0


async def test_block_mid_stream_raises_in_the_anthropic_sdk(stack: Stack) -> None:
    stack.deepseek.behave(reply=secret_stream())
    facts = Facts(safety_output={"secrets": {"action": "block"}})
    client = anthropic.AsyncAnthropic(base_url=stack.url, api_key="unused", max_retries=0)
    seen: list[str] = []
    async with client:
        stream = await client.messages.create(
            model="deepseek-chat",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers=headers("rq-ab", facts),
        )
        with pytest.raises(anthropic.APIStatusError):
            await read_anthropic(stream, seen)
    assert AWS[:5] not in "".join(seen)


async def test_redact_in_a_stream_and_the_assembled_answer(stack: Stack) -> None:
    stack.deepseek.behave(reply=secret_stream())
    facts = Facts(safety_output={"secrets": {"action": "redact"}})
    async with oa(stack) as client:
        stream = await client.chat.completions.create(
            model="deepseek-chat", messages=HI, stream=True, extra_headers=headers("rq-r", facts)
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == LEAD + "[REDACTED:AWS_KEY]" + TAIL
    assert counted(stack, "secrets", "redact") == 1.0


async def test_redact_in_an_anthropic_stream(stack: Stack) -> None:
    stack.deepseek.behave(reply=secret_stream())
    facts = Facts(safety_output={"secrets": {"action": "redact"}})
    client = anthropic.AsyncAnthropic(base_url=stack.url, api_key="unused", max_retries=0)
    seen: list[str] = []
    async with client:
        stream = await client.messages.create(
            model="deepseek-chat",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers=headers("rq-ar", facts),
        )
        await read_anthropic(stream, seen)
    assert "".join(seen) == LEAD + "[REDACTED:AWS_KEY]" + TAIL


async def test_whole_answer_block_is_a_400_in_the_route_shape(stack: Stack) -> None:
    stack.deepseek.behave(reply=completion(f"Sure: {AWS}."))
    facts = Facts(safety_output={"secrets": {"action": "block"}})
    async with oa(stack) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="deepseek-chat", messages=HI, extra_headers=headers("rq-w", facts)
            )
    assert info.value.code == "content_policy_violation"
    assert AWS not in str(info.value.body)
    async with httpx.AsyncClient() as raw:
        resp = await raw.post(
            f"{stack.url}/v1/messages",
            json={"model": "deepseek-chat", "max_tokens": 50, "messages": HI},
            headers=headers("rq-wa", facts),
        )
    assert resp.status_code == 400
    assert resp.json()["type"] == "error"
    assert resp.json()["error"]["type"] == "invalid_request_error"


async def test_masked_personal_data_is_restored_after_output_checks(stack: Stack) -> None:
    # Output safety redacts emails, but the restored one is the user's own: it comes back.
    facts = Facts(
        safety_output={"personal_data": {"action": "redact", "entities": ["EMAIL_ADDRESS"]}},
        restore={"[EMAIL_ADDRESS_1]": "ana@example.org"},
    )
    stack.deepseek.behave(reply=sse(["I will write to [EMA", "IL_ADDR", "ESS_1] today."]))
    async with oa(stack) as client:
        stream = await client.chat.completions.create(
            model="deepseek-chat", messages=HI, stream=True, extra_headers=headers("rq-m", facts)
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "I will write to ana@example.org today."
        stack.deepseek.behave(reply=completion("Mail [EMAIL_ADDRESS_1] or bob@example.com."))
        answer = await client.chat.completions.create(
            model="deepseek-chat", messages=HI, extra_headers=headers("rq-n", facts)
        )
    assert answer.choices[0].message.content == (
        "Mail ana@example.org or [REDACTED:EMAIL_ADDRESS]."
    )
    async with httpx.AsyncClient() as raw:
        page = (await raw.get(f"{stack.url}/metrics")).text
    assert 'deepgate_output_safety_findings_total{action="redact",detector="personal_data"}' in page
