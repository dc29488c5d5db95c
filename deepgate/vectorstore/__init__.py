"""Vector collections for RAG chunks and the semantic cache, behind one interface.

Two backends share the interface (DESIGN.md section 4):

- ``sqlite:///abs/path/vectors.db`` (``sqlite://relative/path.db``, ``sqlite://:memory:``) —
  sqlite-vec inside the process: the embedded default for one machine (``make run``), nothing
  to operate.
- ``postgresql://user@host:port/db`` — PostgreSQL with pgvector: the production store that many
  runners and sidecars share, with an HNSW index on cosine distance.

A collection holds items of one fixed dimension (the embedding model's); every item carries the
text it was embedded from and a flat metadata dict that ``query`` and ``delete`` filter on by
equality. Scores are cosine similarity, higher is closer (1.0 for the same direction).

Errors raised here (all ``VectorStoreError``)::

    VectorStoreError
    ├── InvalidName          a collection name or metadata key the stores cannot hold
    ├── CollectionNotFound   query/upsert/delete on a collection nobody created
    └── DimensionMismatch    a vector whose length differs from the collection's
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from deepgate.config import local_dsn

__all__ = [
    "CollectionNotFound",
    "DimensionMismatch",
    "Hit",
    "InvalidName",
    "Item",
    "MetadataValue",
    "VectorStore",
    "VectorStoreError",
    "default_dsn",
    "open_store",
]

MetadataValue = str | int | float | bool | None

# Collection names become part of table names in PostgreSQL; keys become JSON paths in SQLite.
_COLLECTION_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,47}$")
_METADATA_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class VectorStoreError(Exception):
    """Something the vector store cannot do; the message says what and how to fix it."""


class InvalidName(VectorStoreError):
    pass


class CollectionNotFound(VectorStoreError):
    pass


class DimensionMismatch(VectorStoreError):
    pass


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    vector: list[float]
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    text: str
    metadata: dict[str, Any]


class VectorStore(Protocol):
    """What the RAG plugin, the ingest command and the semantic cache use."""

    dsn: str

    async def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection, or check that the existing one has this dimension."""

    async def upsert(self, name: str, items: list[Item]) -> None:
        """Insert the items, replacing any with the same id (one transaction)."""

    async def delete(self, name: str, where: dict[str, Any]) -> int:
        """Delete the items whose metadata equals every key of ``where``; returns how many."""

    async def query(
        self, name: str, vector: list[float], k: int, where: dict[str, Any] | None = None
    ) -> list[Hit]:
        """The ``k`` items closest to ``vector`` (among those matching ``where``), best first."""

    async def count(self, name: str, where: dict[str, Any] | None = None) -> int:
        """How many items the collection holds (matching ``where``)."""

    async def collections(self) -> dict[str, int]:
        """Every collection with its dimension."""

    async def close(self) -> None: ...


def check_collection_name(name: str) -> str:
    if not _COLLECTION_NAME.match(name):
        raise InvalidName(
            f"collection name {name!r} is not allowed: use 1-48 characters of lower-case "
            "letters, digits, '_' and '-', starting with a letter (e.g. 'product_docs')"
        )
    return name


def check_where(where: dict[str, Any] | None) -> dict[str, Any]:
    if not where:
        return {}
    for key, value in where.items():
        if not _METADATA_KEY.match(key):
            raise InvalidName(
                f"metadata key {key!r} cannot be filtered on: use letters, digits, '_' and '-'"
            )
        if not isinstance(value, str | int | float | bool):
            raise VectorStoreError(
                f"metadata filter {key!r} must be a string, number or boolean, "
                f"not {type(value).__name__}"
            )
    return where


def check_dimension(name: str, dim: int, vector: list[float], what: str) -> None:
    if len(vector) != dim:
        raise DimensionMismatch(
            f"{what} has {len(vector)} dimensions but collection {name!r} holds {dim}-dimension "
            "vectors: embed with the model the collection was built with, or re-ingest into a "
            "new collection"
        )


def default_dsn() -> str:
    """``DEEPGATE_VECTOR_DSN``, else a SQLite file under ``DEEPGATE_DATA_DIR`` (``./run``)."""
    return local_dsn("DEEPGATE_VECTOR_DSN", "vectors.db")


def open_store(dsn: str) -> VectorStore:
    """A store for ``dsn``; connections open lazily, on first use, in the caller's loop."""
    if dsn.startswith("sqlite://"):
        from deepgate.vectorstore.sqlite import SqliteVecStore

        return SqliteVecStore(dsn)
    if dsn.startswith(("postgresql://", "postgres://")):
        from deepgate.vectorstore.postgres import PgVectorStore

        return PgVectorStore(dsn)
    scheme = dsn.split(":", 1)[0] if ":" in dsn else dsn
    raise VectorStoreError(
        f"unknown vector store {scheme!r}: use 'sqlite:///path/to/vectors.db' (sqlite-vec) or "
        "'postgresql://user@host:port/db' (pgvector)"
    )
