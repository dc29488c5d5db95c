"""deepgate-policy's rules: config checks, identities, access, budgets, estimates and headers."""

from __future__ import annotations

import time
from typing import Any

import pytest
from pydantic import ValidationError

from deepgate.config import describe_validation_error
from deepgate.errors import PermissionDenied
from deepgate.quota import Counter
from deepgate.request_facts import Facts
from plugins.policy import access, quotas
from plugins.policy.config import Config
from plugins.prompt_filter import count_prompt_tokens


def make(**kw: Any) -> Config:
    return Config.model_validate(kw)


def problem(**kw: Any) -> str:
    with pytest.raises(ValidationError) as info:
        make(**kw)
    return describe_validation_error(info.value)


@pytest.mark.parametrize(
    ("conf", "names"),
    [
        ({"consumers": {"a": {"groups": ["ops"]}}}, "consumers.a.groups[0]: unknown group 'ops'"),
        ({"groups": {"g": {"providers": ["deepsek"]}}}, "groups.g.providers[0]: unknown provider"),
        ({"default": {"regions": ["eu"]}}, "default.regions[0]: no provider in the catalog"),
        ({"aliases": {"fast": ["gpt-5"]}}, "aliases.fast[0]: write targets as provider:model"),
        ({"aliases": {"fast": []}}, "aliases.fast: a chain needs at least one target"),
        ({"consumers": {"a": {"quota": {"tokens_per_minute": 0}}}}, "tokens_per_minute"),
        ({"consumers": {"a": {"quota": {"tokens_per_hour": 5}}}}, "tokens_per_hour"),
        ({"store": "memcached"}, "store"),
        ({"redis_url": "localhost:6379"}, "redis_url: Value error, write a redis://"),
        ({"store_unreachable": "maybe"}, "store_unreachable"),
        ({"catalog_file": "/nonexistent/catalog.yaml"}, "catalog_file"),
    ],
)
def test_bad_configs_name_the_field(conf: dict[str, Any], names: str) -> None:
    assert names in problem(**conf)


def test_identity_joins_own_and_group_rules() -> None:
    conf = make(
        consumers={
            "ana": {
                "groups": ["eu", "trial"],
                "providers": ["openai", "anthropic", "local"],
                "personal_data": "local",
                "labels": {"team": "search"},
            }
        },
        groups={
            "eu": {"providers": ["anthropic", "local", "deepseek"], "personal_data": "refuse"},
            "trial": {"regions": ["us", "local"]},
        },
    )
    ana = conf.identity("ana")
    assert ana is not None
    assert ana.groups == ("eu", "trial")
    assert ana.allowed_providers == ["anthropic", "local"]  # what every rule allows
    assert ana.allowed_regions == ["local", "us"]
    assert ana.personal_data == "refuse"  # the strictest wins
    assert [s.path for s in ana.rules] == ["consumers.ana", "groups.eu", "groups.trial"]
    facts = Facts()
    access.compliance_facts(ana, facts)
    assert facts == {
        "allowed_providers": ["anthropic", "local"],
        "allowed_regions": ["local", "us"],
        "personal_data_rule": "refuse",
        "log_opt_out": False,
    }


def test_unlisted_consumers_get_the_default_under_their_own_name() -> None:
    assert make().identity("x") is None
    conf = make(default={"models": ["local"]})
    bob = conf.identity("bob")
    assert bob is not None
    assert bob.consumer == "bob"
    assert bob.rules[0].path == "default"


def test_model_rules_use_patterns_and_name_the_rule() -> None:
    conf = make(
        consumers={"a": {"groups": ["g"], "models": ["deepseek-*", "gpt-5*"]}},
        groups={"g": {"models": ["deepseek-chat", "gpt-5-mini"]}},
    )
    ident = conf.identity("a")
    assert ident is not None
    access.check_model(ident, "deepseek-chat")
    access.check_model(ident, "gpt-5-mini")
    with pytest.raises(PermissionDenied, match=r"rule consumers\.a\.models") as info:
        access.check_model(ident, "claude-haiku-4-5")
    assert info.value.param == "model"
    with pytest.raises(PermissionDenied, match=r"rule groups\.g\.models allows"):
        access.check_model(ident, "gpt-5")  # the consumer's pattern allows it; the group does not


