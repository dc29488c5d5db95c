"""The response cache's shared rules: what makes two requests the same, and how an answer is kept.

Two processes meet here. The ``deepgate-cache`` plugin (runner) computes a request's key, looks it
up and replays a hit; the sidecar's write-back hook stores the answer a provider gave under the key
the plugin chose (it travels in the sealed chain facts). Both must agree on the key, the Redis
entry format and the TTL, so those live in this one module, which knows neither APISIX nor gRPC.

- **Key**: SHA-256 of the request normalised (keys sorted; ``null`` parameters dropped; numbers
  of the sampling parameters as floats; a content array holding one text part as that text),
  with the parameters that cannot change the answer left out (``stream``, ``stream_options``,
  ``user``, ``metadata``, ...), prefixed by the scope (one consumer, or a whole route) and the
  dialect. Everything else in the body (model alias, messages, system, temperature, top_p, max
  tokens, tools, tool_choice, response_format, stop, seed, ...) is part of the key, including
  parameters this module has never heard of: an unknown parameter may change the answer.
- **Entry**: one Redis string per key, ``SET key value EX ttl``: JSON with the canonical
  ``chat.completion`` (OpenAI shape, whatever the route's dialect), the target that answered and
  when. Redis expires it; nothing else needs to.
- **Semantic partition**: the semantic layer compares only the last user message; everything
  else of the request (scope, model, system prompt, earlier turns, parameters) must be identical,
  and is hashed into a partition that the vector search filters on.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import orjson

from deepgate.chat import Dialect
from deepgate.redis_wire import RedisWire
from deepgate.secrets import SecretRef

if TYPE_CHECKING:  # the vector store loads only where the semantic layer is configured
    from deepgate.vectorstore import VectorStore

HEADER = "x-deepgate-cache"
KEY_PREFIX = "deepgate:cache:v1:"
ENTRY_VERSION = 1

Status = Literal["hit-exact", "hit-semantic", "miss", "bypass"]
Scope = Literal["consumer", "route"]

# Parameters that change how an answer is delivered or accounted, never what it says.
IGNORED_PARAMS = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
    }
)
# Sampling parameters a client may write as 0 or 0.0, 1 or 1.0: one key for both.
_FLOAT_PARAMS = frozenset({"temperature", "top_p", "frequency_penalty", "presence_penalty"})


class SemanticPlan(TypedDict):
    """What the sidecar needs to index an answer for the semantic layer.

    The text to embed is not in it: the facts travel in a request header, and a prompt can be
    longer than a header may be. The sidecar takes the last user message from the request it
    forwards and embeds it only if it hashes to ``text_sha256`` (the text the plugin compared).
    """

    store: str | None  # vector store DSN or a reference to one; None: the default store
    collection: str
    embedding_model: str
    partition: str
    text_sha256: str


class WritePlan(TypedDict, total=False):
    """``facts["cache"]``: where and for how long the sidecar writes the answer."""

    key: str
    ttl: int
    scope: str  # "consumer" or "route"
    redis: str  # Redis URL or a reference to one (``$env://DEEPGATE_REDIS_URL``)
    semantic: SemanticPlan


# --- keys -------------------------------------------------------------------------------------


def scope_id(scope: Scope, consumer: str | None, route: str | None) -> str:
    """Who shares entries: one consumer, or everyone on the route.

    A request without a consumer (a route without authentication) is the route's anonymous
    user; its consumer scope is the route's.
    """
    if scope == "consumer" and consumer:
        return f"consumer:{consumer}"
    return f"route:{route or ''}"


def _normal_content(content: Any) -> Any:
    if (
        isinstance(content, list)
        and len(content) == 1
        and isinstance(content[0], dict)
        and content[0].get("type") == "text"
        and set(content[0]) == {"type", "text"}
    ):
        return content[0]["text"]
    return content


def _normal_messages(messages: list[Any]) -> list[Any]:
    out = messages
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        normal = _normal_content(content)
        if normal is not content:
            if out is messages:
                out = list(messages)
            out[i] = {**msg, "content": normal}
    return out


def normalised_request(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of a chat body that decide its answer, in one canonical form."""
    out: dict[str, Any] = {}
    for name, value in body.items():
        if name in IGNORED_PARAMS or value is None:
            continue
        if name in _FLOAT_PARAMS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif name == "messages" and isinstance(value, list):
            value = _normal_messages(value)
        elif name == "system":
            value = _normal_content(value)
        out[name] = value
    return out


def _digest(*parts: Any) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def request_key(scope: str, dialect: Dialect, body: dict[str, Any]) -> str:
    """The Redis key of this request's answer in ``scope``."""
    return KEY_PREFIX + _digest(ENTRY_VERSION, scope, dialect, normalised_request(body))


def last_user_index(body: dict[str, Any]) -> int | None:
    messages = body.get("messages") or []
    for i in range(len(messages) - 1, -1, -1):
        msg = messages[i]
        if isinstance(msg, dict) and msg.get("role") == "user":
            return i
    return None


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message ("" when there is none or it holds no text)."""
    i = last_user_index(body)
    return "" if i is None else _message_text(body["messages"][i].get("content"))


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def semantic_partition(scope: str, dialect: Dialect, body: dict[str, Any]) -> str:
    """Everything but the last user message's text: semantic hits must agree on all of it."""
    normal = normalised_request(body)
    i = last_user_index(body)
    if i is not None:
        messages = list(normal["messages"])
        content = messages[i].get("content")
        # Keep what is not text (images): a similar question about another picture differs.
        kept = (
            [p for p in content if not (isinstance(p, dict) and p.get("type") == "text")]
            if isinstance(content, list)
            else []
        )
        messages[i] = {**messages[i], "content": kept}
        normal["messages"] = messages
    return _digest(ENTRY_VERSION, "semantic", scope, dialect, normal)


