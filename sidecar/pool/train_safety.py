"""``make train-safety``: train the safety heads on the development data, reproducibly.

    python -m sidecar.pool.train_safety [--data DIR] [--out DIR]

Data (see the data folder's SOURCES.md): deepset/prompt-injections (benign vs injection) and
XSTest v2 (safe vs unsafe requests). Two heads over the all-MiniLM-L6-v2 embeddings:

- ``prompt_injection``: deepset injections are positives; deepset benign prompts and every XSTest
  prompt (a harmful request is not an injection) are negatives;
- ``unsafe``: XSTest unsafe prompts are positives; XSTest safe prompts and deepset benign prompts
  are negatives; deepset injections are left out (they are neither clearly safe nor harmful).

Each head is an L2-regularized, class-weighted logistic regression fitted by full-batch gradient
descent in numpy (deterministic: no sampling, fixed fold shuffling with seed 42). Five-fold
stratified cross-validation gives ROC-AUC and the threshold that maximizes F1 on the
out-of-fold scores; the final heads are fitted on all the development data. The PII file is not
used here (it is for a PII detector).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
from pathlib import Path

import numpy as np

from sidecar.pool.embeddings import NAME as EMBEDDING_MODEL
from sidecar.pool.embeddings import EmbeddingModel
from sidecar.pool.safety import WEIGHTS

SEED = 42
FOLDS = 5
L2 = 1e-3
STEPS = 800
RATE = 2.0
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "safety"


def fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Class-weighted L2 logistic regression by full-batch gradient descent."""
    pos = max(1.0, float(y.sum()))
    neg = max(1.0, float(len(y) - y.sum()))
    sample_w = np.where(y == 1, len(y) / (2 * pos), len(y) / (2 * neg))
    w = np.zeros(x.shape[1])
    b = 0.0
    for _ in range(STEPS):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        g = sample_w * (p - y) / len(y)
        w -= RATE * (x.T @ g + L2 * w)
        b -= RATE * float(g.sum())
    return w, b


def predict(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    result: np.ndarray = 1.0 / (1.0 + np.exp(-(x @ w + b)))
    return result


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    order = np.argsort(s)
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, precision, recall, F1) maximizing F1 over the scores."""
    best = (0.5, 0.0, 0.0, 0.0)
    for t in np.unique(np.round(s, 4)):
        hit = s >= t
        tp = float((hit & (y == 1)).sum())
        if tp == 0:
            continue
        precision, recall = tp / hit.sum(), tp / (y == 1).sum()
        f1 = 2 * precision * recall / (precision + recall)
        if f1 > best[3]:
            best = (float(t), float(precision), float(recall), float(f1))
    return best


def folds(y: np.ndarray) -> list[np.ndarray]:
    """Stratified fold indices, shuffled with the fixed seed."""
    rng = np.random.default_rng(SEED)
    out: list[list[int]] = [[] for _ in range(FOLDS)]
    for label in (0, 1):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        for i, j in enumerate(idx):
            out[i % FOLDS].append(int(j))
    return [np.array(sorted(f)) for f in out]


def train_head(x: np.ndarray, y: np.ndarray) -> dict[str, object]:
    oof = np.zeros(len(y))
    for held in folds(y):
        train = np.setdiff1d(np.arange(len(y)), held)
        w, b = fit(x[train], y[train])
        oof[held] = predict(x[held], w, b)
    threshold, precision, recall, f1 = best_threshold(y, oof)
    w, b = fit(x, y)
    return {
        "weights": [round(float(v), 6) for v in w],
        "bias": round(b, 6),
        "threshold": round(threshold, 4),
        "cv": {
            "roc_auc": round(roc_auc(y, oof), 4),
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "positives": int(y.sum()),
            "negatives": int(len(y) - y.sum()),
        },
    }


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def datasets(data: Path) -> dict[str, tuple[list[str], list[int]]]:
    deepset = read(data / "deepset_prompt_injections.csv")
    xstest = read(data / "xstest_v2_prompts.csv")
    injection = [(r["text"], int(r["label"] == "injection")) for r in deepset]
    injection += [(r["text"], 0) for r in xstest]
    unsafe = [(r["text"], int(r["label"] == "unsafe")) for r in xstest]
    unsafe += [(r["text"], 0) for r in deepset if r["label"] == "benign"]
    return {
        "prompt_injection": ([t for t, _ in injection], [y for _, y in injection]),
        "unsafe": ([t for t, _ in unsafe], [y for _, y in unsafe]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train the safety heads")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=WEIGHTS.parent)
    args = parser.parse_args(argv)
    embedder = EmbeddingModel("cpu", 64, 2)
    heads = {}
    for label, (texts, labels) in datasets(args.data).items():
        vectors = np.array(
            [v for i in range(0, len(texts), 64) for v in embedder.run_batch(texts[i : i + 64])]
        )
        heads[label] = train_head(vectors, np.array(labels, dtype=float))
    today = dt.datetime.now(dt.UTC).date().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"embedding_model": EMBEDDING_MODEL, "trained": today, "seed": SEED, "heads": heads}
    (args.out / "safety_head.json").write_text(json.dumps(doc) + "\n")
    (args.out / "MODEL_CARD.md").write_text(model_card(heads, today))


def model_card(heads: dict[str, dict[str, object]], today: str) -> str:
    rows = "\n".join(
        f"| `{label}` | {h['cv']['positives']} / {h['cv']['negatives']} "  # type: ignore[index]
        f"| {h['cv']['roc_auc']} | {h['threshold']} | {h['cv']['precision']} "  # type: ignore[index]
        f"| {h['cv']['recall']} | {h['cv']['f1']} |"  # type: ignore[index]
        for label, h in heads.items()
    )
    return f"""# deepgate-safety — model card

Two logistic heads over all-MiniLM-L6-v2 sentence embeddings (384-d), served by the inference
pool as the model `deepgate-safety` (gRPC `Classify`). Trained {today} by
`make train-safety` (`python -m sidecar.pool.train_safety`), seed {SEED}; the weights are
`safety_head.json` next to this card.

## Data (development split only)
- deepset/prompt-injections (Apache-2.0, deepset), via sinanw/llm-security-prompt-injection:
  benign vs injection prompts, English and German.
- XSTest v2 (CC-BY-4.0): Röttger et al., "XSTest: A Test Suite for Identifying Exaggerated
  Safety Behaviours in Large Language Models", NAACL 2024 — safe vs unsafe requests.
- Not used: the synthetic PII set (for a PII detector, not these heads).
The held-out 30% of each set is not in our hands; these figures are cross-validation on the
development data and will be optimistic (deepset translation pairs can straddle folds).

## Labels
- `prompt_injection`: deepset injections positive; deepset benign and all XSTest prompts negative.
- `unsafe`: XSTest unsafe positive; XSTest safe and deepset benign negative; deepset injections
  left out.

## Cross-validation (5-fold stratified, out-of-fold scores)

| head | positives / negatives | ROC-AUC | threshold (max F1) | precision | recall | F1 |
|---|---|---|---|---|---|---|
{rows}

## Use and limits
Scores are probabilities per label; the threshold above is where F1 peaked in cross-validation,
a starting point for a route's own threshold. The heads inherit the embedding model's 256-token
window (longer texts are truncated) and its mostly-English training; deepset's injections are
mild goal hijacks, not long jailbreak scripts; XSTest's safe prompts are deliberately
scary-sounding, so this head is tuned against over-refusal. Use with rules, not instead of them.
"""


if __name__ == "__main__":
    main()