def test_route_rules() -> None:
    conf = make(consumers={"a": {"routes": ["chat-completions"]}})
    ident = conf.identity("a")
    assert ident is not None
    access.check_route(ident, "chat-completions")
    with pytest.raises(PermissionDenied, match=r"consumers\.a\.routes"):
        access.check_route(ident, "anthropic-messages")
    with pytest.raises(PermissionDenied):
        access.check_route(ident, None)


def test_targets_refused_only_when_the_whole_known_chain_is_excluded() -> None:
    conf = make(
        consumers={"a": {"regions": ["us"]}},
        aliases={"cn-only": ["deepseek:deepseek-chat"], "mixed": ["deepseek:x", "openai:gpt-5"]},
    )
    ident = conf.identity("a")
    assert ident is not None
    access.check_targets(ident, "mixed", conf)
    access.check_targets(ident, "openai:gpt-5", conf)
    access.check_targets(ident, "deepseek-chat", conf)  # chain unknown here: the router decides
    with pytest.raises(PermissionDenied, match=r"consumers\.a\.regions exclude"):
        access.check_targets(ident, "cn-only", conf)
    with pytest.raises(PermissionDenied):
        access.check_targets(ident, "deepseek:deepseek-chat", conf)


def test_budgets_cover_consumer_groups_and_models() -> None:
    q = {"requests_per_minute": 5}
    conf = make(
        consumers={"a": {"groups": ["g"], "quota": q, "model_quotas": {"gpt-5": q}}},
        groups={"g": {"quota": q, "model_quotas": {"gpt-5": q}}},
        model_quotas={"gpt-5": q, "local": q},
    )
    ident = conf.identity("a")
    assert ident is not None
    scopes = [(s, p) for s, p, _ in quotas.budgets(ident, "gpt-5", conf)]
    assert scopes == [
        ("consumer:a", "consumers.a.quota"),
        ("consumer:a:model:gpt-5", "consumers.a.model_quotas.gpt-5"),
        ("group:g", "groups.g.quota"),
        ("group:g:model:gpt-5", "groups.g.model_quotas.gpt-5"),
        ("model:gpt-5", "model_quotas.gpt-5"),
    ]
    assert len(quotas.budgets(ident, "deepseek-chat", conf)) == 2


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hi there"}], **kw}


@pytest.mark.parametrize(
    ("extra", "budget"),
    [
        ({}, 300),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 70, "max_tokens": 50}, 70),
        ({"max_tokens": 50, "n": 3}, 150),
        ({"max_tokens": -4}, 300),
        ({"max_tokens": True}, 300),
    ],
)
def test_completion_budget(extra: dict[str, Any], budget: int) -> None:
    assert quotas.completion_budget(body(**extra), 300) == budget


def test_estimate_counts_the_prompt_and_prices_the_dearest_target() -> None:
    conf = make(default_max_tokens=1000, aliases={"x": ["deepseek:deepseek-chat", "openai:gpt-5"]})
    b = body(model="x")
    est = quotas.estimate(b, "openai", conf, None, with_spend=True)
    assert est.prompt_tokens == count_prompt_tokens(b, "openai", "o200k_base")
    assert est.completion_tokens == 1000
    dearest = conf.catalog.cost("openai:gpt-5", est.prompt_tokens, 1000)
    assert est.spend_micro_usd == pytest.approx(dearest * 1_000_000, abs=1)
    known = quotas.estimate(body(), "openai", conf, 7, with_spend=True)
    assert known.prompt_tokens == 7  # an earlier count is reused
    cheap = conf.catalog.cost("deepseek:deepseek-chat", 7, 1000)
    assert known.spend_micro_usd == pytest.approx(cheap * 1_000_000, abs=1)
    unknown = quotas.estimate(body(model="auto"), "openai", conf, 7, with_spend=True)
    dearest_any = max(conf.catalog.cost(t, 7, 1000) for t in conf.catalog.models)
    assert unknown.spend_micro_usd == pytest.approx(dearest_any * 1_000_000, abs=1)


