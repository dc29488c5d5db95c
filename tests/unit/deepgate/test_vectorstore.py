"""Choosing a vector store from its DSN, and the names and filters both backends accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepgate.vectorstore import (
    InvalidName,
    VectorStoreError,
    check_collection_name,
    check_where,
    default_dsn,
    open_store,
)
from deepgate.vectorstore.postgres import PgVectorStore
from deepgate.vectorstore.sqlite import SqliteVecStore, sqlite_path


def test_default_dsn_is_a_sqlite_file_under_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DEEPGATE_VECTOR_DSN", raising=False)
    monkeypatch.setenv("DEEPGATE_DATA_DIR", str(tmp_path))
    assert default_dsn() == f"sqlite://{tmp_path}/vectors.db"
    assert sqlite_path(default_dsn()) == f"{tmp_path}/vectors.db"


def test_default_dsn_prefers_the_explicit_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGATE_VECTOR_DSN", "postgresql://rag@db:5432/deepgate")
    assert default_dsn() == "postgresql://rag@db:5432/deepgate"


@pytest.mark.parametrize(
    ("dsn", "path"),
    [
        ("sqlite:///var/lib/dg/v.db", "/var/lib/dg/v.db"),
        ("sqlite:////var/lib/dg/v.db", "/var/lib/dg/v.db"),
        ("sqlite://run/vectors.db", "run/vectors.db"),
        ("sqlite://:memory:", ":memory:"),
    ],
)
def test_sqlite_paths(dsn: str, path: str) -> None:
    assert sqlite_path(dsn) == path


def test_open_store_picks_the_backend() -> None:
    assert isinstance(open_store("sqlite://:memory:"), SqliteVecStore)
    assert isinstance(open_store("postgresql://u@h/db"), PgVectorStore)
    assert isinstance(open_store("postgres://u@h/db"), PgVectorStore)
    with pytest.raises(VectorStoreError, match=r"unknown vector store 'redis'.*sqlite:///"):
        open_store("redis://localhost")
    with pytest.raises(VectorStoreError, match="names no file"):
        sqlite_path("sqlite://")


@pytest.mark.parametrize("name", ["docs", "product_docs", "kb-2", "a" * 48])
def test_good_collection_names(name: str) -> None:
    assert check_collection_name(name) == name


@pytest.mark.parametrize("name", ["", "Docs", "1docs", "a b", "x;drop", "a" * 49, "é"])
def test_bad_collection_names(name: str) -> None:
    with pytest.raises(InvalidName, match="lower-case letters"):
        check_collection_name(name)


def test_where_filters() -> None:
    assert check_where(None) == {}
    assert check_where({"source": "a.md", "chunk": 2, "ok": True}) == {
        "source": "a.md",
        "chunk": 2,
        "ok": True,
    }
    with pytest.raises(InvalidName):
        check_where({'a"b': 1})
    with pytest.raises(VectorStoreError, match="string, number or boolean"):
        check_where({"tags": ["x"]})
    with pytest.raises(VectorStoreError, match="string, number or boolean"):
        check_where({"none": None})


async def test_nan_vectors_are_refused() -> None:
    store = open_store("sqlite://:memory:")
    try:
        await store.ensure_collection("c", 2)
        with pytest.raises(VectorStoreError, match="NaN"):
            await store.query("c", [float("nan"), 1.0], k=1)
    finally:
        await store.close()


async def test_unreachable_postgres_is_a_store_error() -> None:
    store = open_store("postgresql://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(VectorStoreError, match="cannot reach the PostgreSQL vector store"):
            await store.query("docs", [1.0], k=1)
    finally:
        await store.close()


async def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are notes, not a database " * 100)
    store = open_store(f"sqlite://{path}")
    try:
        with pytest.raises(VectorStoreError, match=r"notes\.db failed"):
            await store.collections()
    finally:
        await store.close()
