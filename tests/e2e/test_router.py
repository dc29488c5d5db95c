"""End to end: deepgate-router with the shipped aliases, through the official SDKs.

A stack of its own: a real Redis, the sidecar (gateway role, fake providers) and the APISIX
stand-in serving the shipped routes with the chat routes' post-req chain cut down to
deepgate-policy and deepgate-router (both as shipped), plus a consumer ``resident`` whose policy
keeps its prompts in the ``us`` region.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import OwnStack, edit_plugin, own_stack, shipped_routes

RESIDENT_KEY = "sk-e2e-resident-key-8910"
HI = [{"role": "user", "content": "What is the capital of France?"}]
KEPT = ("deepgate-policy", "deepgate-router")
AUTO = {"deepseek:deepseek-chat", "openai:gpt-5-mini", "anthropic:claude-haiku-4-5"}

RouterStack = OwnStack


def routes_file(sidecar_port: int) -> dict[str, Any]:
    routes = shipped_routes(sidecar_port, KEPT, resident=RESIDENT_KEY)
    edit_plugin(
        routes, "deepgate-policy", lambda p: p["consumers"].update(resident={"regions": ["us"]})
    )
    return routes


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterStack]:
    with own_stack(tmp_path_factory.mktemp("router"), routes_file) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(stack: RouterStack) -> Iterator[None]:
    yield
    stack.fakes.reset()


def test_auto_is_routed_and_the_answer_names_its_target(stack: RouterStack) -> None:
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(model="auto", messages=HI)  # type: ignore[arg-type]
        listed = {m.id for m in oa.models.list()}
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-deepgate-route"] in AUTO
    assert {"auto", "fast", "cheap"} <= listed


def test_auto_through_the_anthropic_sdk(stack: RouterStack) -> None:
    with stack.anthropic() as an:
        raw = an.messages.with_raw_response.create(model="auto", max_tokens=64, messages=HI)  # type: ignore[arg-type]
    assert raw.parse().content
    assert raw.headers["x-deepgate-route"] in AUTO


def test_cheap_picks_the_cheapest_target_for_the_request(stack: RouterStack) -> None:
    long_prompt = [{"role": "user", "content": "Summarise: " + "the quick brown fox " * 1500}]
    with stack.openai() as oa:
        short = oa.chat.completions.with_raw_response.create(
            model="cheap",
            messages=HI,  # type: ignore[arg-type]
            max_tokens=2000,
        )
        long = oa.chat.completions.with_raw_response.create(
            model="cheap",
            messages=long_prompt,  # type: ignore[arg-type]
            max_tokens=1,
        )
    # a short prompt and a long answer: DeepSeek's output price is the lowest
    assert short.headers["x-deepgate-route"] == "deepseek:deepseek-chat"
    # a long prompt and a one-token answer: gpt-5-mini's input price is the lowest
    assert long.headers["x-deepgate-route"] == "openai:gpt-5-mini"


def test_fallback_along_the_routed_chain(stack: RouterStack) -> None:
    stack.fakes.deepseek.behave(status=500)
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-deepgate-route"] == "openai:gpt-5-mini"


def test_a_region_constraint_is_honoured(stack: RouterStack) -> None:
    seen = len(stack.fakes.deepseek.received)
    with stack.openai(RESIDENT_KEY) as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
        assert raw.headers["x-deepgate-route"] == "openai:gpt-5-mini"  # DeepSeek runs in cn
        with pytest.raises(openai.PermissionDeniedError) as denied:
            oa.chat.completions.create(model="local", messages=HI)  # type: ignore[arg-type]
    assert len(stack.fakes.deepseek.received) == seen  # never sent to the cn provider
    assert "region" in str(denied.value)


def test_unknown_model_is_openais_404(stack: RouterStack) -> None:
    with stack.openai() as oa, pytest.raises(openai.NotFoundError) as info:
        oa.chat.completions.create(model="no-such-model", messages=HI)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"
