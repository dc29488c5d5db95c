"""The safety heads' training: it learns, it is deterministic, and what it wrote loads."""

from __future__ import annotations

import numpy as np

from sidecar.pool import train_safety as ts
from sidecar.pool.safety import WEIGHTS, SafetyHeads


def toy(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(float)
    return x, y


def test_logistic_regression_learns_a_separable_set() -> None:
    x, y = toy()
    w, b = ts.fit(x, y)
    accuracy = ((ts.predict(x, w, b) >= 0.5) == (y == 1)).mean()
    assert accuracy > 0.95
    assert ts.roc_auc(y, ts.predict(x, w, b)) > 0.99


def test_training_is_deterministic_and_folds_are_stratified() -> None:
    x, y = toy()
    first, second = ts.train_head(x, y), ts.train_head(x, y)
    assert first == second
    folds = ts.folds(y)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    shares = [y[f].mean() for f in folds]
    assert max(shares) - min(shares) < 0.05


def test_roc_auc_and_threshold_on_a_known_case() -> None:
    y = np.array([0, 0, 1, 1], dtype=float)
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert ts.roc_auc(y, s) == 0.75
    threshold, precision, recall, f1 = ts.best_threshold(y, s)
    assert (threshold, recall, round(precision, 3)) == (0.35, 1.0, 0.667)
    assert round(f1, 3) == 0.8


def test_the_committed_heads_load_with_both_labels() -> None:
    heads = SafetyHeads(WEIGHTS)
    assert heads.labels == ["prompt_injection", "unsafe"]
    assert all(0 < t < 1 for t in heads.thresholds.values())
    scores = heads.scores(np.zeros((2, 384)))
    assert len(scores) == 2
    assert set(scores[0]) == {"prompt_injection", "unsafe"}
