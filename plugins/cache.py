"""``deepgate-cache``: answer repeated requests from the cache, never from a provider.

Runs after the safety plugin (the prompt it sees is the one a provider would get) and before RAG
and the router. For each chat request:

1. **bypass** when the request must not be answered from the cache: ``Cache-Control: no-cache``
   (or ``no-store``), ``n`` above 1, a temperature above ``max_temperature``, tools when
   ``tools`` is ``bypass``, or personal data the safety plugin masked (its answer will carry the
   original data back, which must never reach another request);
2. **exact**: one Redis ``GET`` of the request's key (``deepgate.response_cache``), in the
   consumer's scope or the route's;
3. **semantic** (when configured): the last user message is embedded by the inference pool and
   compared with cached answers of the same scope, model and rest of the conversation; a hit at
   or above ``semantic.threshold`` is answered;
4. **miss**: the request goes on, and the chain facts tell the sidecar where to write the answer
   (``facts["cache"]``); the sidecar stores it only if it arrives whole and successful.

A hit is a Stop in the route's dialect: the cached answer as JSON, or replayed as the SSE stream
the client asked for (OpenAI chunks ending ``data: [DONE]``, or Anthropic's event sequence). Every
answer carries ``x-deepgate-cache: hit-exact | hit-semantic | miss | bypass``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Literal

import orjson
from pydantic import Field, field_validator
from redis.exceptions import RedisError

from deepgate import response_cache as rc
from deepgate.config import ConfigError, StrictModel
from deepgate.errors import DeepgateError, ServiceUnavailable
from deepgate.secrets import is_ref
from plugins.base import PluginConfig, PluginSpec, RequestContext
from plugins.runner.codec import Entries, Method, Stop
from plugins.sidecar_link import LINK
from sidecar.faces import anthropic as anthropic_face
from sidecar.faces import openai as openai_face

NAME = "deepgate-cache"
log = logging.getLogger(__name__)

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_NO_CACHE = ("no-cache", "no-store")


def _check_reference(value: str, schemes: tuple[str, ...], what: str) -> str:
    if is_ref(value) or value.startswith(schemes):
        return value
    raise ValueError(
        f"{what} must be a reference ($env://NAME, $file://PATH, $vault://PATH#KEY, "
        f"$sealed://...) or a URL starting with {' or '.join(schemes)}"
    )


class SemanticConfig(StrictModel):
    """The semantic layer; absent from the config means off."""

    threshold: float = Field(default=0.95, gt=0.0, le=1.0)
    embedding_model: str = Field(default="all-MiniLM-L6-v2", min_length=1)
    collection: str = Field(default="deepgate-cache", pattern=r"^[a-z][a-z0-9_-]{0,47}$")
    store: str | None = None  # vector store DSN or reference; None: the default store
    timeout_ms: int = Field(default=200, gt=0, le=10_000)

    @field_validator("store")
    @classmethod
    def _store_ref(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _check_reference(value, ("sqlite:", "postgresql://", "postgres://"), "store")


class Config(PluginConfig):
    # A cache that cannot answer should not stop traffic: open unless the route says otherwise.
    on_error: Literal["open", "closed"] = "open"
    scope: rc.Scope = "consumer"
    ttl_s: int = Field(default=3600, gt=0, le=30 * 86400)
    redis_url: str = "$env://DEEPGATE_REDIS_URL"
    redis_timeout_ms: int = Field(default=100, gt=0, le=10_000)
    max_temperature: float | None = Field(default=1.0, ge=0.0)
    tools: Literal["cache", "bypass"] = "cache"
    semantic: SemanticConfig | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_ref(cls, value: str) -> str:
        return _check_reference(value, _REDIS_SCHEMES, "redis_url")


# --- bypass rules -----------------------------------------------------------------------------


def bypass_reason(ctx: RequestContext, body: dict[str, Any], conf: Config) -> str | None:
    """Why this request must not be answered from (or written to) the cache, if it must not."""
    control = (ctx.header("cache-control") or "").lower()
    if any(word in control for word in _NO_CACHE):
        return "cache-control"
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return "n"
    temperature = body.get("temperature")
    if (
        conf.max_temperature is not None
        and isinstance(temperature, int | float)
        and temperature > conf.max_temperature
    ):
        return "temperature"
    if conf.tools == "bypass" and body.get("tools"):
        return "tools"
    if ctx.facts.get("restore"):
        return "personal-data"
    return None


# --- replay -----------------------------------------------------------------------------------


def replay(ctx: RequestContext, body: dict[str, Any], entry: rc.CacheEntry, status: str) -> Stop:
    """The cached answer as the client's SDK expects it: JSON or SSE, OpenAI or Anthropic."""
    headers: Entries = [(rc.HEADER, status)]
    stream = body.get("stream") is True
    if not stream:
        if ctx.dialect == "anthropic":
            payload = anthropic_face.to_anthropic_message(entry.answer, str(body["model"]))
        else:
            payload = entry.answer
        headers.append(("content-type", "application/json"))
        return Stop(status=200, headers=headers, body=orjson.dumps(payload))
    chunks = rc.answer_chunks(entry.answer)
    events: list[bytes] = []
    if ctx.dialect == "anthropic":
        encoder = anthropic_face.AnthropicStreamEncoder(model=str(body["model"]))
        for chunk in chunks:
            events += encoder.feed(chunk)
        events += encoder.finish()
    else:
        include_usage = openai_face.wants_usage(body)
        for chunk in chunks:
            event = openai_face.sse_chunk(chunk, include_usage)
            if event is not None:
                events.append(event)
        events.append(openai_face.DONE)
    headers += [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
    return Stop(status=200, headers=headers, body=b"".join(events))


# --- the handler ------------------------------------------------------------------------------


def _mark(ctx: RequestContext, status: rc.Status) -> None:
    ctx.facts["cache_status"] = status
    ctx.add_response_header(rc.HEADER, status)


async def _get(conf: Config, key: str) -> bytes | None:
    url = await rc.resolve(conf.redis_url)
    return await rc.redis_client(url, conf.redis_timeout_ms / 1000).get(key)


async def on_request(ctx: RequestContext, conf: Config) -> Stop | None:
    if ctx.call.method != Method.POST:
        return None
    body = await ctx.chat()
    if bypass_reason(ctx, body, conf) is not None:
        _mark(ctx, "bypass")
        return None
    consumer = await ctx.var("consumer_name") if conf.scope == "consumer" else None
    # The route is asked of APISIX only when the scope needs it (one round trip less).
    route = None if consumer else await ctx.var("route_id")
    scope = rc.scope_id(conf.scope, consumer, route)
    key = rc.request_key(scope, ctx.dialect, body)
    try:
        entry = rc.decode_entry(await _get(conf, key))
    except (RedisError, OSError, TimeoutError, ConfigError) as exc:
        return _unavailable(ctx, conf, "read", exc)
    if entry is not None:
        return replay(ctx, body, entry, "hit-exact")
    plan: rc.WritePlan = {
        "key": key,
        "ttl": conf.ttl_s,
        "scope": conf.scope,
        "redis": conf.redis_url,
    }
    if conf.semantic is not None:
        found = await _semantic(ctx, conf, conf.semantic, scope, body, plan)
        if found is not None:
            return replay(ctx, body, found, "hit-semantic")
    _warn_without_route_key()
    ctx.facts["cache"] = dict(plan)
    _mark(ctx, "miss")
    return None


async def _semantic(
    ctx: RequestContext,
    conf: Config,
    sem: SemanticConfig,
    scope: str,
    body: dict[str, Any],
    plan: rc.WritePlan,
) -> rc.CacheEntry | None:
    """The closest cached answer of the same partition, if it is close enough and still cached."""
    from deepgate.vectorstore import VectorStoreError

    text = rc.last_user_text(body)
    if not text:
        return None
    partition = rc.semantic_partition(scope, ctx.dialect, body)
    plan["semantic"] = {
        "store": sem.store,
        "collection": sem.collection,
        "embedding_model": sem.embedding_model,
        "partition": partition,
        "text_sha256": rc.text_digest(text),
    }
    timeout_s = sem.timeout_ms / 1000
    try:
        vector = (await LINK.embed([text], timeout_s, model=sem.embedding_model))[0]
        store = rc.vector_store(await rc.store_dsn(sem.store))
        await rc.ensure_collection(store, sem.collection, len(vector))
        hits = await asyncio.wait_for(
            store.query(sem.collection, vector, 1, {"partition": partition}), timeout_s
        )
        if not hits or hits[0].score < sem.threshold:
            return None
        key = str(hits[0].metadata.get("key", ""))
        raw = await _get(conf, key)
    except (DeepgateError, VectorStoreError, RedisError, OSError, TimeoutError, ConfigError) as exc:
        _unavailable(ctx, conf, "searched semantically", exc, mark=False)
        return None
    entry = rc.decode_entry(raw)
    if entry is None:
        # The entry expired since it was indexed (or was never written): a miss, and its
        # question leaves the index so that it no longer hides a live neighbour.
        _forget(store, sem.collection, key)
    return entry


_forgetting: set[asyncio.Task[None]] = set()


def _forget(store: Any, collection: str, key: str) -> None:
    async def forget() -> None:
        from deepgate.vectorstore import VectorStoreError

        try:
            await store.delete(collection, {"key": key})
        except (VectorStoreError, OSError) as exc:
            log.warning("a stale semantic cache entry was not removed: %s", type(exc).__name__)

    task = asyncio.create_task(forget())
    _forgetting.add(task)
    task.add_done_callback(_forgetting.discard)


def _unavailable(
    ctx: RequestContext, conf: Config, what: str, exc: BaseException, *, mark: bool = True
) -> Stop | None:
    log.warning("the response cache could not be %s: %s", what, type(exc).__name__)
    if conf.on_error == "open":
        if mark:
            _mark(ctx, "bypass")
        return None
    raise ServiceUnavailable(
        "The response cache is unreachable and this route requires it. Retry shortly; operators: "
        "check the Redis server and vector store in the deepgate-cache config.",
        code="cache_unavailable",
    ) from None


_warned = False


def _warn_without_route_key() -> None:
    global _warned  # one warning per process
    if not _warned and not os.environ.get("DEEPGATE_ROUTE_KEY"):
        _warned = True
        log.warning(
            "deepgate-cache: DEEPGATE_ROUTE_KEY is not set, so the sidecar cannot read where to "
            "write answers and every request will be a miss; set it for runner and sidecar"
        )


SPEC = PluginSpec(name=NAME, config=Config, on_request=on_request)