# --- entries ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheEntry:
    answer: dict[str, Any]  # canonical chat.completion
    target: str | None  # provider:model that produced it
    created: float


def encode_entry(answer: dict[str, Any], target: str | None, now: float | None = None) -> bytes:
    return orjson.dumps(
        {
            "v": ENTRY_VERSION,
            "answer": answer,
            "target": target,
            "created": time.time() if now is None else now,
        }
    )


def decode_entry(raw: bytes | None) -> CacheEntry | None:
    """The entry, or ``None`` for a value this version cannot read (treated as a miss)."""
    if not raw:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("v") != ENTRY_VERSION:
        return None
    answer = data.get("answer")
    if not isinstance(answer, dict) or not cacheable_answer(answer):
        return None
    target = data.get("target")
    return CacheEntry(answer, target if isinstance(target, str) else None, float(data["created"]))


def cacheable_answer(answer: dict[str, Any]) -> bool:
    """A whole, useful answer: one choice with text or tool calls, not cut by a content filter."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    choice = choices[0]
    if choice.get("finish_reason") in (None, "content_filter"):
        return False
    message = choice.get("message")
    if not isinstance(message, dict):
        return False
    return bool(_message_text(message.get("content")) or message.get("tool_calls"))


def answer_chunks(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A cached ``chat.completion`` as the canonical chunk stream a provider would have sent.

    One chunk with the role, reasoning and text; one per tool call; one with the finish reason;
    then the usage chunk (``choices: []``), as OpenAI sends it when usage is asked for.
    """
    base = {
        "id": answer.get("id") or "chatcmpl-cached",
        "object": "chat.completion.chunk",
        "created": answer.get("created") or int(time.time()),
        "model": answer.get("model") or "",
    }
    choice = answer["choices"][0]
    message = choice.get("message") or {}
    delta: dict[str, Any] = {"role": "assistant"}
    if message.get("reasoning_content"):
        delta["reasoning_content"] = message["reasoning_content"]
    text = _message_text(message.get("content"))
    if text:
        delta["content"] = text
    chunks = [{**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}]
    for i, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        piece = {
            "index": i,
            "id": call.get("id"),
            "type": "function",
            "function": {
                "name": function.get("name") or "",
                "arguments": function.get("arguments") or "",
            },
        }
        chunks.append(
            {
                **base,
                "choices": [{"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}],
            }
        )
    finish = choice.get("finish_reason") or "stop"
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if isinstance(answer.get("usage"), dict):
        chunks.append({**base, "choices": [], "usage": answer["usage"]})
    return chunks


# --- Redis ------------------------------------------------------------------------------------


class EntryStore:
    """GET and SET of cache entries: the lookup is the one Redis round trip on the request path,
    through ``deepgate.redis_wire`` (its deadline is the call's; a connection the server closed
    while idle gets one retry on a fresh one)."""

    def __init__(self, url: str, timeout_s: float, max_idle: int = 64) -> None:
        self._wire = RedisWire(url, timeout_s, max_idle=max_idle)

    async def get(self, key: str) -> bytes | None:
        reply = await self._wire.call("GET", key)
        return reply if isinstance(reply, bytes) else None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._wire.call("SET", key, value, "EX", ttl_s)

    async def close(self) -> None:
        await self._wire.close()


_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, float], EntryStore]
] = weakref.WeakKeyDictionary()


def redis_client(url: str, timeout_s: float) -> EntryStore:
    """One store (with its connections) per Redis URL, timeout and event loop, for the process."""
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get((url, timeout_s))
    if client is None:
        client = per_loop[(url, timeout_s)] = EntryStore(url, timeout_s)
    return client


async def close_clients() -> None:
    """Close this loop's connections (at shutdown, and between tests)."""
    per_loop = _clients.pop(asyncio.get_running_loop(), {})
    for client in per_loop.values():
        await client.close()


# --- the vector store of the semantic layer ---------------------------------------------------

_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, VectorStore]] = (
    weakref.WeakKeyDictionary()
)
_collections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[tuple[str, str, int]]] = (
    weakref.WeakKeyDictionary()
)


async def resolve(ref: str) -> str:
    """The value behind a config reference (``$env://``, ``$file://``, ``$vault://``, ...).

    Answered from the secrets cache on the request path; a file or Vault read goes to a thread.
    """
    return await SecretRef(ref).get()


async def store_dsn(ref: str | None) -> str:
    """The DSN a config's ``store`` names (a reference is resolved); the default store if none."""
    from deepgate.vectorstore import default_dsn

    return default_dsn() if ref is None else await resolve(ref)


def vector_store(dsn: str) -> VectorStore:
    """One store per DSN and event loop, for the process."""
    from deepgate.vectorstore import open_store

    per_loop = _stores.setdefault(asyncio.get_running_loop(), {})
    store = per_loop.get(dsn)
    if store is None:
        store = per_loop[dsn] = open_store(dsn)
    return store


async def ensure_collection(store: VectorStore, name: str, dim: int) -> None:
    """Create (or check) the collection once per process and loop, not on every request."""
    known = _collections.setdefault(asyncio.get_running_loop(), set())
    if (store.dsn, name, dim) not in known:
        await store.ensure_collection(name, dim)
        known.add((store.dsn, name, dim))


async def close_stores() -> None:
    loop = asyncio.get_running_loop()
    _collections.pop(loop, None)
    for store in _stores.pop(loop, {}).values():
        await store.close()
