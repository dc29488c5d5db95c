"""The safety head's numpy parts: training choices, the committed weights file, the scorer.

Complements ``test_safety_training.py`` (toy learning, determinism, AUC/threshold arithmetic);
nothing here loads torch or the embedding model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sidecar.pool import train_safety as ts
from sidecar.pool.safety import WEIGHTS, SafetyHeads

LABELS = ["prompt_injection", "unsafe"]


def imbalanced(n_pos: int = 20, n_neg: int = 380) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(1.5, 1.0, (n_pos, 4)), rng.normal(-1.5, 1.0, (n_neg, 4))])
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    return x, y


def test_class_weighting_keeps_the_rare_class_found() -> None:
    x, y = imbalanced()
    w, b = ts.fit(x, y)
    p = ts.predict(x, w, b)
    assert ((p >= 0.5) & (y == 1)).sum() >= 18  # recall >= 0.9 on a 5% positive class
    assert ((p >= 0.5) & (y == 0)).sum() <= 20


def test_l2_shrinks_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = imbalanced()
    monkeypatch.setattr(ts, "L2", 1e-4)
    loose, _ = ts.fit(x, y)
    monkeypatch.setattr(ts, "L2", 1e-1)
    tight, _ = ts.fit(x, y)
    assert np.linalg.norm(tight) < 0.5 * np.linalg.norm(loose)


def test_fits_are_bitwise_repeatable_and_the_cv_reports_each_source() -> None:
    x, y = imbalanced()
    (w1, b1), (w2, b2) = ts.fit(x, y), ts.fit(x, y)
    assert np.array_equal(w1, w2)
    assert b1 == b2
    sources = ["a" if i % 2 else "b" for i in range(len(y))]
    head = ts.train_head(x, y, sources)
    assert head == ts.train_head(x, y, sources)
    assert set(head["cv"]["by_source"]) == {"a", "b"}
    assert 0 <= head["threshold"] <= 1


def test_negatives_of_one_task_count_for_the_other(tmp_path: Path) -> None:
    (tmp_path / "deepset_prompt_injections.csv").write_text(
        "text,label,source\nhello?,benign,d1\nforget it all,injection,d2\n"
    )
    (tmp_path / "xstest_v2_prompts.csv").write_text(
        "text,label,source,type,focus\nkill a process?,safe,x1,h,f\nhurt someone,unsafe,x2,c,f\n"
    )
    tasks = ts.datasets(tmp_path)
    texts, labels, sources = tasks["prompt_injection"]
    assert dict(zip(texts, labels, strict=True)) == {
        "hello?": 0, "forget it all": 1, "kill a process?": 0, "hurt someone": 0,
    }  # fmt: skip
    assert sources == ["deepset", "deepset", "xstest", "xstest"]
    texts, labels, _ = tasks["unsafe"]  # deepset injections are left out of the unsafe head
    assert dict(zip(texts, labels, strict=True)) == {
        "kill a process?": 0, "hurt someone": 1, "hello?": 0,
    }  # fmt: skip


def test_the_committed_weights_file_is_complete() -> None:
    doc = json.loads(WEIGHTS.read_text())
    assert doc["embedding_model"] == "all-MiniLM-L6-v2"
    assert doc["seed"] == ts.SEED
    assert list(doc["heads"]) == LABELS
    for head in doc["heads"].values():
        assert len(head["weights"]) == 384
        assert 0 < head["threshold"] < 1
        assert {"roc_auc", "precision", "recall", "f1"} <= set(head["cv"])
    assert WEIGHTS.stat().st_size < 64 * 1024  # small enough to commit


def test_the_model_card_carries_attribution_and_metrics() -> None:
    card = (WEIGHTS.parent / "MODEL_CARD.md").read_text()
    for needed in (
        'Röttger et al., "XSTest',
        "NAACL 2024",
        "CC-BY-4.0",
        "deepset/prompt-injections",
        "Apache-2.0",
        "presidio_synth_pii.jsonl",
        "ROC-AUC",
        "## Intended use",
        "## Limits",
    ):
        assert needed in card, needed


def test_scores_are_per_label_probabilities(tmp_path: Path) -> None:
    weights = tmp_path / "head.json"
    heads = {
        "prompt_injection": {"weights": [1.0, 0.0], "bias": 0.0, "threshold": 0.5},
        "unsafe": {"weights": [0.0, -2.0], "bias": 1.0, "threshold": 0.7},
    }
    weights.write_text(json.dumps({"heads": heads}))
    scorer = SafetyHeads(weights)
    assert scorer.thresholds == {"prompt_injection": 0.5, "unsafe": 0.7}
    (row,) = scorer.scores([[0.0, 0.5]])
    assert row == {"prompt_injection": 0.5, "unsafe": 0.5}
    assert scorer.scores([]) == []  # an empty batch is not an error
    extreme = scorer.scores([[1e6, -1e6]])[0]
    assert 0.0 <= extreme["unsafe"] <= 1.0
    assert extreme["prompt_injection"] == pytest.approx(1.0)


def test_the_committed_heads_score_a_batch() -> None:
    scorer = SafetyHeads(WEIGHTS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 384))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    batch = scorer.scores(x)
    assert [list(r) for r in batch] == [LABELS] * 5
    assert batch == [scorer.scores(v)[0] for v in x]
    assert all(0.0 <= p <= 1.0 for r in batch for p in r.values())