def test_counters_per_limit_and_window() -> None:
    conf = make(
        consumers={
            "a": {
                "quota": {
                    "requests_per_minute": 10,
                    "tokens_per_minute": 1000,
                    "tokens_per_day": 5000,
                    "spend_per_month_usd": 2.5,
                }
            }
        }
    )
    ident = conf.identity("a")
    assert ident is not None
    est = quotas.Estimate(prompt_tokens=20, completion_tokens=100, spend_micro_usd=42)
    now = time.time()
    made = quotas.counters(quotas.budgets(ident, "m", conf), est, now)
    got = [(c.kind, c.limit, c.amount, c.rule.rsplit(".", 1)[1]) for c in made]
    assert got == [
        ("requests", 10, 1, "requests_per_minute"),
        ("tokens", 1000, 120, "tokens_per_minute"),
        ("tokens", 5000, 120, "tokens_per_day"),
        ("spend", 2_500_000, 42, "spend_per_month_usd"),
    ]
    assert len({c.key for c in made}) == 4
    assert all(c.reset_at > now for c in made)


def test_counters_follow_the_minute_the_amounts_and_the_config() -> None:
    def made(limit: int, now: float, tokens: int) -> list[Counter]:
        conf = make(consumers={"a": {"quota": {"tokens_per_minute": limit}}})
        ident = conf.identity("a")
        assert ident is not None
        est = quotas.Estimate(prompt_tokens=tokens, completion_tokens=0, spend_micro_usd=0)
        return quotas.counters(quotas.budgets(ident, "m", conf), est, now)

    minute = 29_000_000 * 60.0
    first = made(1000, minute + 1, 5)
    assert (first[0].limit, first[0].amount) == (1000, 5)
    assert made(1000, minute + 59, 7)[0].amount == 7  # same minute, this request's amount
    assert made(1000, minute + 60, 5)[0].key != first[0].key  # the next window
    assert made(2000, minute + 1, 5)[0].limit == 2000  # a config with another limit


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (16.2, "17s"), (360, "6m0s"), (3723, "1h2m3s")]
)
def test_durations_as_openai_writes_them(seconds: float, text: str) -> None:
    assert quotas.duration(seconds) == text


NOW = 1_790_000_000.0


def c(kind: str, limit: int, reset_in: float, rule: str = "r") -> Counter:
    return Counter(f"k{limit}{kind}", kind, limit, 1, NOW + reset_in, rule)  # type: ignore[arg-type]


def test_headers_report_the_tightest_counter_of_each_kind() -> None:
    now = NOW
    made = [c("requests", 100, 30), c("tokens", 1000, 30), c("tokens", 50_000, 3600)]
    headers = dict(quotas.rate_headers(made, (3, 900, 48_000), now))
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert headers["x-ratelimit-remaining-requests"] == "97"
    assert headers["x-ratelimit-limit-tokens"] == "1000"  # 100 left beats 2000 left
    assert headers["x-ratelimit-remaining-tokens"] == "100"
    assert headers["x-ratelimit-reset-tokens"] == "30s"
    headers = dict(quotas.rate_headers(made, (3, 100, 49_990), now))
    assert headers["x-ratelimit-limit-tokens"] == "50000"
    assert headers["x-ratelimit-remaining-tokens"] == "10"
    assert quotas.rate_headers([], (), now) == []


def test_refusals_explain_the_limit_without_the_prompt() -> None:
    est = quotas.Estimate(prompt_tokens=30, completion_tokens=2000, spend_micro_usd=500)
    now = NOW
    err = quotas.refusal(c("tokens", 1000, 20, "consumers.a.quota.tokens_per_minute"), 0, est, now)
    assert err.status == 429
    assert "more than the whole limit of 1000 tokens per minute" in err.message
    assert err.http_headers()["retry-after"] == "20"
    err = quotas.refusal(c("tokens", 5000, 20, "groups.g.quota.tokens_per_day"), 4000, est, now)
    assert "1000 of 5000 tokens per day remain" in err.message
    err = quotas.refusal(c("requests", 10, 0.2, "x.requests_per_minute"), 10, est, now)
    assert err.http_headers()["retry-after"] == "1"  # never 0: a client must wait
    err = quotas.refusal(c("spend", 2_000_000, 9000, "x.spend_per_month_usd"), 1_999_900, est, now)
    assert "$2.00" in err.message
