"""End to end: the semantic cache layer through the official SDKs.

A stack of its own: a real Redis, the sidecar in role ``all`` (fake providers, and the pool's real
embedding model behind gRPC ``Embed`` for the runner and ``inference.embed`` for the write-back),
sqlite-vec as the vector store, and the APISIX stand-in serving the shipped routes with the
cache's semantic layer switched on. A question asked again in other words is answered from the
cache, as JSON or as a replayed stream, without a provider call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deepgate.vectorstore import VectorStoreError, open_store
from tests.e2e.conftest import OwnStack, edit_plugin, own_stack, shipped_routes, wait_until
from tests.e2e.test_cache import BOB_KEY

KEPT = ("deepgate-cache", "deepgate-router")

SemanticStack = OwnStack


def store_at(tmp: Path) -> str:
    return f"sqlite://{tmp / 'vectors.db'}"


def indexed(stack: SemanticStack) -> int:
    """How many questions the sidecar has indexed so far."""

    async def count() -> int:
        store = open_store(store_at(stack.tmp))
        try:
            return await store.count("deepgate-cache")
        except VectorStoreError:
            return 0  # the collection is created with the first entry
        finally:
            await store.close()

    return asyncio.run(count())


def routes_for(tmp: Path) -> Callable[[int], dict[str, Any]]:
    """The shipped routes with the cache (semantic on) and the router alone on the chat routes."""
    store = store_at(tmp)

    def routes(sidecar_port: int) -> dict[str, Any]:
        found = shipped_routes(sidecar_port, KEPT, bob=BOB_KEY)
        semantic = {"threshold": 0.9, "store": store, "timeout_ms": 5000}
        edit_plugin(found, "deepgate-cache", lambda c: c.update(semantic=semantic))
        return found

    return routes


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SemanticStack]:
    tmp = tmp_path_factory.mktemp("semantic")
    with own_stack(tmp, routes_for(tmp), role="all") as s:
        yield s


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def first_then(stack: SemanticStack, asked: str) -> str:
    """Ask once (a miss the sidecar writes back and indexes); the answer the client got."""
    before = indexed(stack)
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=ask(asked),  # type: ignore[arg-type]
        )
    assert raw.headers["x-deepgate-cache"] == "miss"
    # the semantic index is written in the background, just after the answer
    wait_until(lambda: indexed(stack) > before, "the semantic index", 30)
    return raw.parse().choices[0].message.content or ""


def test_a_question_in_other_words_is_a_semantic_hit(stack: SemanticStack) -> None:
    answer = first_then(stack, "What is the boiling point of water at sea level?")
    calls = stack.provider_calls()
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=ask("At sea level, what is the boiling point of water?"),  # type: ignore[arg-type]
        )
        stream = oa.chat.completions.create(
            model="deepseek-chat",
            messages=ask("At sea level, what's the boiling point of water?"),  # type: ignore[arg-type]
            stream=True,
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert raw.headers["x-deepgate-cache"] == "hit-semantic"
    assert raw.parse().choices[0].message.content == answer
    assert streamed == answer
    assert stack.provider_calls() == calls


def test_another_question_or_consumer_is_a_miss(stack: SemanticStack) -> None:
    first_then(stack, "How do I reset my password?")
    calls = stack.provider_calls()
    with stack.openai() as oa:
        other = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=ask("How do I bake sourdough bread at home?"),  # type: ignore[arg-type]
        )
    with stack.openai(BOB_KEY) as oa:
        bob = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=ask("I forgot my password, how can I reset it?"),  # type: ignore[arg-type]
        )
    assert other.headers["x-deepgate-cache"] == "miss"
    assert bob.headers["x-deepgate-cache"] == "miss"
    assert stack.provider_calls() == calls + 2
