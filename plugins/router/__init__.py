"""``deepgate-router``: pick the chain of (provider, model) targets for a request and sign it.

The router runs last in the chain, after policy, safety, cache and RAG have said what they know.
For the model the client named (an alias of this config: ``auto``, ``fast``, ``deepseek-chat``…):

1. content rules: a prompt with a configured keyword or with code goes to the alias the rule
   names; a prompt no target can hold goes to the alias's ``long_context_alias``;
2. policy: targets outside the consumer's ``allowed_regions`` / ``allowed_providers`` are dropped;
   a prompt carrying personal data under the rule ``local`` keeps only providers inside this
   deployment, under ``refuse`` it is refused (403 naming the rule);
3. strategy: the targets left are ordered by priority, weight, least latency (EWMA of the
   sidecar's ProviderStats, read from a background snapshot) or lowest estimated cost; a feature
   flag ``router.<alias>.strategy`` may roll a strategy out to a share of consumers;
4. the chain is signed under ``DEEPGATE_ROUTE_KEY`` into the ``x-deepgate-route`` request header
   for the sidecar, which falls back along it and says in its answer which target served.

The request id the signature is bound to is the one the sidecar sees: the router sets
``x-request-id`` when the client did not send one.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
from collections.abc import Callable
from typing import Any

import orjson

from deepgate.chat import text_slots
from deepgate.errors import ContextLengthExceeded, NotFound, PermissionDenied
from deepgate.flags import FLAGS, FlagContext
from deepgate.request_facts import Facts
from deepgate.route_signature import HEADER as ROUTE_HEADER
from deepgate.route_signature import sign_route
from plugins.base import PluginSpec, RequestContext
from plugins.prompt_filter import count_prompt_tokens, encoding_for
from plugins.router.config import (
    STRATEGIES,
    CompiledAlias,
    CompiledRule,
    Config,
    Strategy,
    TargetInfo,
)
from plugins.router.latency import BOARD
from plugins.router.strategies import order
from plugins.runner.codec import Method, Stop

NAME = "deepgate-router"
REQUEST_ID_HEADER = "x-request-id"
KEY_ENV = "DEEPGATE_ROUTE_KEY"

log = logging.getLogger(__name__)
_RNG = random.Random()  # noqa: S311 - load spreading, not security
_NO_BODY = (Method.GET, Method.HEAD, Method.DELETE, Method.OPTIONS)

# Source code in a prompt: a fenced block, or a line that starts like a statement of a common
# language, or ends like one. Checked line by line with ``match``: a regex searched over the
# whole prompt costs tens of microseconds on a 2 KB prompt, this a few.
_CODE_FENCE = "```"
_CODE_LINE_START = re.compile(
    r"[ \t]*(?:def |class |import |from \S+ import |#include\b|function\b|public |private |"
    r"package |fn |func |let |const |var |SELECT\b|for ?\(|if ?\(|while ?\()"
)
_CODE_LINE_END = ";{}"


def looks_like_code(text: str) -> bool:
    if _CODE_FENCE in text:
        return True
    for line in text.splitlines():
        if _CODE_LINE_START.match(line):
            return True
        stripped = line.rstrip(" \t")
        if stripped and stripped[-1] in _CODE_LINE_END:
            return True
    return False


@functools.cache
def _keyword_pattern(keywords: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(re.escape(k) for k in keywords) + r")\b", re.IGNORECASE)


def _route_key() -> bytes | None:
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


@functools.cache
def _warn_unsigned() -> None:
    log.warning(
        "%s is not set: routes go to the sidecar unsigned and it serves its own static chains",
        KEY_ENV,
    )


# --- the decision -----------------------------------------------------------------------------


def _last_user_text(body: dict[str, Any], dialect: Any) -> str:
    messages = body["messages"]
    last = len(messages) - 1
    return " ".join(
        s.text for s in text_slots(body, dialect) if s.index == last and s.role == "user"
    )


def _rule_matches(rule: CompiledRule, text: str) -> bool:
    if rule.keywords and _keyword_pattern(rule.keywords).search(text):
        return True
    return rule.code and looks_like_code(text)


def _prompt_tokens(ctx: RequestContext, body: dict[str, Any]) -> int:
    """Counted once for the chain: an earlier plugin's count, else ours (the same tokenizer)."""
    counted = ctx.facts.get("prompt_tokens")
    if counted is None:
        counted = count_prompt_tokens(body, ctx.dialect, encoding_for(str(body["model"])))
        ctx.facts["prompt_tokens"] = counted
    return counted


