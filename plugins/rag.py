"""``deepgate-rag``: ground the model in an ingested collection, with numbered citations.

Runs after the cache (a cached answer needs no context) and before the router (which then sees
the prompt's real size). For each chat request:

1. pick the collection: the route's ``collection``, or the one the request names in the
   ``x-deepgate-rag-collection`` header when it is in the route's ``allowed_collections``
   (any other name is refused with 403; the header never reaches the provider);
2. embed the last user message through the inference pool (``LINK.embed``, within
   ``timeout_ms``) and take the ``top_k`` closest chunks scoring at least ``min_score``;
3. add them as one system message — the route's ``instructions``, then ``[1] source — heading``
   and the chunk's text for each — keeping the message within ``max_context_tokens``
   (o200k_base tokens; a chunk that does not fit is left out, the next smaller one may fit);
4. record what was added in ``ctx.facts["rag"]`` (collection, chunk ids, sources) for the
   sidecar's usage record, and answer with ``x-deepgate-rag: hit | miss | error``.

For OpenAI bodies the message goes after the client's own system/developer messages; for
Anthropic bodies it is appended to ``system``. ``on_error`` defaults to ``open``: when the pool or
the store fails, the request goes on without context (``x-deepgate-rag: error``) and the log says
why (never the prompt). Collections are filled with ``deepgate rag ingest`` (docs/rag.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from pydantic import Field, field_validator

from deepgate import response_cache as rc
from deepgate.chat import Dialect, text_slots
from deepgate.chunking import count_tokens
from deepgate.config import ConfigError
from deepgate.errors import DeepgateError, PermissionDenied, ServiceUnavailable
from deepgate.secrets import is_ref
from deepgate.vectorstore import Hit, VectorStoreError, check_collection_name
from plugins.base import PluginConfig, PluginSpec, RequestContext
from plugins.runner.codec import Stop
from plugins.sidecar_link import LINK

NAME = "deepgate-rag"
COLLECTION_HEADER = "x-deepgate-rag-collection"
STATUS_HEADER = "x-deepgate-rag"
log = logging.getLogger(__name__)

DEFAULT_INSTRUCTIONS = (
    "Answer using the numbered context below when it is relevant. Cite the passages you use "
    "by their numbers, like [1]. If the context does not contain the answer, say so."
)


class Config(PluginConfig):
    collection: str
    allowed_collections: list[str] = Field(default_factory=list)
    store: str | None = None  # a DSN or a reference to one; default: the default store
    top_k: int = Field(default=4, ge=1, le=50)
    min_score: float = Field(default=0.3, ge=-1.0, le=1.0)
    max_context_tokens: int = Field(default=1000, ge=50, le=100_000)
    timeout_ms: int = Field(default=1500, ge=10, le=60_000)
    embedding_model: str = "all-MiniLM-L6-v2"
    instructions: str = DEFAULT_INSTRUCTIONS
    on_error: Literal["open", "closed"] = "open"

    @field_validator("collection")
    @classmethod
    def _collection(cls, name: str) -> str:
        return _valid_name(name)

    @field_validator("allowed_collections")
    @classmethod
    def _allowed(cls, names: list[str]) -> list[str]:
        return [_valid_name(n) for n in names]

    @field_validator("store")
    @classmethod
    def _store(cls, store: str | None) -> str | None:
        if store is None or is_ref(store):
            return store
        if store.startswith(("sqlite://", "postgresql://", "postgres://")):
            return store
        raise ValueError(
            "store must be a DSN (sqlite:///path/vectors.db, postgresql://user@host/db) or a "
            "reference to one ($env://NAME, $file://PATH, $vault://PATH#KEY, $sealed://...)"
        )


def _valid_name(name: str) -> str:
    try:
        return check_collection_name(name)
    except VectorStoreError as exc:
        raise ValueError(str(exc)) from None


def last_user_text(body: dict[str, Any], dialect: Dialect) -> str:
    """The text of the last user message (what the retrieval is for); '' when there is none."""
    last = max((i for i, m in enumerate(body["messages"]) if m.get("role") == "user"), default=-1)
    if last < 0:
        return ""
    return "\n".join(
        s.text for s in text_slots(body, dialect) if s.index == last and s.role == "user"
    ).strip()


def _cite(hit: Hit) -> str:
    where = str(hit.metadata.get("source") or hit.id)
    heading = hit.metadata.get("heading")
    return f"{where} — {heading}" if heading else where


def context_message(
    instructions: str, hits: list[Hit], max_tokens: int
) -> tuple[str, list[Hit], int]:
    """The system text with as many hits (in rank order) as fit, the hits used, its tokens."""
    text = instructions
    used: list[Hit] = []
    for hit in hits:
        candidate = f"{text}\n\n[{len(used) + 1}] {_cite(hit)}\n{hit.text}"
        if count_tokens(candidate) <= max_tokens:
            text = candidate
            used.append(hit)
    return text, used, count_tokens(text) if used else 0


def add_context(body: dict[str, Any], dialect: Dialect, text: str) -> None:
    if dialect == "anthropic":
        system = body.get("system")
        if isinstance(system, list):
            body["system"] = [*system, {"type": "text", "text": text}]
        elif isinstance(system, str) and system:
            body["system"] = f"{system}\n\n{text}"
        else:
            body["system"] = text
        return
    messages = body["messages"]
    at = 0
    while at < len(messages) and messages[at].get("role") in ("system", "developer"):
        at += 1
    messages.insert(at, {"role": "system", "content": text})


def _collection_for(ctx: RequestContext, conf: Config) -> str:
    asked = ctx.header(COLLECTION_HEADER)
    if asked is None:
        return conf.collection
    ctx.set_header(COLLECTION_HEADER, None)  # for the gateway, not for the provider
    asked = asked.strip()
    if asked == conf.collection or asked in conf.allowed_collections:
        return asked
    offered = ", ".join([conf.collection, *conf.allowed_collections])
    raise PermissionDenied(
        f"This route does not offer the RAG collection named in {COLLECTION_HEADER}. "
        f"Use one of: {offered}, or leave the header out.",
        code="rag_collection_not_allowed",
    )


async def on_request(ctx: RequestContext, conf: Config) -> Stop | None:
    body = await ctx.chat()
    collection = _collection_for(ctx, conf)
    question = last_user_text(body, ctx.dialect)
    if not question:
        ctx.add_response_header(STATUS_HEADER, "miss")
        return None
    timeout_s = conf.timeout_ms / 1000
    try:
        vector = (await LINK.embed([question], timeout_s, model=conf.embedding_model))[0]
        store = rc.vector_store(await rc.store_dsn(conf.store))
        hits = await asyncio.wait_for(store.query(collection, vector, conf.top_k), timeout_s)
    except (DeepgateError, VectorStoreError, OSError, TimeoutError, ConfigError) as exc:
        # the type and the collection only: the message may quote the DSN or the request
        log.warning("RAG context skipped for collection %s: %s", collection, type(exc).__name__)
        if conf.on_error == "closed":
            raise ServiceUnavailable(
                "The RAG context for this route could not be fetched and the route requires it. "
                "Retry shortly; operators: check the inference pool, the vector store and that "
                f"collection {collection!r} was ingested (deepgate rag list).",
                code="rag_unavailable",
            ) from None
        ctx.add_response_header(STATUS_HEADER, "error")
        return None
    text, used, tokens = context_message(
        conf.instructions, [h for h in hits if h.score >= conf.min_score], conf.max_context_tokens
    )
    if not used:
        ctx.add_response_header(STATUS_HEADER, "miss")
        return None
    add_context(body, ctx.dialect, text)
    ctx.replace_json(body)
    ctx.facts["rag"] = {
        "collection": collection,
        "chunks": [h.id for h in used],
        "sources": sorted({str(h.metadata.get("source", "")) for h in used}),
        "tokens": tokens,
    }
    if "prompt_tokens" in ctx.facts:
        ctx.facts["prompt_tokens"] += tokens
    ctx.add_response_header(STATUS_HEADER, "hit")
    return None


SPEC = PluginSpec(name=NAME, config=Config, on_request=on_request)
