"""The vector store's behaviour, the same on both backends: sqlite-vec in a file and a real
PostgreSQL with pgvector (started by pgserver for the session)."""

from __future__ import annotations

import math
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from deepgate.vectorstore import (
    CollectionNotFound,
    DimensionMismatch,
    InvalidName,
    Item,
    VectorStore,
    VectorStoreError,
    open_store,
)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A real PostgreSQL 16 with pgvector (pgserver runs it as user 'pgserver' when we are root)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset on CI machines
        import pgserver

        server = pgserver.get_server(tempfile.mkdtemp(prefix="dg-pg-"), cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'vectors.db'}"
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[VectorStore]:
    store = open_store(dsn)
    yield store
    await store.close()


@pytest.fixture
def name() -> str:
    # the PostgreSQL server lives for the session: each test gets its own collection
    return f"t_{uuid.uuid4().hex[:12]}"


def unit(*xs: float) -> list[float]:
    norm = math.sqrt(sum(x * x for x in xs))
    return [x / norm for x in xs]


def item(id_: str, vector: list[float], **metadata: Any) -> Item:
    return Item(id=id_, vector=vector, text=f"text of {id_}", metadata=metadata)


async def test_query_ranks_by_cosine_similarity(store: VectorStore, name: str) -> None:
    await store.ensure_collection(name, 3)
    await store.upsert(
        name,
        [
            item("far", unit(0, 0, 1), source="a.md"),
            item("near", unit(1, 0.1, 0), source="a.md"),
            item("middle", unit(1, 1, 0), source="b.md"),
        ],
    )
    hits = await store.query(name, unit(1, 0, 0), k=3)
    assert [h.id for h in hits] == ["near", "middle", "far"]
    assert hits[0].score == pytest.approx(1 / math.sqrt(1.01), abs=1e-4)
    assert hits[1].score == pytest.approx(1 / math.sqrt(2), abs=1e-4)
    assert hits[2].score == pytest.approx(0.0, abs=1e-4)
    assert hits[0].text == "text of near"
    assert hits[0].metadata == {"source": "a.md"}
    assert [h.id for h in await store.query(name, unit(1, 0, 0), k=1)] == ["near"]


async def test_scores_ignore_vector_length(store: VectorStore, name: str) -> None:
    await store.ensure_collection(name, 2)
    await store.upsert(name, [item("a", [3.0, 0.0])])
    (hit,) = await store.query(name, [0.5, 0.0], k=5)
    assert hit.score == pytest.approx(1.0, abs=1e-5)


async def test_upsert_replaces_an_item_with_the_same_id(store: VectorStore, name: str) -> None:
    await store.ensure_collection(name, 2)
    await store.upsert(name, [item("x", unit(1, 0), version=1)])
    await store.upsert(
        name, [Item(id="x", vector=unit(0, 1), text="new text", metadata={"version": 2})]
    )
    assert await store.count(name) == 1
    (hit,) = await store.query(name, unit(0, 1), k=3)
    assert (hit.id, hit.text, hit.metadata) == ("x", "new text", {"version": 2})
    assert hit.score == pytest.approx(1.0, abs=1e-5)


async def test_metadata_filter_on_query_count_and_delete(store: VectorStore, name: str) -> None:
    await store.ensure_collection(name, 2)
    await store.upsert(
        name,
        [
            item("a1", unit(1, 0), source="a.md", chunk=0, public=True),
            item("a2", unit(1, 0.2), source="a.md", chunk=1, public=False),
            item("b1", unit(1, 0.1), source="b.md", chunk=0, public=True),
        ],
    )
    hits = await store.query(name, unit(1, 0), k=10, where={"source": "b.md"})
    assert [h.id for h in hits] == ["b1"]
    hits = await store.query(name, unit(1, 0), k=10, where={"source": "a.md", "chunk": 1})
    assert [h.id for h in hits] == ["a2"]
    hits = await store.query(name, unit(1, 0), k=10, where={"public": True})
    assert [h.id for h in hits] == ["a1", "b1"]
    assert await store.count(name, {"source": "a.md"}) == 2
    assert await store.delete(name, {"source": "a.md"}) == 2
    assert await store.delete(name, {"source": "a.md"}) == 0
    assert [h.id for h in await store.query(name, unit(1, 0), k=10)] == ["b1"]


