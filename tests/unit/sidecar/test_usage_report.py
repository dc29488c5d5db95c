"""``deepgate usage``: totals per consumer, model and day, as a table or JSON."""

from __future__ import annotations

import argparse
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deepgate.ledger_db import open_ledger
from deepgate.usage_record import UsageRecord
from sidecar.cli import build_parser
from sidecar.usage_report import parse_since, render_table, run

DAY1 = 1_764_288_000.0  # 2025-11-28 00:00 UTC


def seed(path: Path) -> str:
    dsn = f"sqlite://{path}"
    db = open_ledger(dsn)
    db.ensure_schema()
    db.write(
        [
            UsageRecord(
                "a1",
                DAY1 + 1,
                consumer="alice",
                provider="deepseek",
                model="deepseek-chat",
                prompt_tokens=100,
                completion_tokens=40,
                cost_usd=0.5,
            ),
            UsageRecord(
                "a2",
                DAY1 + 2,
                consumer="alice",
                provider="deepseek",
                model="deepseek-chat",
                prompt_tokens=50,
                completion_tokens=10,
                cost_usd=0.25,
            ),
            UsageRecord(
                "b1",
                DAY1 + 86_400,
                consumer="bob",
                provider="openai",
                model="gpt-5",
                prompt_tokens=7,
                completion_tokens=3,
                cost_usd=1.0,
            ),
        ]
    )
    db.close()
    return dsn


def usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    args = build_parser().parse_args(["usage", *argv])
    code = run(args)
    return code, capsys.readouterr().out


def test_json_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = seed(tmp_path / "ledger.db")
    code, out = usage(["--dsn", dsn, "--json"], capsys)
    assert code == 0
    totals = json.loads(out)["totals"]
    assert totals == [
        {
            "day": "2025-11-28",
            "consumer": "alice",
            "model": "deepseek:deepseek-chat",
            "requests": 2,
            "prompt_tokens": 150,
            "completion_tokens": 50,
            "cost_usd": 0.75,
        },
        {
            "day": "2025-11-29",
            "consumer": "bob",
            "model": "openai:gpt-5",
            "requests": 1,
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "cost_usd": 1.0,
        },
    ]


def test_filters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = seed(tmp_path / "ledger.db")
    _, out = usage(["--dsn", dsn, "--json", "--consumer", "bob"], capsys)
    assert [t["consumer"] for t in json.loads(out)["totals"]] == ["bob"]
    _, out = usage(["--dsn", dsn, "--json", "--since", "2025-11-29"], capsys)
    assert [t["day"] for t in json.loads(out)["totals"]] == ["2025-11-29"]


def test_table_has_a_line_per_group_and_a_total(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = usage(["--dsn", seed(tmp_path / "ledger.db")], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "day",
        "consumer",
        "model",
        "requests",
        "tokens",
        "in",
        "tokens",
        "out",
        "cost",
        "(USD)",
    ]
    assert lines[2].split() == [
        "2025-11-28",
        "alice",
        "deepseek:deepseek-chat",
        "2",
        "150",
        "50",
        "0.750000",
    ]
    assert lines[-1].split() == ["total", "3", "157", "53", "1.750000"]


def test_no_ledger_yet_says_how_to_get_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    code, out = usage(["--dsn", f"sqlite://{tmp_path / 'none.db'}"], capsys)
    assert code == 1
    assert out == ""
    assert "start the writer" in caplog.text
    assert not (tmp_path / "none.db").exists()


def test_since_forms() -> None:
    now = datetime(2026, 11, 28, 11, 0, tzinfo=UTC)
    assert parse_since("2026-11-01", now) == "2026-11-01"
    assert parse_since("7d", now) == "2026-11-21"
    assert parse_since("today", now) == "2026-11-28"
    assert parse_since("12h", now) == "2026-11-27"
    with pytest.raises(argparse.ArgumentTypeError, match="7d"):
        parse_since("last week", now)


def test_empty_ledger_prints_a_zero_total() -> None:
    out = io.StringIO()
    render_table([], out)
    assert out.getvalue().splitlines()[-1].split() == ["total", "0", "0", "0", "0.000000"]
