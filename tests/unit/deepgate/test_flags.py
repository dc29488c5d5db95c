"""Feature flags: rules, stable rollouts, reload on change, broken files, the OpenFeature face."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext

from deepgate.flags import (
    FLAGS,
    FlagContext,
    FlagFileError,
    Flags,
    FlagSource,
    compile_flag_file,
)

EXAMPLE = Path(__file__).parents[3] / "examples" / "flags.yaml"

BASE = """\
flags:
  plugin.deepgate-rag.enabled:
    value: true
    rules:
      - when: {route: [internal], group: [beta]}
        value: false
      - when: {consumer: [carol, dave]}
        value: false
  safety.classifier.enabled:
    rules:
      - when: {model: gpt-4o}
        value: false
  router.fast.strategy:
    rollout: {cheapest: 90, latency: 10}
    rules:
      - when: {consumer: alice}
        value: latency
"""


def write(path: Path, text: str) -> None:
    """Write and move the mtime on, so a same-second rewrite is still seen as a change."""
    path.write_text(text, encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def flag_file(tmp_path: Path) -> Path:
    path = tmp_path / "flags.yaml"
    write(path, BASE)
    return path


@pytest.fixture
def flags(flag_file: Path) -> Flags:
    f = Flags()
    f.configure(flag_file, check_interval_s=0)
    return f


@pytest.fixture
def global_flags() -> Iterator[Flags]:
    yield FLAGS
    FLAGS.reset()


def test_no_file_returns_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPGATE_FLAGS_FILE", raising=False)
    f = Flags()
    assert not f.configured
    assert f.enabled("anything", FlagContext("alice"), True) is True
    assert f.enabled("anything", FlagContext("alice"), False) is False
    assert f.variant("router.fast.strategy", FlagContext(), "cheapest") == "cheapest"


def test_the_file_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, flag_file: Path
) -> None:
    monkeypatch.setenv("DEEPGATE_FLAGS_FILE", str(flag_file))
    f = Flags()
    assert f.configured
    assert f.enabled("plugin.deepgate-rag.enabled", FlagContext("carol"), True) is False


def test_rules_match_on_every_context_key(flags: Flags) -> None:
    key = "plugin.deepgate-rag.enabled"
    # all keys of a rule must match; any listed item of a key does
    assert flags.enabled(key, FlagContext("bob", ("beta",), "internal"), True) is False
    assert flags.enabled(key, FlagContext("bob", ("other", "beta"), "internal"), True) is False
    assert flags.enabled(key, FlagContext("bob", ("beta",), "public"), False) is True
    assert flags.enabled(key, FlagContext("bob", (), "internal"), False) is True
    assert flags.enabled(key, FlagContext("dave"), True) is False
    # no value and no rule matched: the caller's default
    assert flags.enabled("safety.classifier.enabled", FlagContext(model="gpt-4o"), True) is False
    assert flags.enabled("safety.classifier.enabled", FlagContext(model="other"), True) is True
    assert flags.enabled("safety.classifier.enabled", FlagContext(model="other"), False) is False
    assert flags.enabled("no.such.flag", FlagContext(), True) is True


def test_a_flag_of_the_other_type_gives_the_default(flags: Flags) -> None:
    assert flags.enabled("router.fast.strategy", FlagContext("alice"), True) is True
    assert flags.variant("plugin.deepgate-rag.enabled", FlagContext("carol"), "x") == "x"


def test_rollout_is_stable_and_splits_by_the_percentages(flags: Flags) -> None:
    key = "router.fast.strategy"
    first = [flags.variant(key, FlagContext(f"consumer-{i}"), "none") for i in range(5000)]
    again = [flags.variant(key, FlagContext(f"consumer-{i}"), "none") for i in range(5000)]
    assert first == again  # the same consumer always gets the same variant
    counts = Counter(first)
    assert set(counts) == {"cheapest", "latency"}
    assert 400 <= counts["latency"] <= 600  # 10 % of 5000, within sampling noise
    assert flags.variant(key, FlagContext("alice"), "none") == "latency"  # a rule wins


def test_rollout_is_stable_across_processes_and_reloads(flag_file: Path) -> None:
    # SHA-256 of flag key and consumer: no per-process salt (unlike hash()).
    import hashlib

    digest = hashlib.sha256(b"router.fast.strategy\x00consumer-7").digest()
    bucket = int.from_bytes(digest[:8], "big") % 10_000
    expected = "cheapest" if bucket < 9000 else "latency"
    f = Flags()
    f.configure(flag_file, check_interval_s=0)
    assert f.variant("router.fast.strategy", FlagContext("consumer-7"), "x") == expected


def test_different_flags_split_independently(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    write(path, "flags:\n  a:\n    rollout: {x: 50, y: 50}\n  b:\n    rollout: {x: 50, y: 50}\n")
    f = Flags()
    f.configure(path, check_interval_s=0)
    same = sum(
        f.variant("a", FlagContext(f"c{i}"), "") == f.variant("b", FlagContext(f"c{i}"), "")
        for i in range(2000)
    )
    assert 800 <= same <= 1200


def test_a_changed_file_is_picked_up(flags: Flags, flag_file: Path) -> None:
    assert flags.enabled("plugin.deepgate-rag.enabled", FlagContext("bob"), False) is True
    write(flag_file, "flags:\n  plugin.deepgate-rag.enabled:\n    value: false\n")
    assert flags.enabled("plugin.deepgate-rag.enabled", FlagContext("bob"), True) is False


def test_the_file_is_checked_at_most_once_per_interval(flag_file: Path) -> None:
    f = Flags()
    f.configure(flag_file, check_interval_s=0.3)
    ctx = FlagContext("bob")
    assert f.enabled("plugin.deepgate-rag.enabled", ctx, False) is True
    write(flag_file, "flags:\n  plugin.deepgate-rag.enabled:\n    value: false\n")
    assert f.enabled("plugin.deepgate-rag.enabled", ctx, True) is True  # not checked yet
    time.sleep(0.35)
    assert f.enabled("plugin.deepgate-rag.enabled", ctx, True) is False


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("flags:\n  a:\n    value: true\n  b: [oops\n", 5, "not valid YAML"),
        ("flags:\n  a:\n    value: true\n  b:\n    valeu: true\n", 5, "unknown key 'valeu'"),
        (
            "flags:\n  a:\n    rollout: {x: 60, y: 30}\n",
            3,
            "add up to 90, not 100",
        ),
        (
            "flags:\n  a:\n    value: true\n    rules:\n      - when: {team: [x]}\n"
            "        value: false\n",
            5,
            "unknown context key 'team'",
        ),
        ("flags:\n  a:\n    value: true\n    rules:\n      - when: {consumer: x}\n", 5, "value"),
        (
            "flags:\n  a:\n    value: true\n    rules:\n      - when: {consumer: x}\n"
            "        value: slow\n",
            2,
            "mixes true/false and string",
        ),
        ("flags:\n  a:\n    value: 3\n", 3, "true, false or a string"),
    ],
)
def test_errors_name_the_file_line_and_problem(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FlagFileError) as err:
        compile_flag_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}:")
    assert f"line {line}" in message
    assert words in message


def test_a_broken_file_keeps_the_last_good_flags_and_logs_why(
    flags: Flags, flag_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = FlagContext("carol")
    assert flags.enabled("plugin.deepgate-rag.enabled", ctx, True) is False
    write(flag_file, BASE.replace("value: false", "value: [not, a, value]", 1))
    with caplog.at_level(logging.ERROR, logger="deepgate.flags"):
        assert flags.enabled("plugin.deepgate-rag.enabled", ctx, True) is False  # last good
    assert flags.last_error is not None
    assert str(flag_file) in flags.last_error
    assert "line 6" in flags.last_error
    assert any("keeping the last good flags" in r.getMessage() for r in caplog.records)
    # logged once per change, not on every evaluation
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="deepgate.flags"):
        flags.enabled("plugin.deepgate-rag.enabled", ctx, True)
    assert not caplog.records
    # fixed: served again
    write(flag_file, "flags:\n  plugin.deepgate-rag.enabled:\n    value: true\n")
    assert flags.enabled("plugin.deepgate-rag.enabled", ctx, False) is True
    assert flags.last_error is None


def test_a_deleted_file_keeps_the_last_good_flags(flags: Flags, flag_file: Path) -> None:
    flag_file.unlink()
    assert flags.enabled("plugin.deepgate-rag.enabled", FlagContext("carol"), True) is False
    assert flags.last_error is not None
    assert "cannot read" in flags.last_error


def test_a_broken_file_at_start_serves_defaults(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    write(path, "flags: [\n")
    f = Flags()
    f.configure(path, check_interval_s=0)
    assert f.enabled("x", FlagContext(), True) is True
    assert f.last_error is not None


def test_openfeature_clients_see_the_same_flags(global_flags: Flags, flag_file: Path) -> None:
    global_flags.configure(flag_file, check_interval_s=0)
    client = api.get_client("deepgate")
    ctx = FlagContext("bob", ("beta",), "internal", "m").to_openfeature()
    assert client.get_boolean_value("plugin.deepgate-rag.enabled", True, ctx) is False
    details = client.get_string_details(
        "router.fast.strategy", "x", EvaluationContext(targeting_key="alice")
    )
    assert details.value == "latency"
    assert details.reason == "TARGETING_MATCH"
    missing = client.get_boolean_details("nope", True, ctx)
    assert missing.value is True
    assert missing.error_code is not None


def test_the_shipped_example_is_valid() -> None:
    flags = compile_flag_file(EXAMPLE)
    assert flags
    source = FlagSource(EXAMPLE)
    assert source.last_error is None


def test_evaluation_is_a_few_microseconds(flags: Flags) -> None:
    ctx = FlagContext("bob", ("beta",), "public", "m")
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        flags.enabled("plugin.deepgate-rag.enabled", ctx, True)
    per_call_us = (time.perf_counter() - start) / n * 1e6
    assert per_call_us < 10, per_call_us  # ~0.6 us on the dev machine; generous for shared CI
