"""``deepgate-policy``: identity, access control, quotas and compliance, first in the chain.

For each chat request, in this order:

1. identity: the consumer APISIX authenticated (``consumer_name``), its groups and labels from
   the config; the route (``route_id``). Facts ``consumer``, ``groups``, ``route``, ``alias``,
   ``log_opt_out`` for later plugins and the sidecar;
2. access: the route and the model alias must be allowed by the consumer's rule and by every one
   of its groups' (403 naming the rule); provider, region and personal-data rules become facts
   for the router (``access.py``);
3. quotas: the estimate (prompt tokens + the answer's budget, and its price) is reserved on every
   budget the request draws on, in one Redis round trip (``deepgate/quota.py``). The rest of
   the chain runs while Redis answers; the runner waits for the verdict before the request is
   forwarded or answered, and a refusal comes first. Over a limit: 429 with ``Retry-After``.
   Every response carries OpenAI's ``x-ratelimit-*`` headers. If a later plugin stops the
   request, the reservation is released; otherwise the sidecar settles it with the real usage
   (``sidecar/hooks/quota.py``).

The quota store is shared by every route of the process (one connection pool per Redis URL), so
counters are per consumer, group and model, not per route. When it cannot be reached,
``store_unreachable`` decides: ``closed`` answers 503, ``open`` lets the request through
uncounted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from deepgate.config import ConfigError
from deepgate.errors import (
    AuthenticationFailed,
    InvalidRequest,
    PermissionDenied,
    ServiceUnavailable,
)
from deepgate.quota import (
    Counter,
    MemoryQuotaStore,
    Outcome,
    QuotaStore,
    QuotaStoreUnavailable,
    RedisQuotaStore,
    new_reservation_id,
)
from deepgate.secrets import resolve
from plugins.base import PluginSpec, RequestContext
from plugins.policy import access, quotas
from plugins.policy.config import Config, Identity
from plugins.runner.codec import Method, Stop

NAME = "deepgate-policy"

log = logging.getLogger(__name__)

_STORES: dict[tuple[str, ...], QuotaStore] = {}
_WARN_EVERY_S = 30.0
_last_warning = 0.0


async def store_for(conf: Config) -> QuotaStore:
    """The process's store for this config (created on first use, then shared).

    ``redis_url`` may be a secret reference (``$env://``, ``$file://``, ``$vault://``): it is
    resolved once, off the event loop, when the store is created.
    """
    if conf.store == "memory":
        key: tuple[str, ...] = ("memory",)
        found = _STORES.get(key)
        if found is None:
            found = _STORES[key] = MemoryQuotaStore()
        return found
    key = ("redis", conf.redis_url, str(conf.redis_timeout_ms))
    found = _STORES.get(key)
    if found is None:
        try:
            url = await asyncio.to_thread(resolve, conf.redis_url)
        except ConfigError as exc:  # the message names the reference, never a secret value
            raise QuotaStoreUnavailable(f"redis_url: {exc}") from None
        found = _STORES.setdefault(key, RedisQuotaStore(url, conf.redis_timeout_ms / 1000))
    return found


async def close_stores() -> None:
    """Close every store's connections (tests; a runner just exits)."""
    stores = list(_STORES.values())
    _STORES.clear()
    for store in stores:
        await store.close()


def _warn_unreachable(why: str, conf: Config) -> None:
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= _WARN_EVERY_S:
        _last_warning = now
        log.warning(
            "the quota store cannot be reached (%s); store_unreachable=%s: requests are %s",
            why,
            conf.store_unreachable,
            "let through uncounted" if conf.store_unreachable == "open" else "refused with 503",
        )


async def _identify(ctx: RequestContext, conf: Config) -> Identity:
    consumer = await ctx.var("consumer_name")
    if not consumer:
        if not conf.allow_anonymous:
            raise AuthenticationFailed(
                "This route needs an API key: send yours as Authorization: Bearer <key> "
                "(OpenAI SDK: api_key=...) or x-api-key (Anthropic SDK)."
            )
        consumer = ""
    identity = conf.identity(consumer)
    if identity is None:
        raise PermissionDenied(
            f"Consumer {consumer!r} has no policy on this route: ask your operator to add it "
            "under consumers (or a default) in the deepgate-policy config."
        )
    return identity


def _note_route(ctx: RequestContext, identity: Identity, route: str | None) -> None:
    if route:
        ctx.facts["route"] = route
    access.check_route(identity, route)


async def on_request(ctx: RequestContext, conf: Config) -> Stop | None:
    identity = await _identify(ctx, conf)
    facts = ctx.facts
    if identity.consumer:
        facts["consumer"] = identity.consumer
    if identity.groups:
        facts["groups"] = list(identity.groups)
    if identity.labels:
        facts["labels"] = dict(identity.labels)
    access.compliance_facts(identity, facts)
    if ctx.call.method in (Method.GET, Method.HEAD, Method.DELETE, Method.OPTIONS):
        _note_route(ctx, identity, await ctx.var("route_id"))
        return None  # no model, no tokens (e.g. GET /v1/models)

    body = await ctx.json()
    counted = facts.get("prompt_tokens")
    try:
        await ctx.chat()
    except InvalidRequest:
        # A prompt-filter template request ({"template_name": ..., "model": ...}) becomes a chat
        # body only later in the chain: judge its model now, estimate its prompt by its size.
        if not (isinstance(body, dict) and "template_name" in body):
            raise
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise
        counted = len(await ctx.body()) // 2
    alias: str = body["model"]
    facts.setdefault("alias", alias)
    access.check_model(identity, alias)
    access.check_targets(identity, alias, conf)

    _note_route(ctx, identity, await ctx.var("route_id"))
    found = quotas.budgets(identity, alias, conf)
    if not found:
        return None
    slots = None if counted is not None else await ctx.slots()
    est = quotas.estimate(body, ctx.dialect, conf, counted, quotas.needs_spend(found), slots)
    if "messages" in body:
        facts["prompt_tokens"] = est.prompt_tokens
    now = time.time()
    counters = quotas.counters(found, est, now)
    reservation = new_reservation_id()
    try:
        store = await store_for(conf)
    except QuotaStoreUnavailable as exc:
        _store_unreachable(str(exc), conf)
        return None
    # The reservation is on its way to the store: the rest of the chain runs while it works,
    # and the runner waits for the verdict before the request goes anywhere.
    outcome = store.reserve(reservation, counters, conf.reservation_ttl_s)
    ctx.defer(_admit(ctx, conf, store, Reserving(reservation, counters, est, now), outcome))
    return None


@dataclass(frozen=True, slots=True)
class Reserving:
    """One request's reservation on its way to the store."""

    id: str
    counters: list[Counter]
    estimate: quotas.Estimate
    at: float


async def _admit(
    ctx: RequestContext,
    conf: Config,
    store: QuotaStore,
    reserving: Reserving,
    outcome: Awaitable[Outcome],
) -> None:
    """The store's verdict: admitted (rate headers, the reservation in the facts), refused
    (429), or no verdict (store unreachable: fail open or closed)."""
    try:
        result = await outcome
    except QuotaStoreUnavailable as exc:
        _store_unreachable(str(exc), conf)
        return
    reservation = reserving.id
    if result.granted:

        async def release() -> None:
            await store.release(reservation)

        # Runs when this request ends here or later in the chain (a denial below included).
        ctx.on_stop.append(release)
    counters, now = reserving.counters, reserving.at
    for name, value in quotas.rate_headers(counters, result.values, now):
        ctx.add_response_header(name, value)
    if result.refused is not None:
        i = result.refused
        raise quotas.refusal(counters[i], result.values[i], reserving.estimate, now)
    ctx.facts["reservation"] = {
        "id": reservation,
        "store": conf.store,
        "tokens": reserving.estimate.tokens,
        "spend_micro_usd": reserving.estimate.spend_micro_usd,
    }


def _store_unreachable(detail: str, conf: Config) -> None:
    """Fail open (log, let the request through) or closed (503), as the config says."""
    _warn_unreachable(detail, conf)
    if conf.store_unreachable == "open":
        return
    raise ServiceUnavailable(
        "The gateway cannot check your quota right now (its quota store is unreachable) "
        "and refuses requests it cannot count. Retry shortly; operators: check "
        "DEEPGATE_REDIS_URL and the Redis server.",
        code="quota_store_unavailable",
        retry_after=1,
    )


SPEC = PluginSpec(
    name=NAME,
    config=Config,
    on_request=on_request,
    wants_vars=("consumer_name",),
    wants_body=True,
)
