"""The safety classifier: small logistic heads over the sentence embeddings.

One head per label (``prompt_injection``, ``unsafe``), each a weight vector and a bias over the
384-d all-MiniLM-L6-v2 embedding, trained by ``python -m sidecar.pool.train_safety`` (``make
train-safety``) on the development data and committed as ``models/safety_head.json`` with its
model card. ``Classify`` returns each label's probability; the thresholds chosen in
cross-validation travel with the weights for callers that want a yes/no.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

NAME = "deepgate-safety"
WEIGHTS = Path(__file__).with_name("models") / "safety_head.json"


class SafetyHeads:
    """The trained heads: ``scores(vectors)`` -> one ``{label: probability}`` per vector."""

    def __init__(self, path: Path = WEIGHTS) -> None:
        data = json.loads(path.read_text())
        self.labels: list[str] = list(data["heads"])
        self.weights = np.array(
            [data["heads"][k]["weights"] for k in self.labels], dtype=np.float32
        )
        self.bias = np.array([data["heads"][k]["bias"] for k in self.labels], dtype=np.float32)
        self.thresholds = {k: float(data["heads"][k]["threshold"]) for k in self.labels}

    def scores(self, vectors: Any) -> list[dict[str, float]]:
        x = np.asarray(vectors, dtype=np.float32).reshape(-1, self.weights.shape[1])
        logits = x @ self.weights.T + self.bias  # an empty batch gives an empty list
        probs = 1.0 / (1.0 + np.exp(-np.clip(logits, -30, 30)))
        return [
            {label: round(float(p), 6) for label, p in zip(self.labels, row, strict=True)}
            for row in probs
        ]


class SafetyClassifier:
    """A ``BatchModel``: texts in, per-label probabilities out (one embedding batch per call)."""

    name = NAME

    def __init__(self, embedder: Any, path: Path = WEIGHTS) -> None:
        self.embedder = embedder
        self.device = embedder.device
        self.max_batch_size = embedder.max_batch_size
        self.heads = SafetyHeads(path)

    def run_batch(self, items: list[Any]) -> list[Any]:
        return self.heads.scores(self.embedder.run_batch(items))
