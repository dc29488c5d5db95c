"""The embedded vector store: sqlite-vec in a SQLite file.

One connection per store, used from a worker thread under an asyncio lock, so the event loop never
waits on disk. WAL mode and a busy timeout let the runner, the sidecar and ``deepgate rag ingest``
share the file. A query is an exact scan with sqlite-vec's ``vec_distance_cosine`` over the
collection's rows (after the metadata filter): exact results, and fast enough for the tens of
thousands of chunks one machine holds (bench/README.md has the figures). Beyond that, use pgvector.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlite_vec

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

try:  # a SQLite built with extension loading (pysqlite3-binary); the stdlib's may lack it
    from pysqlite3 import dbapi2 as sqlite3
except ImportError:  # pragma: no cover - pysqlite3-binary is a Linux dependency
    import sqlite3

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dg_collections (
    name TEXT PRIMARY KEY,
    dim INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dg_items (
    collection TEXT NOT NULL REFERENCES dg_collections(name),
    id TEXT NOT NULL,
    embedding BLOB NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (collection, id)
);
"""


def sqlite_path(dsn: str) -> str:
    """``sqlite:///abs/x.db`` and ``sqlite:////abs/x.db`` → ``/abs/x.db``; ``sqlite://rel.db``."""
    rest = dsn.removeprefix("sqlite://")
    if rest.startswith("//"):
        rest = rest[1:]
    if not rest:
        raise VectorStoreError(
            f"vector store DSN {dsn!r} names no file: use 'sqlite:///path/to/vectors.db'"
        )
    return rest


def _where_sql(where: dict[str, Any]) -> tuple[str, list[Any]]:
    clauses = []
    params: list[Any] = []
    for key, value in where.items():
        # keys are checked against a strict pattern, so quoting them into the JSON path is safe
        clauses.append(f" AND json_extract(metadata, '$.\"{key}\"') = ?")
        params.append(value)
    return "".join(clauses), params


def _blob(vector: list[float]) -> bytes:
    if not all(math.isfinite(x) for x in vector):
        raise VectorStoreError("a vector holds NaN or infinity: check the embedding model")
    blob: bytes = sqlite_vec.serialize_float32(vector)
    return blob


class SqliteVecStore:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._path = sqlite_path(dsn)
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._dims: dict[str, int] = {}

    # -- plumbing -----------------------------------------------------------------------------

    def _connect(self) -> Any:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        try:
            conn.enable_load_extension(True)
            sqlite_vec.load(conn)
            conn.enable_load_extension(False)
        except (AttributeError, sqlite3.OperationalError) as exc:
            conn.close()
            raise VectorStoreError(
                f"cannot load sqlite-vec into SQLite {sqlite3.sqlite_version}: install "
                "pysqlite3-binary (a SQLite with extension loading)"
            ) from exc
        conn.execute("PRAGMA busy_timeout = 5000")
        if self._path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(_SCHEMA)
        return conn

    async def _run(self, fn: Callable[[Any], T]) -> T:
        async with self._lock:

            def call() -> T:
                if self._conn is None:
                    self._conn = self._connect()
                return fn(self._conn)

            try:
                return await asyncio.to_thread(call)
            except sqlite3.Error as exc:
                # locked past the busy timeout, disk full, a file that is not a database...
                raise VectorStoreError(
                    f"the SQLite vector store {self._path} failed: {exc}"
                ) from exc

    def _dim(self, conn: Any, name: str) -> int:
        dim = self._dims.get(name)
        if dim is None:
            row = conn.execute("SELECT dim FROM dg_collections WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise CollectionNotFound(
                    f"collection {name!r} does not exist in {self.dsn}: ingest into it first "
                    f"('deepgate rag ingest {name} FILE...')"
                )
            dim = int(row[0])
            self._dims[name] = dim
        return dim

    # -- the interface ------------------------------------------------------------------------

    async def ensure_collection(self, name: str, dim: int) -> None:
        check_collection_name(name)
        if dim < 1:
            raise VectorStoreError(f"collection {name!r}: dimension must be positive, not {dim}")

        def run(conn: Any) -> None:
            conn.execute(
                "INSERT INTO dg_collections(name, dim) VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
                (name, dim),
            )
            existing = self._dim(conn, name)
            if existing != dim:
                raise DimensionMismatch(
                    f"collection {name!r} already holds {existing}-dimension vectors, not {dim}: "
                    "use the embedding model it was built with, or a new collection name"
                )

        await self._run(run)

    async def upsert(self, name: str, items: list[Item]) -> None:
        check_collection_name(name)

        def run(conn: Any) -> None:
            dim = self._dim(conn, name)
            rows = []
            for item in items:
                check_dimension(name, dim, item.vector, f"item {item.id!r}")
                rows.append(
                    (name, item.id, _blob(item.vector), item.text, json.dumps(item.metadata))
                )
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO dg_items(collection, id, embedding, text, metadata) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(collection, id) DO UPDATE SET "
                    "embedding = excluded.embedding, text = excluded.text, "
                    "metadata = excluded.metadata",
                    rows,
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._run(run)

    async def delete(self, name: str, where: dict[str, Any]) -> int:
        check_collection_name(name)
        if not where:
            raise VectorStoreError(
                "delete needs a metadata filter (e.g. {'source': 'docs/a.md'}); "
                "an empty one would empty the whole collection"
            )
        clause, params = _where_sql(check_where(where))

        def run(conn: Any) -> int:
            self._dim(conn, name)
            cur = conn.execute(
                f"DELETE FROM dg_items WHERE collection = ?{clause}",  # noqa: S608
                [name, *params],
            )
            return int(cur.rowcount)

        return await self._run(run)

    async def query(
        self, name: str, vector: list[float], k: int, where: dict[str, Any] | None = None
    ) -> list[Hit]:
        check_collection_name(name)
        clause, params = _where_sql(check_where(where))
        if k < 1:
            return []

        def run(conn: Any) -> list[Hit]:
            dim = self._dim(conn, name)
            check_dimension(name, dim, vector, "the query vector")
            rows = conn.execute(
                "SELECT id, text, metadata, vec_distance_cosine(embedding, ?) AS distance "  # noqa: S608
                f"FROM dg_items WHERE collection = ?{clause} ORDER BY distance, id LIMIT ?",
                [_blob(vector), name, *params, k],
            ).fetchall()
            return [
                Hit(id=row[0], score=1.0 - float(row[3]), text=row[1], metadata=json.loads(row[2]))
                for row in rows
            ]

        return await self._run(run)

    async def count(self, name: str, where: dict[str, Any] | None = None) -> int:
        check_collection_name(name)
        clause, params = _where_sql(check_where(where))

        def run(conn: Any) -> int:
            self._dim(conn, name)
            row = conn.execute(
                f"SELECT count(*) FROM dg_items WHERE collection = ?{clause}",  # noqa: S608
                [name, *params],
            ).fetchone()
            return int(row[0])

        return await self._run(run)

    async def collections(self) -> dict[str, int]:
        def run(conn: Any) -> dict[str, int]:
            rows = conn.execute("SELECT name, dim FROM dg_collections ORDER BY name").fetchall()
            return {str(row[0]): int(row[1]) for row in rows}

        return await self._run(run)

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await asyncio.to_thread(conn.close)
