"""Which quota counters a request is held to, what it is estimated to cost, and the answer headers.

Budgets, each a ``Quota`` with up to four limits:

- the consumer's own (``consumers.NAME.quota``, or ``default.quota`` per unlisted consumer);
- each of its groups' (``groups.NAME.quota``), shared by the group's members;
- per model alias: the consumer's own use (``consumers.NAME.model_quotas``), its group's shared
  use (``groups.NAME.model_quotas``), and everyone's (``model_quotas`` at the top).

The estimate reserved before the call is the prompt's tokens (counted with the model's tokenizer)
plus what the answer may use: ``max_completion_tokens`` / ``max_tokens`` times ``n``, or
``default_max_tokens``. Its price is the alias's most expensive known target (see
``Config.chain``), or the catalog's most expensive model when the chain is unknown: an estimate
that may only ever be too high, until the sidecar settles it with the real cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deepgate.chat import Dialect, TextSlot
from deepgate.errors import RateLimited
from deepgate.quota import Counter, Kind, Window, counter_key, window_bounds
from plugins.policy.config import Config, Identity, Quota
from plugins.prompt_filter import count_prompt_tokens, encoding_for

_LIMITS: tuple[tuple[str, Kind, Window], ...] = (
    ("requests_per_minute", "requests", "minute"),
    ("tokens_per_minute", "tokens", "minute"),
    ("tokens_per_day", "tokens", "day"),
    ("spend_per_month_usd", "spend", "month"),
)


@dataclass(frozen=True, slots=True)
class Estimate:
    prompt_tokens: int
    completion_tokens: int  # what the answer may use at most
    spend_micro_usd: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def completion_budget(body: dict[str, Any], default: int) -> int:
    """The most completion tokens the answer may use, as the request states it."""
    asked = _positive_int(body.get("max_completion_tokens")) or _positive_int(
        body.get("max_tokens")
    )
    choices = _positive_int(body.get("n")) or 1
    return (asked or default) * choices


def estimate(
    body: dict[str, Any],
    dialect: Dialect,
    conf: Config,
    prompt_tokens: int | None,
    with_spend: bool,
    slots: list[TextSlot] | None = None,
) -> Estimate:
    alias: str = body["model"]
    if prompt_tokens is None:
        prompt_tokens = count_prompt_tokens(body, dialect, encoding_for(alias), slots)
    completion = completion_budget(body, conf.default_max_tokens)
    spend = 0
    if with_spend:
        per_mtok = max(
            (i * prompt_tokens + o * completion for i, o in conf.prices(alias)), default=0.0
        )
        spend = math.ceil(per_mtok)  # USD per million tokens x tokens = micro-USD
    return Estimate(prompt_tokens, completion, spend)


def budgets(identity: Identity, alias: str, conf: Config) -> list[tuple[str, str, Quota]]:
    """(scope, config path, quota) of every budget this request draws on."""
    out: list[tuple[str, str, Quota]] = []
    me = f"consumer:{identity.consumer}" if identity.consumer else "anonymous"
    for scoped in identity.rules:
        rule = scoped.rule
        scope = me if scoped is identity.rules[0] else f"group:{scoped.path[len('groups.') :]}"
        if rule.quota is not None:
            out.append((scope, f"{scoped.path}.quota", rule.quota))
        per_model = rule.model_quotas.get(alias)
        if per_model is not None:
            out.append((f"{scope}:model:{alias}", f"{scoped.path}.model_quotas.{alias}", per_model))
    shared = conf.model_quotas.get(alias)
    if shared is not None:
        out.append((f"model:{alias}", f"model_quotas.{alias}", shared))
    return out


def needs_spend(found: list[tuple[str, str, Quota]]) -> bool:
    return any(q.spend_per_month_usd for _, _, q in found)


# The minute and every (scope, path, quota) -> the counters' fixed parts: key, kind, limit, reset
# time and rule. Day and month labels change only on a minute boundary too. Quotas are frozen
# models: the key holds their values, so a new config with other limits never finds old ones.
_Skeleton = list[tuple[str, Kind, int, float, str]]
_skeletons: dict[tuple[Any, ...], _Skeleton] = {}


def counters(found: list[tuple[str, str, Quota]], est: Estimate, now: float) -> list[Counter]:
    memo = (int(now // 60), *found)
    skeleton = _skeletons.get(memo)
    if skeleton is None:
        if len(_skeletons) > 1024:
            _skeletons.clear()
        skeleton = _skeletons[memo] = _skeleton(found, now)
    amounts = {"requests": 1, "tokens": est.tokens, "spend": est.spend_micro_usd}
    return [
        Counter(key, kind, limit, amounts[kind], reset_at, rule)
        for key, kind, limit, reset_at, rule in skeleton
    ]


def _skeleton(found: list[tuple[str, str, Quota]], now: float) -> _Skeleton:
    out: _Skeleton = []
    bounds: dict[Window, tuple[str, float]] = {}
    for scope, path, quota in found:
        for name, kind, window in _LIMITS:
            limit = getattr(quota, name)
            if limit is None:
                continue
            if window not in bounds:
                bounds[window] = window_bounds(window, now)
            label, reset_at = bounds[window]
            if kind == "spend":
                limit = math.floor(limit * 1_000_000)
            key = counter_key(scope, kind, window, label)
            out.append((key, kind, int(limit), reset_at, f"{path}.{name}"))
    return out


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: ``17s``, ``6m0s``, ``5h3m0s``."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_headers(
    found: list[Counter], values: tuple[int, ...], now: float
) -> list[tuple[str, str]]:
    """OpenAI's ``x-ratelimit-*`` headers from the tightest request and token counters."""
    out: list[tuple[str, str]] = []
    for kind, suffix in (("requests", "requests"), ("tokens", "tokens")):
        tightest: tuple[int, Counter] | None = None
        for counter, value in zip(found, values, strict=True):
            if counter.kind != kind:
                continue
            remaining = max(0, counter.limit - value)
            if tightest is None or remaining < tightest[0]:
                tightest = (remaining, counter)
        if tightest is not None:
            remaining, counter = tightest
            out.append((f"x-ratelimit-limit-{suffix}", str(counter.limit)))
            out.append((f"x-ratelimit-remaining-{suffix}", str(remaining)))
            out.append((f"x-ratelimit-reset-{suffix}", duration(counter.reset_at - now)))
    return out


