"""``deepgate rag``: fill a RAG collection from text and Markdown files, and see what a request
would get from it.

    deepgate rag ingest product_docs docs/ README.md      # chunk, embed, upsert
    deepgate rag query product_docs "how do I rotate a provider key?"
    deepgate rag list

Embeddings come from the inference pool over gRPC (``DEEPGATE_SIDECAR_GRPC``, the sidecar
``make run`` starts) — the same model and path the ``deepgate-rag`` plugin uses at request time —
or, with ``--local``, from the embedding model loaded in this process (no sidecar needed; slower
to start). The store is ``--dsn`` or the default (``DEEPGATE_VECTOR_DSN``, else
``sqlite://$DEEPGATE_DATA_DIR/vectors.db``). See docs/rag.md.

Chunk ids are stable (a hash of collection, source and chunk index), so re-ingesting a file
overwrites its chunks in place and then deletes the ones past its new length: a query running
meanwhile sees the old or the new text of a chunk, never a file with no chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deepgate.aio import run as run_loop
from deepgate.chunking import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_OVERLAP_TOKENS,
    Chunk,
    chunk_text,
    is_markdown,
)
from deepgate.errors import DeepgateError
from deepgate.vectorstore import Hit, Item, VectorStore, VectorStoreError, default_dsn, open_store

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBED_BATCH = 64
SUFFIXES = (".md", ".markdown", ".mdx", ".txt", ".text", ".rst")


class Embedder(Protocol):
    async def embed(self, texts: list[str]) -> list[list[float]]: ...

    async def close(self) -> None: ...


class PoolEmbedder:
    """The sidecar's pool over gRPC, as the plugin reaches it."""

    def __init__(self, address: str, timeout_s: float) -> None:
        from sidecar.pool_client import RemoteInference

        self.address = address
        self.timeout_s = timeout_s
        self._pool = RemoteInference([address])

    async def embed(self, texts: list[str]) -> list[list[float]]:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        return (await self._pool.embed(EMBEDDING_MODEL, texts, deadline)).vectors

    async def close(self) -> None:
        await self._pool.close()


