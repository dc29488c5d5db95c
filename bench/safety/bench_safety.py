"""The safety detectors on labelled data: precision, recall, F1, false positives, and latency.

Data: ``../shared/data/safety/`` (the development split; see its SOURCES.md for the sources and
their licences: deepset/prompt-injections (Apache-2.0), XSTest v2 by Röttger et al., NAACL 2024
(CC-BY-4.0), Microsoft presidio-research's synthetic PII set (MIT)). The held-out 30% is not
here, and the pool classifier's heads were trained on this split, so its figures here are
in-sample (its model card has the cross-validated ones).

Detectors, as the shipped routes build them (``deepgate.safety.build_detectors``):

- ``injection_rules``: the built-in injection rules (threshold 0.8);
- ``classifier@T``: the pool's ``deepgate-safety`` classifier, run through the pool in-process
  (``build_local_inference``: the micro-batcher, the embedding model, the heads), its
  ``prompt_injection`` score (or ``unsafe`` for XSTest) at threshold T: 0.95 is the plugin's
  default, the other the heads' own cross-validated threshold;
- ``personal_data``: Presidio's pattern recognizers (the default entities); ``personal_data+ner``
  adds spaCy's PERSON, LOCATION, NRP and DATE_TIME;
- ``secrets`` (detect-secrets' named detectors) and ``obfuscation``: no data set has their
  positives, so only their false-positive rate is meaningful.

A row counts as a positive for a detector when the data set's label is the one the detector is
for (deepset ``injection``; XSTest ``unsafe``; Presidio ``pii`` restricted to rows holding an
entity the detector is configured for); every other row is a negative. Latency is per text,
``scan`` for the rule detectors and one ``Classify`` of one text through the batcher for the
classifier. The last block streams a long answer through the output window
(``sidecar.hooks.output_safety.ScanWindow``, shipped output config) and reports its throughput,
the characters it holds back, and its peak buffer.

    .venv/bin/python bench/safety/bench_safety.py [--quick] [--data DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from deepgate.safety import Detector, build_detectors  # noqa: E402
from sidecar.hooks.output_safety import OutputDetectors, ScanWindow  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "safety"
DEFAULT_PII = {"CREDIT_CARD", "IBAN_CODE", "US_SSN", "EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS"}
NER_PII = DEFAULT_PII | {"PERSON", "GPE", "STREET_ADDRESS", "NRP", "DATE_TIME"}


@dataclass
class Row:
    dataset: str
    text: str
    label: str
    entities: set[str] = field(default_factory=set)


def load(data: Path, limit: int | None) -> list[Row]:
    rows: list[Row] = []
    for name, file in (
        ("deepset", "deepset_prompt_injections.csv"),
        ("xstest", "xstest_v2_prompts.csv"),
    ):
        with (data / file).open(encoding="utf-8", newline="") as f:
            part = [Row(name, r["text"], r["label"]) for r in csv.DictReader(f)]
        rows += part[:limit]
    with (data / "presidio_synth_pii.jsonl").open(encoding="utf-8") as f:
        part = []
        for line in f:
            r = json.loads(line)
            part.append(
                Row("presidio", r["text"], r["label"], {e["entity_type"] for e in r["entities"]})
            )
    rows += part[:limit]
    return rows


# Which rows are positives for a detector: None = the detector has no positives in this data.
Positive = Callable[[Row], bool] | None


def injection(r: Row) -> bool:
    return r.dataset == "deepset" and r.label == "injection"


def unsafe(r: Row) -> bool:
    return r.dataset == "xstest" and r.label == "unsafe"


POSITIVE: dict[str, Positive] = {
    "injection_rules": injection,
    "personal_data": lambda r: r.dataset == "presidio" and bool(r.entities & DEFAULT_PII),
    "personal_data+ner": lambda r: r.dataset == "presidio" and bool(r.entities & NER_PII),
    "secrets": None,
    "obfuscation": None,
}


def rule_detectors() -> dict[str, Detector]:
    ner = ["CREDIT_CARD", "IBAN_CODE", "US_SSN", "EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS",
           "PERSON", "LOCATION", "NRP", "DATE_TIME"]  # fmt: skip
    built = {
        "injection_rules": build_detectors({"injection": {"action": "block"}})[0],
        "personal_data": build_detectors({"personal_data": {"action": "redact"}})[0],
        "personal_data+ner": build_detectors(
            {"personal_data": {"action": "redact", "entities": ner}}
        )[0],
        "secrets": build_detectors({"secrets": {"action": "block"}})[0],
        "obfuscation": build_detectors({"obfuscation": {"action": "log"}})[0],
    }
    return built


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def scores(rows: list[Row], flagged: list[bool], positive: Positive, dataset: str) -> str:
    pairs = [(f, r) for f, r in zip(flagged, rows, strict=True) if r.dataset == dataset]
    pos = [f for f, r in pairs if positive is not None and positive(r)]
    neg = [f for f, r in pairs if positive is None or not positive(r)]
    tp, fp = sum(pos), sum(neg)
    fpr = f"{fp / len(neg):6.1%}" if neg else "     -"
    if not pos:
        dash = "-"
        return (
            f"{len(pairs):>5} {0:>4} {dash:>6} {dash:>6} {dash:>6} {fpr:>6}"
            f"  ({fp} of {len(neg)} flagged)"
        )
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / len(pos)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return (
        f"{len(pairs):>5} {len(pos):>4} {precision:6.1%} {recall:6.1%} {f1:6.3f} {fpr:>6}"
        f"  (tp {tp}, fp {fp})"
    )


async def classify_all(
    rows: list[Row], latency_n: int
) -> tuple[list[dict[str, float]], list[float], dict[str, float]]:
    from sidecar.app import build_local_inference
    from sidecar.config import load_config
    from sidecar.metrics import Metrics
    from sidecar.pool.safety import NAME, SafetyHeads

    inference = build_local_inference(load_config(), Metrics())
    texts = [r.text for r in rows]
    out: list[dict[str, float]] = []
    for i in range(0, len(texts), 32):
        out += await inference.classify(NAME, texts[i : i + 32], None)
    latencies = []
    for text in texts[:latency_n]:
        started = time.perf_counter()
        await inference.classify(NAME, [text], None)
        latencies.append((time.perf_counter() - started) * 1000)
    await inference.pool.drain(5)
    return out, latencies, SafetyHeads().thresholds


def window_block(quick: bool) -> list[str]:
    """The shipped output config (secrets, redact) over a long streamed answer."""
    dets = OutputDetectors(build_detectors({"secrets": {"action": "redact"}}))
    sentence = "The service reads its settings at start-up and reloads them on change. "
    answer = sentence * (60 if quick else 600) + "Key: AKIAZ7XQ4VLBN2PKW3RT. " + sentence * 10
    piece = 4  # about a token a chunk

    async def run() -> tuple[float, str, int]:
        window = ScanWindow(dets.scan, dets.actions, dets.hold)
        started = time.perf_counter()
        out = [await window.feed(answer[i : i + piece]) for i in range(0, len(answer), piece)]
        out.append(await window.flush())
        return time.perf_counter() - started, "".join(out), window.peak

    elapsed, text, peak = asyncio.run(run())
    assert "AKIAZ7XQ4VLBN2PKW3RT" not in text
    return [
        f"output window (secrets, redact; {len(answer):,} chars in {piece}-char chunks): "
        f"{len(answer) / elapsed:,.0f} chars/s, "
        f"{elapsed / (len(answer) / piece) * 1e6:.1f} us per chunk",
        f"  holds back {dets.hold} chars (first release after {dets.hold + 48}); "
        f"peak buffer {peak} chars; secret redacted: yes",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 rows per data set")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--no-classifier", action="store_true")
    args = parser.parse_args()
    rows = load(args.data, 60 if args.quick else None)
    print(f"data: {args.data} ({len(rows)} rows; development split)")

    flagged: dict[str, list[bool]] = {}
    latency: dict[str, list[float]] = {}
    for name, detector in rule_detectors().items():
        detector.scan("warm up the detector once: a@b.example 4111 1111 1111 1111")
        marks, times = [], []
        for r in rows:
            started = time.perf_counter()
            found = detector.scan(r.text)
            times.append((time.perf_counter() - started) * 1000)
            marks.append(bool(found))
        flagged[name], latency[name] = marks, times

    positives = dict(POSITIVE)
    if not args.no_classifier:
        probs, times, cv = asyncio.run(classify_all(rows, 60 if args.quick else 300))
        for t in (0.95, cv["prompt_injection"]):
            name = f"classifier@{t:.2f}"
            flagged[name] = [p["prompt_injection"] >= t for p in probs]
            positives[name] = injection
        name = f"classifier_unsafe@{cv['unsafe']:.2f}"
        flagged[name] = [p["unsafe"] >= cv["unsafe"] for p in probs]
        positives[name] = unsafe
        latency["classifier (pool)"] = times

    header = (
        f"{'detector':<24} {'data set':<9} {'rows':>5} {'pos':>4} {'prec':>6} {'recall':>6} "
        f"{'F1':>6} {'FPR':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    for name in flagged:
        for dataset in ("deepset", "xstest", "presidio"):
            print(
                f"{name:<24} {dataset:<9} {scores(rows, flagged[name], positives[name], dataset)}"
            )
    print()
    print(f"{'detector':<24} {'p50 ms':>8} {'p99 ms':>8} {'calls':>6}")
    for name, times in latency.items():
        print(
            f"{name:<24} {statistics.median(times):8.3f} {percentile(times, 0.99):8.3f} "
            f"{len(times):>6}"
        )
    print(
        "(classifier: one Classify of one text through the in-process pool, batcher wait included)"
    )
    print()
    for line in window_block(args.quick):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
