"""plugins.router: config checks, the decision (content, size, policy, strategy) and the signing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from deepgate.errors import ContextLengthExceeded, InvalidRequest, NotFound, PermissionDenied
from deepgate.flags import FLAGS
from deepgate.route_signature import verify_route
from plugins import router
from plugins.base import RequestContext
from plugins.router import Config, on_request
from plugins.runner.codec import HTTPReqCallReq, Method, ReqBody

KEY = "unit-test-route-key"
CHAT_PATH = "/v1/chat/completions"
EXTERNAL = ["deepseek:deepseek-chat", "openai:gpt-5-mini", "anthropic:claude-haiku-4-5"]
CONF: dict[str, Any] = {
    "aliases": {
        "auto": {
            "targets": [*EXTERNAL, "local:smollm2-135m-instruct"],
            "long_context_alias": "long",
            "rules": [
                {"name": "code", "code": True, "alias": "coder"},
                {"name": "legal", "keywords": ["contract", "GDPR"], "alias": "long"},
            ],
        },
        "cheap": {"targets": EXTERNAL, "strategy": "lowest_cost"},
        "split": {
            "targets": ["openai:gpt-5-mini", "deepseek:deepseek-chat"],
            "strategy": "weighted",
            "weights": {"openai:gpt-5-mini": 1, "deepseek:deepseek-chat": 1},
        },
        "coder": ["anthropic:claude-sonnet-4-6", "openai:gpt-5"],
        "long": ["openai:gpt-5", "anthropic:claude-sonnet-4-6"],
        "local": ["local:smollm2-135m-instruct"],
    },
    "personal_data_alias": "local",
}


@pytest.fixture(autouse=True)
def route_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGATE_ROUTE_KEY", KEY)


def conf(**over: Any) -> Config:
    return Config.model_validate({**CONF, **over})


def chat(text: str = "Hello there", model: str = "auto", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def route(
    body: dict[str, Any],
    config: Config | None = None,
    headers: list[tuple[str, str | None]] | None = None,
    **facts: Any,
) -> tuple[RequestContext, list[str]]:
    raw = orjson.dumps(body)

    async def ask(info: object) -> bytes | None:
        return raw if isinstance(info, ReqBody) else None

    call = HTTPReqCallReq(id=7, conf_token=1, method=Method.POST, path=CHAT_PATH)
    call.headers = headers or []
    ctx = RequestContext(call, ask)
    ctx.facts.update(facts)  # type: ignore[typeddict-item]
    assert await on_request(ctx, config or conf()) is None
    sent = dict(ctx.rewrite_headers)
    chain = verify_route(KEY.encode(), ctx.request_id, sent["x-deepgate-route"])
    return ctx, chain


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"aliases": {"a": ["no-colon"]}}, "targets[0]"),
        ({"aliases": {"a": ["x:y", "x:y"]}}, "repeat x:y"),
        ({"aliases": {"a": {"targets": ["x:y"], "strategy": "fastest"}}}, "strategy"),
        ({"aliases": {"a": {"targets": ["x:y"], "long_context_alias": "b"}}}, "long_context_alias"),
        (
            {"aliases": {"a": {"targets": ["x:y"], "rules": [{"name": "r", "alias": "a"}]}}},
            "needs keywords or code",
        ),
        (
            {
                "aliases": {
                    "a": {"targets": ["x:y"], "rules": [{"name": "r", "code": 1, "alias": "z"}]}
                }
            },
            "aliases.a.rules[0].alias",
        ),
        ({"aliases": {"a": {"targets": ["x:y"], "weights": {"q:r": 1}}}}, "aliases.a.weights"),
        ({"aliases": {"a": {"targets": ["x:y"], "weights": {"x:y": 0}}}}, "must be > 0"),
        ({"personal_data_alias": "nowhere"}, "personal_data_alias"),
        ({"aliases": {}}, "aliases"),
        ({"stats": {"refresh_s": 0}}, "refresh_s"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_config_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Config.model_validate({**CONF, **change})
    assert field in str(info.value)


def test_compiled_aliases_carry_catalog_facts() -> None:
    auto = conf().compiled["auto"]
    assert auto.strategy == "priority"
    assert [t.region for t in auto.targets] == ["cn", "us", "us", "local"]
    assert [t.external for t in auto.targets] == [True, True, True, False]
    assert (auto.min_window, auto.max_window) == (8192, 400_000)


# --- the decision ------------------------------------------------------------------------------


async def test_priority_chain_is_signed_for_this_request_id() -> None:
    ctx, chain = await route(chat())
    assert chain == [*EXTERNAL, "local:smollm2-135m-instruct"]
    headers = dict(ctx.rewrite_headers)
    assert headers["x-request-id"] == ctx.request_id  # the sidecar checks against this id
    assert ctx.facts["alias"] == "auto"


async def test_the_clients_request_id_is_kept() -> None:
    ctx, _ = await route(chat(), headers=[("X-Request-Id", "client-id-1")])
    assert ctx.request_id == "client-id-1"
    assert "x-request-id" not in dict(ctx.rewrite_headers)


async def test_unknown_model_is_openais_404() -> None:
    with pytest.raises(NotFound) as info:
        await route(chat(model="gpt-9000"))
    err = info.value.to_openai()["error"]
    assert (err["code"], err["param"], err["type"]) == (
        "model_not_found",
        "model",
        "not_found_error",
    )
    assert "auto" in err["message"]


async def test_without_a_key_the_clients_route_header_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEEPGATE_ROUTE_KEY")
    raw = orjson.dumps(chat())

    async def ask(info: object) -> bytes | None:
        return raw

    call = HTTPReqCallReq(id=1, conf_token=1, method=Method.POST, path=CHAT_PATH)
    call.headers = [("x-deepgate-route", "openai:gpt-5;exp=9999999999;sig=00")]
    ctx = RequestContext(call, ask)
    await on_request(ctx, conf())
    assert ("x-deepgate-route", None) in ctx.rewrite_headers


async def test_code_goes_to_the_rules_alias() -> None:
    ctx, chain = await route(chat("Why does this fail?\n```python\nprint(1/0)\n```"))
    assert chain == ["anthropic:claude-sonnet-4-6", "openai:gpt-5"]
    assert ctx.facts["alias"] == "coder"
    _, chain = await route(chat("def f(x):\n    return x + 1\nwhat does f do?"))
    assert chain[0] == "anthropic:claude-sonnet-4-6"


async def test_keyword_rule_matches_whole_words_case_blind() -> None:
    _, chain = await route(chat("Summarise this gdpr notice"))
    assert chain[0] == "openai:gpt-5"
    _, chain = await route(chat("A contractor said hello"))  # not the word "contract"
    assert chain[0] == "deepseek:deepseek-chat"


async def test_only_the_last_user_message_is_screened() -> None:
    body = {
        "model": "auto",
        "messages": [
            {"role": "user", "content": "```x = 1```"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "thanks"},
        ],
    }
    _, chain = await route(body)
    assert chain[0] == "deepseek:deepseek-chat"


async def test_prompt_too_big_for_small_targets_drops_them() -> None:
    ctx, chain = await route(chat("word " * 9000))  # ~9k tokens: over the local model's 8k
    assert chain == EXTERNAL
    assert ctx.facts["prompt_tokens"] > 8192


async def test_prompt_too_big_for_every_target_goes_to_the_long_context_alias() -> None:
    _, chain = await route(chat("word " * 9000), prompt_tokens=150_000)
    assert chain == ["openai:gpt-5-mini", "anthropic:claude-haiku-4-5"]  # the ones that hold it
    aliases = {
        **CONF["aliases"],
        "small": {"targets": ["deepseek:deepseek-chat"], "long_context_alias": "long"},
    }
    ctx, chain = await route(
        chat("hi", model="small"), conf(aliases=aliases), prompt_tokens=150_000
    )
    assert chain == ["openai:gpt-5", "anthropic:claude-sonnet-4-6"]
    assert ctx.facts["alias"] == "long"


async def test_prompt_too_big_without_a_long_alias_is_context_length_exceeded() -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        await route(chat("word " * 9000, model="local"), prompt_tokens=20_000)
    assert "8192" in info.value.message


async def test_allowed_regions_filter_the_chain() -> None:
    _, chain = await route(chat(), allowed_regions=["us", "local"])
    assert chain == [
        "openai:gpt-5-mini",
        "anthropic:claude-haiku-4-5",
        "local:smollm2-135m-instruct",
    ]
    with pytest.raises(PermissionDenied) as info:
        await route(chat(model="cheap"), allowed_regions=["eu"])
    assert "regions" in info.value.message
    assert info.value.status == 403


async def test_allowed_providers_filter_the_chain() -> None:
    _, chain = await route(chat(), allowed_providers=["anthropic"])
    assert chain == ["anthropic:claude-haiku-4-5"]
    with pytest.raises(PermissionDenied, match="providers rule"):
        await route(chat(model="local"), allowed_providers=["openai"])


async def test_personal_data_local_keeps_targets_inside() -> None:
    facts = {"personal_data_found": True, "personal_data_rule": "local"}
    _, chain = await route(chat(), **facts)
    assert chain == ["local:smollm2-135m-instruct"]
    ctx, chain = await route(chat(model="cheap"), **facts)  # no local target: the named alias
    assert chain == ["local:smollm2-135m-instruct"]
    assert ctx.facts["alias"] == "local"
    with pytest.raises(PermissionDenied, match="'local'"):
        await route(chat(model="cheap"), conf(personal_data_alias=None), **facts)


async def test_personal_data_refuse_is_403_naming_the_rule() -> None:
    with pytest.raises(PermissionDenied, match="personal_data rule 'refuse'"):
        await route(chat(), personal_data_found=True, personal_data_rule="refuse")
    _, chain = await route(chat(), personal_data_found=False, personal_data_rule="refuse")
    assert len(chain) == 4


async def test_lowest_cost_uses_the_estimated_tokens() -> None:
    # deepseek 0.28/0.42, gpt-5-mini 0.25/2.0, haiku 1.0/5.0 per million tokens
    _, chain = await route(chat(model="cheap", max_tokens=10), prompt_tokens=100_000)
    assert chain == ["openai:gpt-5-mini", "deepseek:deepseek-chat", "anthropic:claude-haiku-4-5"]
    _, chain = await route(chat(model="cheap", max_tokens=4000), prompt_tokens=100)
    assert chain == ["deepseek:deepseek-chat", "openai:gpt-5-mini", "anthropic:claude-haiku-4-5"]
    ctx, _ = await route(chat(model="cheap"))  # nobody counted before: the router counts
    assert 0 < ctx.facts["prompt_tokens"] < 20


async def test_weighted_alias_spreads_first_choices() -> None:
    firsts = {(await route(chat(model="split")))[1][0] for _ in range(60)}
    assert firsts == {"openai:gpt-5-mini", "deepseek:deepseek-chat"}


async def test_least_latency_without_stats_keeps_the_configured_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(router.BOARD, "snapshot", lambda _conf: None)
    aliases = {"fast": {"targets": EXTERNAL, "strategy": "least_latency"}}
    _, chain = await route(chat(model="fast"), conf(aliases=aliases, personal_data_alias=None))
    assert chain == EXTERNAL
    latencies = {"anthropic:claude-haiku-4-5": 90.0, "openai:gpt-5-mini": 400.0}
    monkeypatch.setattr(router.BOARD, "snapshot", lambda _conf: latencies)
    _, chain = await route(chat(model="fast"), conf(aliases=aliases, personal_data_alias=None))
    assert chain == ["anthropic:claude-haiku-4-5", "openai:gpt-5-mini", "deepseek:deepseek-chat"]


async def test_a_flag_rolls_a_strategy_out_to_a_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = tmp_path / "flags.yaml"
    flags.write_text(
        "flags:\n"
        "  router.cheap.strategy:\n"
        "    value: lowest_cost\n"
        "    rules:\n"
        "      - when: {group: [beta]}\n"
        "        value: priority\n"
    )
    monkeypatch.setenv("DEEPGATE_FLAGS_FILE", str(flags))
    FLAGS.reset()
    try:
        body = chat(model="cheap", max_tokens=10)
        _, chain = await route(body, prompt_tokens=100_000, groups=["beta"])
        assert chain == EXTERNAL  # priority for the beta group
        _, chain = await route(body, prompt_tokens=100_000, groups=["ga"])
        assert chain[0] == "openai:gpt-5-mini"  # lowest cost for the others
    finally:
        FLAGS.reset()


async def test_get_requests_pass() -> None:
    async def ask(info: object) -> bytes | None:
        raise AssertionError("a GET has no body to read")

    call = HTTPReqCallReq(id=1, conf_token=1, method=Method.GET, path="/v1/models")
    ctx = RequestContext(call, ask)
    assert await on_request(ctx, conf()) is None
    assert ctx.rewrite() is None


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("```\nls -la\n```", True),
        ("import os\nprint(os.getcwd())", True),
        ("  for (int i = 0; i < n; i++) {", True),
        ("x = compute(y);", True),
        ("SELECT name FROM users WHERE id = 1", True),
        ("What is the capital of France?", False),
        ("I want to import goods from Spain; is that hard?", False),
        ("Let me know: which class should I take first?", False),
    ],
)
def test_code_detection(text: str, code: bool) -> None:
    assert router.looks_like_code(text) is code


async def test_a_body_an_earlier_plugin_grew_is_measured_as_it_is_now() -> None:
    raw = orjson.dumps(chat("hi"))

    async def ask(info: object) -> bytes | None:
        return raw

    ctx = RequestContext(
        HTTPReqCallReq(id=3, conf_token=1, method=Method.POST, path=CHAT_PATH), ask
    )
    await ctx.json()
    ctx.replace_json(chat("word " * 9000))  # e.g. RAG added context: over the local model's 8k
    assert await on_request(ctx, conf()) is None
    signed = dict(ctx.rewrite_headers)["x-deepgate-route"]
    assert verify_route(KEY.encode(), ctx.request_id, signed) == EXTERNAL


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "auto", "messages": "hi"}, "messages"),
        ({"model": "auto", "messages": [7]}, "messages[0].role"),
    ],
)
async def test_not_a_chat_body_is_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await route(body)
    assert info.value.param == param
