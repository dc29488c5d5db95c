"""The usage ledger end to end on real servers: the sidecar's hook publishes to a real Redis
stream, ``deepgate ledger`` writes to a real SQLite file or a real PostgreSQL (pgserver), and
a writer killed mid-stream and restarted leaves every record in the table exactly once."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from deepgate.catalog import load_catalog
from deepgate.ledger_db import LedgerDB, LedgerError, open_ledger
from deepgate.request_facts import Facts
from deepgate.usage_record import STREAM, UsageRecord
from sidecar.answer_hooks import AnswerHooks, Exchange
from sidecar.cli import build_parser
from sidecar.hooks.usage import UsagePublisher
from sidecar.ledger_writer import GROUP, REJECTED_STREAM, LedgerWriter
from sidecar.usage_report import run as usage_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL (pgserver's binaries) in a temp dir of its own.

    As root, pgserver runs the server as a system user it creates (``pgserver``), on a unix
    socket, and opens the directories above the data dir to it. The data dir is not under
    pytest's basetemp: concurrent pytest sessions prune each other's old basetemps.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset on CI machines
        import pgserver

        server = pgserver.get_server(
            tempfile.mkdtemp(prefix="deepgate-ledger-pg-"), cleanup_mode="delete"
        )
    yield server
    server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'ledger.db'}"
    server = request.getfixturevalue("postgres")
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return str(server.get_uri(name))


@pytest.fixture
def rds(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def ledger(dsn: str) -> LedgerDB:
    db = open_ledger(dsn)
    db.ensure_schema()
    return db


def publish(client: redis.Redis, ids: list[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        record = UsageRecord(
            rid,
            time.time(),
            consumer="alice",
            provider="deepseek",
            model="deepseek-chat",
            prompt_tokens=3,
            completion_tokens=2,
        )
        pipe.xadd(STREAM, {"record": record.to_json()})
    pipe.execute()


def writer_cmd(redis_url: str, dsn: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sidecar.ledger_writer",
        "--redis",
        redis_url,
        "--dsn",
        dsn,
        *extra,
    ]


def pending(client: redis.Redis) -> int:
    return int(client.xpending(STREAM, GROUP)["pending"])


async def test_records_from_the_sidecar_hook_reach_the_table(
    redis_url: str, rds: redis.Redis, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = load_catalog()
    hook = UsagePublisher(aioredis.Redis.from_url(redis_url), catalog)
    hooks = AnswerHooks([hook])
    for i, (who, target, p, c) in enumerate(
        [
            ("alice", "deepseek:deepseek-chat", 1000, 200),
            ("alice", "deepseek:deepseek-chat", 500, 100),
            ("bob", "openai:gpt-5", 2000, 1000),
        ]
    ):
        facts: Facts = {"consumer": who, "route": "chat", "alias": "fast"}
        ex = Exchange(f"req-{i}", "openai", facts, {"model": "fast"}, stream=True)
        ex.target = target
        ex.first_token_s = 0.05
        ex.answer = {"usage": {"prompt_tokens": p, "completion_tokens": c}}
        await hooks.finish(ex)
    assert await hook.flush(5.0)
    await hook.close()

    db = ledger(dsn)
    writer = LedgerWriter(rds, db, consumer="w1")
    writer.run(until_idle=True)
    assert sorted(db.request_ids()) == ["req-0", "req-1", "req-2"]
    assert (writer.stats.written, writer.stats.duplicates) == (3, 0)
    assert pending(rds) == 0
    db.close()

    assert usage_run(build_parser().parse_args(["usage", "--dsn", dsn, "--json"])) == 0
    totals = {(t["consumer"], t["model"]): t for t in json.loads(capsys.readouterr().out)["totals"]}
    alice = totals[("alice", "deepseek:deepseek-chat")]
    assert (alice["requests"], alice["prompt_tokens"], alice["completion_tokens"]) == (2, 1500, 300)
    assert alice["cost_usd"] == pytest.approx(catalog.cost("deepseek:deepseek-chat", 1500, 300))
    bob = totals[("bob", "openai:gpt-5")]
    assert bob["cost_usd"] == pytest.approx(catalog.cost("openai:gpt-5", 2000, 1000))


def test_a_record_delivered_twice_is_written_once(rds: redis.Redis, dsn: str) -> None:
    publish(rds, ["dup", "dup", "other"])
    db = ledger(dsn)
    writer = LedgerWriter(rds, db, consumer="w1")
    writer.run(until_idle=True)
    assert sorted(db.request_ids()) == ["dup", "other"]
    assert (writer.stats.written, writer.stats.duplicates) == (2, 1)
    # and again later, e.g. a sidecar retrying a publish that had in fact gone through
    publish(rds, ["dup"])
    writer.run(until_idle=True)
    assert sorted(db.request_ids()) == ["dup", "other"]
    db.close()


@pytest.mark.slow
@pytest.mark.parametrize("restart_as", ["same writer", "another writer"])
def test_writer_killed_mid_stream_leaves_every_record_exactly_once(
    redis_url: str, rds: redis.Redis, dsn: str, restart_as: str
) -> None:
    ids = [f"r{i:05d}" for i in range(3000)]
    publish(rds, ids)
    db = ledger(dsn)
    first = subprocess.Popen(
        writer_cmd(redis_url, dsn, "--batch", "10", "--consumer", "w1"), cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 60
        while len(db.request_ids()) < 300:
            assert first.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    written_before = len(db.request_ids())
    assert written_before < len(ids), "the writer finished before it could be killed"

    consumer = "w1" if restart_as == "same writer" else "w2"
    second = subprocess.run(
        writer_cmd(redis_url, dsn, "--consumer", consumer, "--claim-idle-s", "0.1", "--until-idle"),
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert second.returncode == 0
    written = db.request_ids()
    assert len(written) == len(ids)  # no duplicates (and the primary key would refuse them)
    assert sorted(written) == ids  # no losses
    assert pending(rds) == 0
    db.close()


def test_sigterm_finishes_the_batch_acks_it_and_exits_0(
    redis_url: str, rds: redis.Redis, dsn: str
) -> None:
    publish(rds, [f"a{i}" for i in range(2000)])
    db = ledger(dsn)
    proc = subprocess.Popen(writer_cmd(redis_url, dsn, "--batch", "10"), cwd=ROOT)
    deadline = time.monotonic() + 60
    while len(db.request_ids()) < 100:
        assert proc.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert pending(rds) == 0  # whatever it read, it wrote and acknowledged
    delivered = rds.xinfo_groups(STREAM)[0]["last-delivered-id"]
    expected = [f[b"record"] for _, f in rds.xrange(STREAM, max=delivered)]
    assert sorted(db.request_ids()) == sorted(UsageRecord.from_json(r).request_id for r in expected)
    db.close()


def test_an_entry_that_is_not_a_record_is_set_aside(rds: redis.Redis, dsn: str) -> None:
    rds.xadd(STREAM, {"record": b"{not json"})
    rds.xadd(STREAM, {"something": b"else"})
    publish(rds, ["ok"])
    db = ledger(dsn)
    writer = LedgerWriter(rds, db, consumer="w1")
    writer.run(until_idle=True)
    assert db.request_ids() == ["ok"]
    assert writer.stats.rejected == 2
    assert rds.xlen(REJECTED_STREAM) == 2
    assert pending(rds) == 0
    db.close()


def test_a_database_failure_acknowledges_nothing(rds: redis.Redis, tmp_path: Path) -> None:
    publish(rds, ["x1", "x2"])
    db = ledger(f"sqlite://{tmp_path / 'ledger.db'}")
    conn = sqlite3.connect(tmp_path / "ledger.db")
    conn.execute("DROP TABLE usage_ledger")  # the database refuses the batch
    conn.commit()
    conn.close()
    writer = LedgerWriter(rds, db, consumer="w1", block_ms=100)
    writer.ensure_group()
    with pytest.raises(LedgerError, match="no such table"):
        writer.handle(writer.next_entries())
    assert pending(rds) == 2  # not acknowledged: the writer finds them again
    writer.run(until_idle=True)  # the schema is back (ensure_schema), the batch is retried
    assert sorted(db.request_ids()) == ["x1", "x2"]
    assert pending(rds) == 0
    db.close()


def test_a_deleted_stream_is_followed_again(rds: redis.Redis, dsn: str) -> None:
    publish(rds, ["before"])
    db = ledger(dsn)
    writer = LedgerWriter(rds, db, consumer="w1")
    writer.run(until_idle=True)
    rds.delete(STREAM)  # an operator cleared Redis: the consumer group went with the stream
    publish(rds, ["after"])
    writer.run(until_idle=True)
    assert sorted(db.request_ids()) == ["after", "before"]
    assert pending(rds) == 0
    db.close()