def refusal(counter: Counter, value: int, est: Estimate, now: float) -> RateLimited:
    """The 429 for the first counter a request would overrun; never echoes the prompt."""
    wait = max(1.0, counter.reset_at - now)
    when = duration(wait)
    if counter.kind == "requests":
        message = (
            f"Rate limit reached: {counter.limit} requests per minute (rule {counter.rule}). "
            f"Retry in {when}."
        )
    elif counter.kind == "tokens":
        per = "minute" if counter.rule.endswith("per_minute") else "day"
        asked = (
            f"this request may use {est.tokens} tokens ({est.prompt_tokens} prompt + "
            f"{est.completion_tokens} completion)"
        )
        if est.tokens > counter.limit:
            message = (
                f"Token limit exceeded: {asked}, more than the whole limit of {counter.limit} "
                f"tokens per {per} (rule {counter.rule}). Lower max_tokens or shorten the prompt."
            )
        else:
            left = max(0, counter.limit - value)
            message = (
                f"Token limit reached: {asked}; {left} of {counter.limit} tokens per {per} remain "
                f"(rule {counter.rule}). Retry in {when}, or lower max_tokens."
            )
    else:
        message = (
            f"Spend limit reached: this request may cost up to "
            f"${est.spend_micro_usd / 1_000_000:.6f}, and the monthly limit of "
            f"${counter.limit / 1_000_000:.2f} (rule {counter.rule}) has "
            f"${max(0, counter.limit - value) / 1_000_000:.6f} left. It resets in {when}; "
            "ask your operator to raise it."
        )
    return RateLimited(message, retry_after=wait)