def _completion_tokens(body: dict[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _reachable(facts: Facts, alias: CompiledAlias) -> list[TargetInfo]:
    """The alias's targets in the consumer's allowed regions and providers, or 403 saying why."""
    targets = list(alias.targets)
    regions = facts.get("allowed_regions")
    if regions is not None:
        targets = [t for t in targets if t.region in regions]
        if not targets:
            raise PermissionDenied(
                f"No target of the model {alias.name!r} runs in a region you may use "
                f"({', '.join(regions) or 'none'}); the policy's data residency rule "
                "(regions) excludes the others. Ask for another model, or ask the gateway's "
                "operator for access.",
                param="model",
            )
    providers = facts.get("allowed_providers")
    if providers is not None:
        targets = [t for t in targets if t.provider in providers]
        if not targets:
            raise PermissionDenied(
                f"No target of the model {alias.name!r} left is a provider you may use "
                f"({', '.join(providers) or 'none'}); the policy's providers rule excludes "
                "the others. Ask for another model, or ask the gateway's operator for access.",
                param="model",
            )
    return targets


def _policy_filter(
    ctx: RequestContext, alias: CompiledAlias, conf: Config
) -> tuple[CompiledAlias, list[TargetInfo]]:
    """The targets this consumer and this prompt may reach (the alias may change), or 403."""
    facts = ctx.facts
    targets = _reachable(facts, alias)
    if not facts.get("personal_data_found"):
        return alias, targets
    rule = facts.get("personal_data_rule", "allow")
    if rule == "refuse":
        raise PermissionDenied(
            "The prompt carries personal data, and the policy's personal_data rule 'refuse' "
            "forbids sending it to any model provider. Remove the personal data and retry.",
            param="messages",
        )
    if rule != "local":
        return alias, targets
    inside = [t for t in targets if not t.external]
    if not inside and conf.personal_data_alias is not None:
        # "route to the local model": the alias named for prompts that must stay inside
        alias = conf.compiled[conf.personal_data_alias]
        inside = [t for t in _reachable(facts, alias) if not t.external]
    if not inside:
        raise PermissionDenied(
            f"The prompt carries personal data, the policy's personal_data rule 'local' keeps "
            f"it inside this deployment, and the model {alias.name!r} has no target inside it "
            "you may use. Ask for a local model, or remove the personal data.",
            param="messages",
        )
    return alias, inside


def _fit_context(
    ctx: RequestContext,
    body: dict[str, Any],
    body_size: Callable[[], int],
    conf: Config,
    alias: CompiledAlias,
) -> tuple[CompiledAlias, int | None]:
    """The alias whose targets can hold the prompt, and the prompt's tokens when counted."""
    # A prompt cannot have more tokens than its body has bytes: below the smallest window no
    # count is needed (the common case costs one comparison).
    if alias.min_window is None:
        return alias, None
    tokens = ctx.facts.get("prompt_tokens")
    if tokens is None:
        if body_size() < alias.min_window:
            return alias, None
        tokens = _prompt_tokens(ctx, body)
    if alias.max_window is not None and tokens > alias.max_window:
        if alias.long_context_alias is not None:
            return conf.compiled[alias.long_context_alias], tokens
        raise ContextLengthExceeded(
            f"This request has {tokens} prompt tokens; the largest context window of the model "
            f"{alias.name!r} holds {alias.max_window}. Shorten the messages or ask for a "
            "model with a larger context window.",
            param="messages",
        )
    return alias, tokens


def _strategy(ctx: RequestContext, alias: CompiledAlias) -> Strategy:
    """The alias's strategy, or the variant a rollout flag gives this consumer."""
    if not FLAGS.configured:
        return alias.strategy  # no flag file: skip building the context
    facts = ctx.facts
    chosen = FLAGS.variant(
        f"router.{alias.name}.strategy",
        FlagContext(
            consumer=facts.get("consumer"),
            groups=tuple(facts.get("groups", ())),
            route=facts.get("route"),
            model=alias.name,
        ),
        alias.strategy,
    )
    for strategy in STRATEGIES:
        if chosen == strategy:
            return strategy
    log.warning("flag router.%s.strategy names no strategy; using %s", alias.name, alias.strategy)
    return alias.strategy


def decide(
    ctx: RequestContext, body: dict[str, Any], body_size: Callable[[], int], conf: Config
) -> tuple[CompiledAlias, list[TargetInfo]]:
    """The alias that serves the request and its chain, first target first."""
    model = body.get("model")
    alias = conf.compiled.get(model) if isinstance(model, str) else None
    if alias is None:
        raise NotFound(
            f"The model {model!r} does not exist on this gateway. Use one of: "
            f"{', '.join(sorted(conf.compiled))}.",
            param="model",
            code="model_not_found",
        )
    if alias.rules:
        text = _last_user_text(body, ctx.dialect)
        for rule in alias.rules:
            if _rule_matches(rule, text):
                alias = conf.compiled[rule.alias]
                break
    alias, tokens = _fit_context(ctx, body, body_size, conf, alias)
    alias, targets = _policy_filter(ctx, alias, conf)
    if tokens is not None:
        # targets too small for this prompt go; if none is big enough, the provider says so
        targets = [
            t for t in targets if t.context_window is None or t.context_window >= tokens
        ] or targets
    strategy = _strategy(ctx, alias)
    prompt_tokens = completion_tokens = 0
    if strategy == "lowest_cost":
        prompt_tokens = tokens if tokens is not None else _prompt_tokens(ctx, body)
        completion_tokens = _completion_tokens(body, conf.default_max_tokens)
    chain = order(
        strategy,
        targets,
        weights=[alias.weights[t.label] for t in targets] if strategy == "weighted" else (),
        rng=_RNG,
        latency_ms=BOARD.snapshot(conf.stats) if strategy == "least_latency" else None,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )
    return alias, chain


# --- the handler ------------------------------------------------------------------------------


async def on_request(ctx: RequestContext, conf: Config) -> Stop | None:
    if ctx.call.method in _NO_BODY:
        return None  # no model to route (GET /v1/models)
    # checked again here: the router may run without the prompt filter before it
    body = await ctx.chat()
    raw = await ctx.body()  # already read by the chain: no second ask
    # the body's size bounds its tokens; re-encoded only when an earlier plugin changed it
    alias, chain = decide(
        ctx, body, (lambda: len(orjson.dumps(body))) if ctx.body_changed else raw.__len__, conf
    )
    ctx.facts["alias"] = alias.name
    if ctx.header(REQUEST_ID_HEADER) is None:
        # The sidecar checks the signature against the id it sees: make it ours.
        ctx.set_header(REQUEST_ID_HEADER, ctx.request_id)
    key = _route_key()
    if key is None:
        _warn_unsigned()
        if ctx.header(ROUTE_HEADER) is not None:
            ctx.set_header(ROUTE_HEADER, None)  # never pass on a client's own route
        return None
    labels = [t.label for t in chain]
    ctx.set_header(ROUTE_HEADER, sign_route(key, ctx.request_id, labels, conf.route_ttl_s))
    return None


SPEC = PluginSpec(name=NAME, config=Config, on_request=on_request, wants_body=True)
