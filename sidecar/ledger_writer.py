"""``deepgate ledger``: the one writer of the usage ledger, from the Redis stream to the database.

It reads ``deepgate:usage`` as a member of a consumer group (``XGROUP CREATE … MKSTREAM``,
``XREADGROUP``), writes each batch with ``LedgerDB.write`` (insert-or-ignore by request id, one
commit) and only then acknowledges the batch (``XACK``). So:

- a writer killed between its commit and its acknowledgement finds its batch again on restart
  (its own pending entries, read from id ``0``) and writes nothing twice;
- entries left pending by a writer that died under another name are taken over with
  ``XAUTOCLAIM`` once they have been idle ``--claim-idle-s``;
- an entry that is not a usage record is copied to ``deepgate:usage:rejected`` and acknowledged
  (counted in the log, its content kept for the operator, not logged);
- when the database fails nothing is acknowledged: the batch stays pending and is retried.

SIGTERM or Ctrl-C: the batch in hand is written and acknowledged, then the command exits 0.

The writer is a small blocking loop (redis-py and the database driver, both synchronous): it has
one thing to do at a time, and SIGTERM only needs to be noticed between batches.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import redis
from redis.exceptions import RedisError, ResponseError

from deepgate.ledger_db import LedgerDB, LedgerError, default_dsn, open_ledger, redact_dsn
from deepgate.usage_record import STREAM, UsageRecord

log = logging.getLogger(__name__)

GROUP = "deepgate-ledger"
REJECTED_STREAM = STREAM + ":rejected"
REDIS_ENV = "DEEPGATE_REDIS_URL"

Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass
class WriterStats:
    written: int = 0  # new rows
    duplicates: int = 0  # records already in the table
    rejected: int = 0  # entries that were not usage records
    trimmed: int = 0  # pending entries Redis had trimmed before they were written
    batches: int = 0
    errors: int = 0


@dataclass
class LedgerWriter:
    client: redis.Redis
    db: LedgerDB
    consumer: str
    group: str = GROUP
    stream: str = STREAM
    batch: int = 500
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    stats: WriterStats = field(default_factory=WriterStats)
    stopping: bool = False
    _own_backlog: bool = True  # read our own pending entries first (a restart after a crash)
    _claim_from: str = "0-0"

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created the consumer group %s on %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, until_idle: bool = False, drain_s: float = 0.0) -> None:
        """Write until ``stopping`` (SIGTERM), or with ``until_idle`` until the stream is empty.

        Once ``stopping`` is set the batch in hand is written and acknowledged; with ``drain_s``
        the writer then keeps writing for up to that long while records still arrive (``make
        run`` stops the sidecar and the writer together, and the sidecar flushes as it stops).
        """
        self.db.ensure_schema()
        self.ensure_group()
        pause = 0.5
        deadline: float | None = None
        while True:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + drain_s
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                entries = self.next_entries()
                if entries:
                    self.handle(entries)
                elif (until_idle or deadline is not None) and not self._own_backlog:
                    return
                pause = 0.5
            except (RedisError, OSError, LedgerError) as exc:
                self.stats.errors += 1
                self._own_backlog = True  # what was read and not acked is pending: read it again
                if "NOGROUP" in str(exc):  # the stream was deleted (and its group with it)
                    self._claim_from = "0-0"
                    self._recreate_group()
                if self.stopping:  # nothing more can be drained: what is pending stays pending
                    log.warning("the ledger writer stops with records pending: %s", exc)
                    return
                log.warning("the ledger writer will retry in %.1f s: %s", pause, exc)
                self._nap(pause)
                pause = min(pause * 2, 10.0)

    def _recreate_group(self) -> None:
        try:
            self.ensure_group()
        except (RedisError, OSError) as exc:
            log.warning("could not create the consumer group again: %s", exc)

    def _nap(self, seconds: float) -> None:
        """Sleep, but wake for SIGTERM within a tenth of a second."""
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(0.1)

    def next_entries(self) -> list[Entry]:
        if self._own_backlog:
            entries = self._read("0", block=None)
            if entries:
                return entries
            self._own_backlog = False
        claimed = self._claim()
        if claimed:
            return claimed
        return self._read(">", block=self.block_ms)

    def _read(self, start: str, block: int | None) -> list[Entry]:
        reply: Any = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.batch, block=block
        )
        if not reply:
            return []
        _, entries = reply[0]
        return [(ident, fields) for ident, fields in entries if fields]

    def _claim(self) -> list[Entry]:
        """Take over entries another writer read and never acknowledged (it died)."""
        reply: Any = self.client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_from,
            count=self.batch,
        )
        self._claim_from = _text(reply[0])
        entries = [(ident, fields) for ident, fields in reply[1] if fields]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:
            # trimmed from the stream before any writer wrote them: gone, so say how many
            self.stats.trimmed += len(deleted)
            self.client.xack(self.stream, self.group, *deleted)
            log.error(
                "%d usage records were trimmed from the stream before being written", len(deleted)
            )
        if entries:
            log.info("took over %d usage records another writer left pending", len(entries))
        return entries

    def handle(self, entries: Sequence[Entry]) -> None:
        records: list[UsageRecord] = []
        rejected: list[Entry] = []
        for ident, fields in entries:
            try:
                records.append(UsageRecord.from_json(fields[b"record"]))
            except (KeyError, ValueError, TypeError):
                rejected.append((ident, fields))
        try:
            new = self.db.write(records)  # committed when it returns
        except LedgerError:
            self._own_backlog = True  # not acknowledged: pending, to be read again from id 0
            raise
        if rejected:
            pipe = self.client.pipeline(transaction=False)
            for ident, fields in rejected:
                kept: dict[Any, Any] = {**fields, b"source_id": ident}
                pipe.xadd(REJECTED_STREAM, kept, maxlen=10_000)
            pipe.execute()
            self.stats.rejected += len(rejected)
            log.error(
                "%d stream entries were not usage records; kept in %s",
                len(rejected),
                REJECTED_STREAM,
            )
        self.client.xack(self.stream, self.group, *[ident for ident, _ in entries])
        self.stats.batches += 1
        self.stats.written += new
        self.stats.duplicates += len(records) - new
        log.debug("ledger batch", extra={"records": len(records), "new": new})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=None,
        help="ledger database: sqlite:///path/ledger.db or postgresql://user@host/db "
        "(default: $DEEPGATE_LEDGER_DSN, else ledger.db under $DEEPGATE_DATA_DIR or ./run)",
    )
    parser.add_argument(
        "--redis", default=None, help=f"Redis URL of the usage stream (default: ${REDIS_ENV})"
    )
    parser.add_argument("--group", default=GROUP, help="consumer group name (default: %(default)s)")
    parser.add_argument(
        "--consumer",
        default=f"ledger-{socket.gethostname()}",
        help="this writer's name in the group; keep it across restarts (default: %(default)s)",
    )
    parser.add_argument("--batch", type=int, default=500, help="records per commit (default: 500)")
    parser.add_argument(
        "--claim-idle-s",
        type=float,
        default=60.0,
        help="take over records another writer has left pending this long (default: 60)",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=0.0,
        help="after SIGTERM, keep writing records that still arrive for up to this long "
        "(default: 0, stop after the batch in hand)",
    )
    parser.add_argument(
        "--until-idle",
        action="store_true",
        help="write what the stream holds now, then exit (instead of following it)",
    )


def run(args: argparse.Namespace) -> int:
    url = args.redis or os.environ.get(REDIS_ENV)
    if not url:
        log.error("no Redis to read usage records from: pass --redis URL or set %s", REDIS_ENV)
        return 2
    dsn = args.dsn or default_dsn()
    try:
        db = open_ledger(dsn)
    except LedgerError as exc:
        log.error("%s", exc)
        return 2
    client = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
    writer = LedgerWriter(
        client,
        db,
        consumer=args.consumer,
        group=args.group,
        batch=max(1, args.batch),
        claim_idle_ms=int(args.claim_idle_s * 1000),
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        writer.stopping = True  # the loop finishes the batch in hand, acks it, and returns

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "ledger writer started",
        extra={
            "stream": STREAM,
            "group": args.group,
            "consumer": args.consumer,
            "database": redact_dsn(dsn),
        },
    )
    try:
        writer.run(until_idle=args.until_idle, drain_s=args.drain_s)
    except (LedgerError, RedisError, OSError) as exc:
        log.error("the ledger writer stopped: %s", exc)
        return 1
    finally:
        db.close()
        client.close()
    s = writer.stats
    log.info(
        "ledger writer stopped",
        extra={
            "written": s.written,
            "duplicates": s.duplicates,
            "rejected": s.rejected,
            "trimmed": s.trimmed,
            "batches": s.batches,
        },
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    """``python -m sidecar.ledger_writer``: the same as ``deepgate ledger`` (used by make run)."""
    import sys

    from deepgate.logs import setup_logging

    setup_logging("deepgate-ledger")
    parser = argparse.ArgumentParser(prog="deepgate ledger", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