class LocalEmbedder:
    """The embedding model in this process (torch, on CPU or the first GPU)."""

    def __init__(self) -> None:
        from sidecar.pool.embeddings import EmbeddingModel

        self._model = EmbeddingModel(threads=max(1, (os.cpu_count() or 2) // 2))

    async def embed(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = await asyncio.to_thread(self._model.run_batch, texts)
        return vectors

    async def close(self) -> None:
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--dsn",
            default=None,
            help="vector store (default: $DEEPGATE_VECTOR_DSN, else run/vectors.db)",
        )
        sub.add_argument(
            "--local",
            action="store_true",
            help="embed in this process instead of asking the sidecar's pool",
        )
        sub.add_argument(
            "--sidecar",
            default=None,
            help="the sidecar's gRPC address (default: $DEEPGATE_SIDECAR_GRPC or 127.0.0.1:9182)",
        )
        sub.add_argument("--timeout", type=float, default=60.0, help="seconds per embed call")

    ingest = actions.add_parser("ingest", help="chunk, embed and store files (or folders)")
    ingest.add_argument("collection")
    ingest.add_argument("paths", nargs="+", metavar="FILE", type=Path)
    ingest.add_argument(
        "--chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        help="chunk size in o200k_base tokens (default: %(default)s)",
    )
    ingest.add_argument(
        "--overlap-tokens",
        type=int,
        default=DEFAULT_OVERLAP_TOKENS,
        help="tokens shared by neighbouring chunks (default: %(default)s)",
    )
    common(ingest)

    query = actions.add_parser("query", help="print the chunks a request would get")
    query.add_argument("collection")
    query.add_argument("text")
    query.add_argument("-k", "--top-k", type=int, default=4, help="chunks to show")
    query.add_argument("--json", action="store_true", help="one JSON object per chunk")
    common(query)

    listing = actions.add_parser("list", help="collections, dimensions and chunk counts")
    listing.add_argument("--dsn", default=None)


def run(args: argparse.Namespace) -> int:
    try:
        code: int = run_loop(_main(args))
    except (VectorStoreError, DeepgateError, OSError, ValueError) as exc:
        sys.stderr.write(f"deepgate rag {args.action}: {_explain(exc)}\n")
        return 1
    return code


def _explain(exc: BaseException) -> str:
    if isinstance(exc, DeepgateError) and exc.status in (503, 504):
        return (
            f"{exc} — is the sidecar running (make run)? Point --sidecar or "
            "DEEPGATE_SIDECAR_GRPC at it, or embed in-process with --local"
        )
    return str(exc)


async def _main(args: argparse.Namespace) -> int:
    store = open_store(args.dsn or default_dsn())
    try:
        if args.action == "list":
            return await _list(store)
        embedder = _embedder(args)
        try:
            if args.action == "ingest":
                return await _ingest(store, embedder, args)
            return await _query(store, embedder, args)
        finally:
            await embedder.close()
    finally:
        await store.close()


def _embedder(args: argparse.Namespace) -> Embedder:
    if args.local:
        return LocalEmbedder()
    address = args.sidecar or os.environ.get("DEEPGATE_SIDECAR_GRPC") or "127.0.0.1:9182"
    return PoolEmbedder(address, args.timeout)


# -- ingest -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: Path
    source: str  # what the chunks' metadata and citations call it


def source_name(path: Path) -> str:
    """The path relative to the working directory when it is under it, else absolute."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def expand(paths: list[Path]) -> list[SourceFile]:
    files: list[SourceFile] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise ValueError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
            files.extend(SourceFile(p, source_name(p)) for p in found)
        elif path.is_file():
            files.append(SourceFile(path, source_name(path)))
        else:
            raise ValueError(f"{path}: no such file or folder")
    return files


def chunk_id(collection: str, source: str, index: int) -> str:
    digest = hashlib.sha256(f"{collection}\0{source}\0{index}".encode()).hexdigest()
    return digest[:32]


def embedding_text(chunk: Chunk) -> str:
    # the heading path says what the chunk is about, so it is part of what gets embedded
    return f"{chunk.heading}\n\n{chunk.text}" if chunk.heading else chunk.text


async def ingest_file(
    store: VectorStore,
    embedder: Embedder,
    collection: str,
    file: SourceFile,
    chunks: list[Chunk],
) -> tuple[int, int]:
    """Store one file's chunks; returns (chunks written, stale chunks removed)."""
    vectors: list[list[float]] = []
    for start in range(0, len(chunks), EMBED_BATCH):
        batch = chunks[start : start + EMBED_BATCH]
        vectors.extend(await embedder.embed([embedding_text(c) for c in batch]))
    if vectors:
        await store.ensure_collection(collection, len(vectors[0]))
    else:
        try:
            await store.count(collection)
        except VectorStoreError:
            return 0, 0  # an empty file for a collection that does not exist yet
    before = await store.count(collection, {"source": file.source})
    items = [
        Item(
            id=chunk_id(collection, file.source, chunk.index),
            vector=vector,
            text=chunk.text,
            metadata={
                "source": file.source,
                "heading": chunk.heading,
                "chunk": chunk.index,
                "tokens": chunk.tokens,
            },
        )
        for chunk, vector in zip(chunks, vectors, strict=True)
    ]
    await store.upsert(collection, items)
    removed = 0
    for index in range(len(chunks), before):  # a file that got shorter: its tail is stale
        removed += await store.delete(collection, {"source": file.source, "chunk": index})
    return len(items), removed


async def _ingest(store: VectorStore, embedder: Embedder, args: argparse.Namespace) -> int:
    files = expand(args.paths)
    total = 0
    started = time.monotonic()
    for file in files:
        text = file.path.read_text(encoding="utf-8", errors="replace")
        chunks = chunk_text(
            text,
            markdown=is_markdown(file.path.name),
            max_tokens=args.chunk_tokens,
            overlap_tokens=args.overlap_tokens,
        )
        written, removed = await ingest_file(store, embedder, args.collection, file, chunks)
        total += written
        note = f", {removed} stale removed" if removed else ""
        sys.stdout.write(f"{file.source}: {written} chunks{note}\n")
    sys.stdout.write(
        f"{args.collection}: {total} chunks from {len(files)} files in "
        f"{time.monotonic() - started:.1f}s ({store.dsn})\n"
    )
    return 0


# -- query and list -----------------------------------------------------------------------------


def describe(hit: Hit) -> str:
    meta = hit.metadata
    where = str(meta.get("source", "?"))
    if meta.get("heading"):
        where += f" — {meta['heading']}"
    return where


async def _query(store: VectorStore, embedder: Embedder, args: argparse.Namespace) -> int:
    (vector,) = await embedder.embed([args.text])
    hits = await store.query(args.collection, vector, args.top_k)
    if not hits:
        sys.stdout.write(f"{args.collection}: no chunks\n")
    for rank, hit in enumerate(hits, 1):
        if args.json:
            record: dict[str, Any] = {
                "rank": rank,
                "id": hit.id,
                "score": round(hit.score, 4),
                "text": hit.text,
                "metadata": hit.metadata,
            }
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(f"[{rank}] {hit.score:.3f}  {describe(hit)}\n")
            sys.stdout.write("".join(f"    {line}\n" for line in hit.text.splitlines()))
    return 0


async def _list(store: VectorStore) -> int:
    collections = await store.collections()
    if not collections:
        sys.stdout.write(f"no collections in {store.dsn}\n")
    for name, dim in collections.items():
        sys.stdout.write(f"{name}\t{dim} dimensions\t{await store.count(name)} chunks\n")
    return 0
