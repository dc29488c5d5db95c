"""The inference pool's batching: batched against one-at-a-time, same models, same run.

For the embedding model and the safety classifier, N closed-loop callers (concurrency 1, 8, 32)
each submit one text at a time through a ``MicroBatcher``: once with batching (max_batch_size 32,
max_wait_ms 5) and once without (max_batch_size 1). Reported: items/s and p50/p99 latency per
point, and the batching speed-up at each concurrency (target: >= 5x at 32 on CPU).

    .venv/bin/python bench/pool/bench_pool.py [--quick] [--device cuda:0] [--batch 32]
        [--threads N] [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sidecar.pool.batcher import MicroBatcher
from sidecar.pool.embeddings import EmbeddingModel
from sidecar.pool.safety import SafetyClassifier

TEXTS = [
    f"Request {i}: please summarise the quarterly report and list the three main risks."
    for i in range(512)
]


async def point(model: Any, batch: int, concurrency: int, items: int) -> tuple[float, float, float]:
    batcher = MicroBatcher(model, max_batch_size=batch, max_wait_ms=5, max_queue=100_000)
    latencies: list[float] = []
    per_caller = max(1, items // concurrency)

    async def caller(k: int) -> None:
        for i in range(per_caller):
            started = time.perf_counter()
            await batcher.submit([TEXTS[(k * per_caller + i) % len(TEXTS)]])
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller(k) for k in range(min(concurrency, 4))))  # warm-up
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    await batcher.drain(5)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    args = parser.parse_args()
    items = 96 if args.quick else 640
    embedder = EmbeddingModel(args.device, args.batch, args.threads, args.dtype)
    models = {"embeddings": embedder, "safety": SafetyClassifier(embedder)}
    print(
        f"deepgate pool benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"device {args.device}, {embedder.dtype}, torch threads {args.threads}, "
        f"{items} items per point"
    )
    print(f"{'model':<11}{'conc':>5}{'batched items/s':>17}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'single items/s':>16}{'p50 ms':>9}{'p99 ms':>9}{'speed-up':>10}")  # fmt: skip
    for name, model in models.items():
        for concurrency in (1, 8, 32):
            single = await point(model, 1, concurrency, items)
            batched = await point(model, args.batch, concurrency, items)
            speedup = batched[0] / single[0]
            print(
                f"{name:<11}{concurrency:>5}{batched[0]:>17,.1f}{batched[1]:>9.2f}"
                f"{batched[2]:>9.2f}{single[0]:>16,.1f}{single[1]:>9.2f}{single[2]:>9.2f}"
                f"{speedup:>9.1f}x"
            )
    if args.device.startswith("cuda"):
        import torch

        print(f"GPU memory peak: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print("target: batched >= 5x single at concurrency 32")


if __name__ == "__main__":
    asyncio.run(main())
