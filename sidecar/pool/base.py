"""What a pooled model is, for the batcher that feeds it.

A ``BatchModel`` turns a list of inputs into a list of outputs, one per input, in order. It is
plain synchronous code (torch, numpy) and runs on a worker thread, never on the event loop. The
batcher (``sidecar/pool/batcher.py``) queues callers' items per model and hands the model batches
of up to ``max_batch_size`` items, formed when that many are waiting or ``max_wait_ms`` after the
first arrived, whichever comes first; each caller gets its own results back, in order.

Torch and model packages are imported only inside ``sidecar/pool/``; the plugin runner never
imports this package.
"""

from __future__ import annotations

from typing import Any, Protocol


class BatchModel(Protocol):
    name: str  # the model name clients use ("all-MiniLM-L6-v2", "deepgate-safety")
    max_batch_size: int
    device: str  # "cuda:0", "cpu"

    def run_batch(self, items: list[Any]) -> list[Any]:
        """Outputs for ``items``, one per item, in order. Runs on a worker thread."""
        ...
