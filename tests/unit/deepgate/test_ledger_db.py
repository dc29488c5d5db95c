"""The ledger table on SQLite: one row per request id, totals per day, consumer and model."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepgate.ledger_db import LedgerError, default_dsn, open_ledger, redact_dsn, utc_day
from deepgate.usage_record import UsageRecord

DAY1 = 1_764_288_000.0  # 2025-11-28 00:00 UTC
DAY2 = DAY1 + 86_400


def rec(rid: str, ts: float = DAY1 + 60, consumer: str = "alice", **kw: object) -> UsageRecord:
    base: dict[str, object] = {
        "provider": "deepseek",
        "model": "deepseek-chat",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": 0.001,
    }
    base.update(kw)
    return UsageRecord(request_id=rid, ts=ts, consumer=consumer, **base)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    ledger = open_ledger(f"sqlite://{tmp_path / 'ledger.db'}")
    ledger.ensure_schema()
    yield ledger
    ledger.close()


def test_a_record_written_twice_is_one_row(db) -> None:  # type: ignore[no-untyped-def]
    assert db.write([rec("r1"), rec("r2")]) == 2
    assert db.write([rec("r2"), rec("r3")]) == 1  # r2 again: ignored, r3 new
    assert sorted(db.request_ids()) == ["r1", "r2", "r3"]


def test_the_first_write_of_a_request_id_wins(db) -> None:  # type: ignore[no-untyped-def]
    db.write([rec("r1", prompt_tokens=10)])
    db.write([rec("r1", prompt_tokens=999)])
    [total] = db.totals()
    assert total.prompt_tokens == 10


def test_totals_per_day_consumer_and_model(db) -> None:  # type: ignore[no-untyped-def]
    db.write(
        [
            rec("a1"),
            rec("a2", prompt_tokens=20, completion_tokens=7, cost_usd=0.002),
            rec("a3", provider="openai", model="gpt-5-mini", cost_usd=0.01),
            rec("a4", ts=DAY2 + 5),
            rec("b1", consumer="bob"),
        ]
    )
    rows = {(t.day, t.consumer, t.model): t for t in db.totals()}
    assert set(rows) == {
        ("2025-11-28", "alice", "deepseek:deepseek-chat"),
        ("2025-11-28", "alice", "openai:gpt-5-mini"),
        ("2025-11-29", "alice", "deepseek:deepseek-chat"),
        ("2025-11-28", "bob", "deepseek:deepseek-chat"),
    }
    first = rows[("2025-11-28", "alice", "deepseek:deepseek-chat")]
    assert (first.requests, first.prompt_tokens, first.completion_tokens) == (2, 30, 12)
    assert first.cost_usd == pytest.approx(0.003)


def test_totals_filtered_by_day_and_consumer(db) -> None:  # type: ignore[no-untyped-def]
    db.write([rec("a1"), rec("a2", ts=DAY2 + 5), rec("b1", consumer="bob", ts=DAY2 + 9)])
    assert [t.consumer for t in db.totals(since="2025-11-29")] == ["alice", "bob"]
    assert [t.day for t in db.totals(consumer="alice")] == ["2025-11-28", "2025-11-29"]
    assert db.totals(since="2025-11-30") == []


def test_an_unanswered_request_has_no_model(db) -> None:  # type: ignore[no-untyped-def]
    db.write([rec("e1", provider="", model="", status=502, error_code="upstream_error")])
    [total] = db.totals()
    assert total.model == ""
    assert total.requests == 1


def test_day_is_the_utc_date() -> None:
    assert utc_day(DAY1 - 1) == "2025-11-27"
    assert utc_day(DAY1) == "2025-11-28"


def test_unknown_database_is_refused_with_the_forms_that_work() -> None:
    with pytest.raises(LedgerError, match=r"sqlite:///path/to/ledger\.db"):
        open_ledger("mysql://u:secret@db/x")


def test_a_password_never_reaches_a_message() -> None:
    assert (
        redact_dsn("postgresql://led:s3cret@db:5432/usage") == "postgresql://led:***@db:5432/usage"
    )
    assert redact_dsn("sqlite:///tmp/l.db") == "sqlite:///tmp/l.db"
    with pytest.raises(LedgerError) as caught:
        open_ledger("mysql://u:s3cret@db/x")
    assert "s3cret" not in str(caught.value)


def test_an_unwritable_file_is_a_ledger_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    ledger = open_ledger(f"sqlite://{blocker / 'sub' / 'ledger.db'}")
    with pytest.raises(LedgerError, match="could not open the ledger file"):
        ledger.ensure_schema()


def test_default_is_a_file_under_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEEPGATE_LEDGER_DSN", raising=False)
    monkeypatch.setenv("DEEPGATE_DATA_DIR", str(tmp_path))
    assert default_dsn() == f"sqlite://{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("DEEPGATE_LEDGER_DSN", "postgresql://led@db/usage")
    assert default_dsn() == "postgresql://led@db/usage"
