"""The usage ledger's table: one row per request id, in SQLite (embedded) or PostgreSQL.

``deepgate ledger`` is the only writer (DESIGN.md §4): it reads usage records from the Redis
stream and calls ``LedgerDB.write``, which inserts them with ``ON CONFLICT (request_id) DO
NOTHING`` and commits, so a record delivered twice (a writer killed between its commit and its
acknowledgement, a sidecar retrying a publish) is written once. ``deepgate usage`` reads the
totals. Both are command-line processes with nothing else to do while the database answers, so
this module uses the plain blocking drivers (stdlib ``sqlite3``, ``psycopg``), never from an
event loop.

The row keeps the record's counts, names and timings; the record's ``day`` is its UTC date, kept
as text so the totals group the same way on both databases.
"""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from deepgate.config import local_dsn
from deepgate.usage_record import UsageRecord

DSN_ENV = "DEEPGATE_LEDGER_DSN"
TABLE = "usage_ledger"

COLUMNS = (
    "request_id",
    "ts",
    "day",
    "consumer",
    "route",
    "alias",
    "provider",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "latency_ms",
    "ttft_ms",
    "status",
    "error_code",
    "stream",
    "cache",
    "safety",
    "reservation",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_ledger (
    request_id TEXT PRIMARY KEY,
    ts {float} NOT NULL,
    day TEXT NOT NULL,
    consumer TEXT NOT NULL,
    route TEXT NOT NULL,
    alias TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_usd {float} NOT NULL,
    latency_ms {float} NOT NULL,
    ttft_ms {float},
    status INTEGER NOT NULL,
    error_code TEXT,
    stream BOOLEAN NOT NULL,
    cache TEXT NOT NULL,
    safety TEXT NOT NULL,
    reservation TEXT NOT NULL
)"""
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS usage_ledger_day ON usage_ledger (day)",
    "CREATE INDEX IF NOT EXISTS usage_ledger_consumer_day ON usage_ledger (consumer, day)",
)


class LedgerError(Exception):
    """The ledger database refused or could not be reached; the message says which and why."""


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """One line of ``deepgate usage``: the totals of a consumer's use of a model on a day."""

    day: str
    consumer: str
    model: str  # provider:model that answered ("" when none did)
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def row(record: UsageRecord) -> tuple[Any, ...]:
    """The record as the table's columns, in ``COLUMNS`` order."""
    return (
        record.request_id,
        float(record.ts),
        utc_day(record.ts),
        record.consumer,
        record.route,
        record.alias,
        record.provider,
        record.model,
        int(record.prompt_tokens),
        int(record.completion_tokens),
        float(record.cost_usd),
        float(record.latency_ms),
        record.ttft_ms,
        int(record.status),
        record.error_code,
        bool(record.stream),
        record.cache,
        json.dumps(record.safety),
        json.dumps(record.reservation, sort_keys=True),
    )


class LedgerDB(Protocol):
    dsn: str

    def ensure_schema(self) -> None: ...

    def write(self, records: Sequence[UsageRecord]) -> int:
        """Insert the records not yet in the table and commit; returns how many were new."""
        ...

    def totals(self, since: str | None = None, consumer: str | None = None) -> list[UsageTotal]:
        """Totals per day, consumer and model; ``since`` is a UTC day (``YYYY-MM-DD``)."""
        ...

    def request_ids(self) -> list[str]: ...

    def close(self) -> None: ...


class _SqlLedger(ABC):
    """The SQL both databases share; subclasses supply the connection and the placeholder."""

    dsn: str
    mark = "?"
    float_type = "REAL"

    @abstractmethod
    def _conn(self) -> Any:
        """The open connection (opened on first use)."""

    def ensure_schema(self) -> None:
        conn = self._conn()
        with _errors(self.dsn, "create the ledger table"):
            conn.execute(_SCHEMA.format(float=self.float_type))
            for index in _INDEXES:
                conn.execute(index)
            conn.commit()

    def write(self, records: Sequence[UsageRecord]) -> int:
        if not records:
            return 0
        conn = self._conn()
        marks = ", ".join([self.mark] * len(COLUMNS))
        insert = (
            f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({marks}) "  # noqa: S608 - constants
            "ON CONFLICT (request_id) DO NOTHING"
        )
        with _errors(self.dsn, "write usage records"):
            try:
                cur = conn.cursor()
                # both drivers sum the rowcounts of executemany (0 for a request id already there);
                # psycopg pipelines the statements, one round trip per batch
                cur.executemany(insert, [row(record) for record in records])
                written = int(max(cur.rowcount, 0))
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return written

    def totals(self, since: str | None = None, consumer: str | None = None) -> list[UsageTotal]:
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append(f"day >= {self.mark}")
            params.append(since)
        if consumer is not None:
            where.append(f"consumer = {self.mark}")
            params.append(consumer)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        query = (
            "SELECT day, consumer, provider, model, COUNT(*), SUM(prompt_tokens), "  # noqa: S608
            f"SUM(completion_tokens), SUM(cost_usd) FROM {TABLE} {clause} "
            "GROUP BY day, consumer, provider, model ORDER BY day, consumer, provider, model"
        )
        conn = self._conn()
        with _errors(self.dsn, "read usage totals"):
            rows = conn.execute(query, params).fetchall()
            conn.rollback()  # end the read transaction (PostgreSQL opens one)
        return [
            UsageTotal(
                day=str(day),
                consumer=str(who),
                model=f"{provider}:{model}" if provider else str(model),
                requests=int(n),
                prompt_tokens=int(p or 0),
                completion_tokens=int(c or 0),
                cost_usd=float(cost or 0.0),
            )
            for day, who, provider, model, n, p, c, cost in rows
        ]

    def request_ids(self) -> list[str]:
        conn = self._conn()
        with _errors(self.dsn, "read request ids"):
            rows = conn.execute(f"SELECT request_id FROM {TABLE}").fetchall()  # noqa: S608
            conn.rollback()
        return [str(r[0]) for r in rows]


class SqliteLedger(_SqlLedger):
    """The embedded ledger: one SQLite file, in WAL mode so reports read while the writer writes."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.path = Path(dsn.removeprefix("sqlite://"))
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            with _errors(self.dsn, "open the ledger file"):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=10.0)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class PostgresLedger(_SqlLedger):
    """The production ledger: a table in PostgreSQL, written by one ``deepgate ledger``."""

    mark = "%s"
    float_type = "DOUBLE PRECISION"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._db: Any = None

    def _conn(self) -> Any:
        if self._db is None:
            import psycopg

            with _errors(self.dsn, "connect to PostgreSQL"):
                self._db = psycopg.connect(self.dsn, connect_timeout=10)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def default_dsn() -> str:
    """``DEEPGATE_LEDGER_DSN``, else ``ledger.db`` under ``DEEPGATE_DATA_DIR`` (``./run``)."""
    return local_dsn(DSN_ENV, "ledger.db")


def open_ledger(dsn: str) -> LedgerDB:
    if dsn.startswith("sqlite://"):
        return SqliteLedger(dsn)
    if dsn.startswith(("postgresql://", "postgres://")):
        return PostgresLedger(dsn)
    raise LedgerError(
        f"unknown ledger database {redact_dsn(dsn)!r}: use sqlite:///path/to/ledger.db or "
        "postgresql://user@host/dbname"
    )


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or "@" not in rest:
        return dsn
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else dsn


@contextmanager
def _errors(dsn: str, doing: str) -> Iterator[None]:
    """Turn a driver's error into a ``LedgerError`` that names the database and the step."""
    try:
        yield
    except LedgerError:
        raise
    except Exception as exc:
        if not _is_db_error(exc):
            raise
        raise LedgerError(f"could not {doing} in {redact_dsn(dsn)}: {exc}".strip()) from exc


def _is_db_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error | OSError):
        return True
    import psycopg  # imported when an error needs sorting, not by every SQLite-only writer

    return isinstance(exc, psycopg.Error)
