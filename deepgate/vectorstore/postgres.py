"""The production vector store: PostgreSQL with pgvector, shared by every runner and sidecar.

Each collection is its own table (``dg_vec_<name>``) with a ``vector(dim)`` column, an HNSW index
on cosine distance for unfiltered queries and a GIN index on the metadata for filtered ones. A
filtered query is answered exactly (the metadata index narrows the rows, then they are sorted by
distance): pgvector's HNSW filters after the index scan and can return fewer than ``k`` rows when
the filter is selective. A few connections are opened lazily and shared by concurrent calls.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql

from deepgate.vectorstore import (
    CollectionNotFound,
    DimensionMismatch,
    Hit,
    Item,
    VectorStoreError,
    check_collection_name,
    check_dimension,
    check_where,
)

POOL_SIZE = 4
CONNECT_TIMEOUT_S = 5

_REGISTRY = """
CREATE TABLE IF NOT EXISTS dg_vec_collections (
    name text PRIMARY KEY,
    dim integer NOT NULL
)
"""


def _literal(vector: list[float]) -> str:
    if not all(math.isfinite(x) for x in vector):
        raise VectorStoreError("a vector holds NaN or infinity: check the embedding model")
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


def _table(name: str) -> sql.Identifier:
    return sql.Identifier(f"dg_vec_{name}")


class PgVectorStore:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        self._opened = 0
        self._open_lock = asyncio.Lock()
        self._all: list[psycopg.AsyncConnection[Any]] = []
        self._dims: dict[str, int] = {}
        self._ready = False

    # -- plumbing -----------------------------------------------------------------------------

    async def _open(self) -> psycopg.AsyncConnection[Any]:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
        except psycopg.OperationalError as exc:
            raise VectorStoreError(
                f"cannot reach the PostgreSQL vector store: {exc}".strip()
                + " (check DEEPGATE_VECTOR_DSN or --dsn, and that the server is up)"
            ) from exc
        if not self._ready:
            await self._prepare(conn)
            self._ready = True
        self._all.append(conn)
        return conn

    async def _prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        row = await (
            await conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
        ).fetchone()
        if row is None:
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as exc:
                raise VectorStoreError(
                    "the pgvector extension is not enabled in this database and this user may "
                    "not enable it: ask a database owner to run 'CREATE EXTENSION vector'"
                ) from exc
        await conn.execute(_REGISTRY)

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn: psycopg.AsyncConnection[Any] | None = None
        if self._idle.empty():
            async with self._open_lock:
                if self._opened < POOL_SIZE:
                    conn = await self._open()
                    self._opened += 1
        if conn is None:
            conn = await self._idle.get()
        try:
            yield conn
        except psycopg.Error as exc:
            # the server went away, a statement timed out, a table was dropped under us...
            raise VectorStoreError(
                f"the PostgreSQL vector store failed ({type(exc).__name__}): {exc}".strip()
            ) from exc
        finally:
            if conn.closed:
                self._opened -= 1
                self._all.remove(conn)
            else:
                self._idle.put_nowait(conn)

    async def _dim(self, conn: psycopg.AsyncConnection[Any], name: str) -> int:
        dim = self._dims.get(name)
        if dim is None:
            cur = await conn.execute("SELECT dim FROM dg_vec_collections WHERE name = %s", (name,))
            row = await cur.fetchone()
            if row is None:
                raise CollectionNotFound(
                    f"collection {name!r} does not exist in the PostgreSQL store: ingest into it "
                    f"first ('deepgate rag ingest {name} FILE...')"
                )
            dim = int(row[0])
            self._dims[name] = dim
        return dim

    # -- the interface ------------------------------------------------------------------------

    async def ensure_collection(self, name: str, dim: int) -> None:
        check_collection_name(name)
        if dim < 1:
            raise VectorStoreError(f"collection {name!r}: dimension must be positive, not {dim}")
        table = _table(name)
        async with self._conn() as conn, conn.transaction():
            # two processes creating the same collection at once would race on CREATE TABLE
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dg_vec:{name}",))
            await conn.execute(
                "INSERT INTO dg_vec_collections(name, dim) VALUES (%s, %s) "
                "ON CONFLICT (name) DO NOTHING",
                (name, dim),
            )
            existing = await self._dim(conn, name)
            if existing != dim:
                raise DimensionMismatch(
                    f"collection {name!r} already holds {existing}-dimension vectors, not {dim}: "
                    "use the embedding model it was built with, or a new collection name"
                )
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, "
                    "embedding vector({}) NOT NULL, text text NOT NULL, "
                    "metadata jsonb NOT NULL DEFAULT '{{}}')"
                ).format(table, sql.Literal(dim))
            )
            await conn.execute(
                sql.SQL(
                    "CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding vector_cosine_ops)"
                ).format(sql.Identifier(f"dg_vec_{name}_hnsw"), table)
            )
            await conn.execute(
                sql.SQL(
                    "CREATE INDEX IF NOT EXISTS {} ON {} USING gin (metadata jsonb_path_ops)"
                ).format(sql.Identifier(f"dg_vec_{name}_meta"), table)
            )

    async def upsert(self, name: str, items: list[Item]) -> None:
        check_collection_name(name)
        async with self._conn() as conn:
            dim = await self._dim(conn, name)
            rows = []
            for item in items:
                check_dimension(name, dim, item.vector, f"item {item.id!r}")
                rows.append((item.id, _literal(item.vector), item.text, json.dumps(item.metadata)))
            if not rows:
                return
            query = sql.SQL(
                "INSERT INTO {} (id, embedding, text, metadata) "
                "VALUES (%s, %s::vector, %s, %s::jsonb) ON CONFLICT (id) DO UPDATE SET "
                "embedding = excluded.embedding, text = excluded.text, metadata = excluded.metadata"
            ).format(_table(name))
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(query, rows)

    async def delete(self, name: str, where: dict[str, Any]) -> int:
        check_collection_name(name)
        if not where:
            raise VectorStoreError(
                "delete needs a metadata filter (e.g. {'source': 'docs/a.md'}); "
                "an empty one would empty the whole collection"
            )
        check_where(where)
        async with self._conn() as conn:
            await self._dim(conn, name)
            cur = await conn.execute(
                sql.SQL("DELETE FROM {} WHERE metadata @> %s::jsonb").format(_table(name)),
                (json.dumps(where),),
            )
            return cur.rowcount

    async def query(
        self, name: str, vector: list[float], k: int, where: dict[str, Any] | None = None
    ) -> list[Hit]:
        check_collection_name(name)
        where = check_where(where)
        if k < 1:
            return []
        async with self._conn() as conn:
            dim = await self._dim(conn, name)
            check_dimension(name, dim, vector, "the query vector")
            literal = _literal(vector)
            if not where:
                query = sql.SQL(
                    "SELECT id, text, metadata, embedding <=> %s::vector AS distance FROM {} "
                    "ORDER BY distance LIMIT %s"
                ).format(_table(name))
                cur = await conn.execute(query, (literal, k))
                rows = await cur.fetchall()
            else:
                # Exact: the second sort key keeps the planner off the HNSW index (which can
                # only order by distance alone, and filters too late); the GIN index on the
                # metadata narrows the rows instead.
                query = sql.SQL(
                    "SELECT id, text, metadata, embedding <=> %s::vector AS distance FROM {} "
                    "WHERE metadata @> %s::jsonb ORDER BY distance, id LIMIT %s"
                ).format(_table(name))
                cur = await conn.execute(query, (literal, json.dumps(where), k))
                rows = await cur.fetchall()
        return [
            Hit(id=row[0], score=1.0 - float(row[3]), text=row[1], metadata=dict(row[2]))
            for row in rows
        ]

    async def count(self, name: str, where: dict[str, Any] | None = None) -> int:
        check_collection_name(name)
        where = check_where(where)
        async with self._conn() as conn:
            await self._dim(conn, name)
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE metadata @> %s::jsonb").format(_table(name)),
                (json.dumps(where),),
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def collections(self) -> dict[str, int]:
        async with self._conn() as conn:
            cur = await conn.execute("SELECT name, dim FROM dg_vec_collections ORDER BY name")
            return {str(row[0]): int(row[1]) for row in await cur.fetchall()}

    async def close(self) -> None:
        conns, self._all = self._all, []
        self._opened = 0
        self._idle = asyncio.Queue()
        for conn in conns:
            await conn.close()
