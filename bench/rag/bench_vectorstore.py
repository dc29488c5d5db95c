"""Vector store query latency: sqlite-vec (exact scan) against PostgreSQL + pgvector (HNSW).

    .venv/bin/python bench/rag/bench_vectorstore.py [--sizes 1000,10000,50000] [--queries 200]

Fills one collection per backend and size with random unit vectors of 384 dimensions (the
embedding model's), then times ``query(k=4)`` one at a time from the store's own event loop:
unfiltered, and with a metadata filter matching 10% of the rows. PostgreSQL is a real server
started by pgserver in a temp dir. Prints one line per backend, size and query kind.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from deepgate.vectorstore import Item, VectorStore, open_store

DIM = 384


def unit(rnd: random.Random) -> list[float]:
    v = [rnd.gauss(0, 1) for _ in range(DIM)]
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


async def fill(store: VectorStore, name: str, size: int, rnd: random.Random) -> float:
    await store.ensure_collection(name, DIM)
    started = time.perf_counter()
    for start in range(0, size, 1000):
        batch = [
            Item(f"i{i}", unit(rnd), f"chunk {i}", {"source": f"doc{i % 10}.md", "chunk": i})
            for i in range(start, min(size, start + 1000))
        ]
        await store.upsert(name, batch)
    return size / (time.perf_counter() - started)


async def timed(store: VectorStore, name: str, queries: list[list[float]], filtered: bool) -> str:
    where = {"source": "doc3.md"} if filtered else None
    await store.query(name, queries[0], 4, where)  # warm
    times = []
    for q in queries:
        t = time.perf_counter()
        hits = await store.query(name, q, 4, where)
        times.append((time.perf_counter() - t) * 1000)
        assert len(hits) == 4
    times.sort()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"


async def bench(dsn: str, label: str, sizes: list[int], n_queries: int) -> None:
    rnd = random.Random(7)
    queries = [unit(rnd) for _ in range(n_queries)]
    store = open_store(dsn)
    try:
        for size in sizes:
            name = f"bench_{size}"
            rate = await fill(store, name, size, rnd)
            for filtered in (False, True):
                kind = "filter 10%" if filtered else "unfiltered"
                result = await timed(store, name, queries, filtered)
                print(f"{label:10} {size:>7} rows  {kind:11} {result}  (upsert {rate:,.0f}/s)")
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(bench(f"sqlite://{Path(tmp) / 'v.db'}", "sqlite-vec", sizes, args.queries))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(tempfile.mkdtemp(prefix="dg-bench-pg-"), cleanup_mode="delete")
    try:
        asyncio.run(bench(server.get_uri(), "pgvector", sizes, args.queries))
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