async def test_filtered_query_returns_k_even_when_the_filter_is_selective(
    store: VectorStore, name: str
) -> None:
    # many near neighbours outside the filter must not crowd out the few inside it
    await store.ensure_collection(name, 4)
    items = [item(f"n{i}", unit(1, 0.001 * i, 0, 0), group="noise") for i in range(2000)]
    items += [item(f"w{i}", unit(0, 1, 0.01 * i, 0), group="wanted") for i in range(3)]
    await store.upsert(name, items)
    hits = await store.query(name, unit(1, 0, 0, 0), k=3, where={"group": "wanted"})
    assert sorted(h.id for h in hits) == ["w0", "w1", "w2"]


async def test_dimension_mismatch_is_a_clear_error(store: VectorStore, name: str) -> None:
    await store.ensure_collection(name, 3)
    with pytest.raises(DimensionMismatch, match=r"2 dimensions .* holds 3-dimension"):
        await store.upsert(name, [item("bad", [1.0, 0.0])])
    with pytest.raises(DimensionMismatch, match="query vector has 4 dimensions"):
        await store.query(name, [1.0, 0, 0, 0], k=1)
    with pytest.raises(DimensionMismatch, match="already holds 3-dimension vectors, not 384"):
        await store.ensure_collection(name, 384)
    await store.ensure_collection(name, 3)  # the same dimension again is fine
    assert await store.count(name) == 0


async def test_unknown_collection_and_bad_names(store: VectorStore, name: str) -> None:
    with pytest.raises(CollectionNotFound, match="deepgate rag ingest"):
        await store.query(name, [1.0], k=1)
    with pytest.raises(InvalidName, match="collection name"):
        await store.ensure_collection("Robert'); DROP TABLE x;--", 3)
    await store.ensure_collection(name, 2)
    with pytest.raises(InvalidName, match="metadata key"):
        await store.query(name, [1.0, 0.0], k=1, where={"a'b": 1})
    with pytest.raises(VectorStoreError, match="needs a metadata filter"):
        await store.delete(name, {})


async def test_collections_persist_across_stores(dsn: str, name: str) -> None:
    first = open_store(dsn)
    await first.ensure_collection(name, 2)
    await first.upsert(name, [item("kept", unit(1, 1), source="s")])
    await first.close()
    second = open_store(dsn)
    try:
        assert (await second.collections())[name] == 2
        (hit,) = await second.query(name, unit(1, 1), k=1)
        assert hit.id == "kept"
    finally:
        await second.close()


async def test_concurrent_calls_share_the_store(store: VectorStore, name: str) -> None:
    import asyncio

    await store.ensure_collection(name, 2)
    await asyncio.gather(
        *(store.upsert(name, [item(f"i{i}", unit(1, i / 50), n=i)]) for i in range(50))
    )
    results = await asyncio.gather(*(store.query(name, unit(1, 0), k=1) for _ in range(20)))
    assert all(r[0].id == "i0" for r in results)
    assert await store.count(name) == 50


async def test_postgres_filter_is_exact_where_hnsw_would_miss(pg_dsn: str, name: str) -> None:
    # Half the rows match the filter, so the planner would walk the HNSW index, but every row
    # near the query is filtered out: HNSW's candidate list (ef_search 40) would end up empty.
    import psycopg

    store = open_store(pg_dsn)
    try:
        await store.ensure_collection(name, 3)
        near = [item(f"n{i}", unit(1, 0.0001 * i, 0), group="near") for i in range(1000)]
        far = [item(f"f{i}", unit(-1, 0.0001 * i, 0.01), group="far") for i in range(1000)]
        await store.upsert(name, near + far)
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute(f"ANALYZE dg_vec_{name}")
        hits = await store.query(name, unit(1, 0, 0), k=3, where={"group": "far"})
        assert [h.id for h in hits] == ["f999", "f998", "f997"]
    finally:
        await store.close()
