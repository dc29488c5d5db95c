"""``deepgate usage``: what each consumer used, per model and day, from the usage ledger.

Reads the table ``deepgate ledger`` writes (SQLite or PostgreSQL, the same ``--dsn`` rules) and
prints requests, tokens in and out and cost, grouped by UTC day, consumer and the
``provider:model`` that answered, as a table or as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import TextIO

from deepgate.ledger_db import LedgerError, UsageTotal, default_dsn, open_ledger

log = logging.getLogger(__name__)

_RELATIVE = re.compile(r"^(\d+)([dh])$")


def parse_since(text: str, now: datetime | None = None) -> str:
    """A UTC day ``YYYY-MM-DD`` from ``2026-11-01``, ``7d`` (seven days back) or ``today``."""
    now = now or datetime.now(UTC)
    text = text.strip().lower()
    if text == "today":
        return now.strftime("%Y-%m-%d")
    match = _RELATIVE.match(text)
    if match:
        amount, unit = int(match[1]), match[2]
        back = timedelta(days=amount) if unit == "d" else timedelta(hours=amount)
        return (now - back).strftime("%Y-%m-%d")
    try:
        return datetime.strptime(text, "%Y-%m-%d").strftime("%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: give a day (2026-11-01), a number of days (7d) or 'today'"
        ) from None


def render_table(totals: list[UsageTotal], out: TextIO) -> None:
    header = ("day", "consumer", "model", "requests", "tokens in", "tokens out", "cost (USD)")
    rows = [
        (
            t.day,
            t.consumer or "-",
            t.model or "-",
            str(t.requests),
            str(t.prompt_tokens),
            str(t.completion_tokens),
            f"{t.cost_usd:.6f}",
        )
        for t in totals
    ]
    rows.append(
        (
            "total",
            "",
            "",
            str(sum(t.requests for t in totals)),
            str(sum(t.prompt_tokens for t in totals)),
            str(sum(t.completion_tokens for t in totals)),
            f"{sum(t.cost_usd for t in totals):.6f}",
        )
    )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    numeric = {3, 4, 5, 6}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out.write(line(header) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in rows[:-1]:
        out.write(line(r) + "\n")
    out.write(line(rows[-1]) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=None,
        help="ledger database (default: $DEEPGATE_LEDGER_DSN, else ledger.db under "
        "$DEEPGATE_DATA_DIR or ./run)",
    )
    parser.add_argument(
        "--since", type=parse_since, default=None, help="from this UTC day: 2026-11-01, 7d, today"
    )
    parser.add_argument("--consumer", default=None, help="only this consumer")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    dsn = args.dsn or default_dsn()
    if dsn.startswith("sqlite://") and not _sqlite_exists(dsn):
        log.error(
            "no usage ledger at %s yet: start the writer (deepgate ledger, or make run) or pass "
            "--dsn",
            dsn.removeprefix("sqlite://"),
        )
        return 1
    try:
        db = open_ledger(dsn)
        try:
            db.ensure_schema()
            totals = db.totals(since=args.since, consumer=args.consumer)
        finally:
            db.close()
    except LedgerError as exc:
        log.error("%s", exc)
        return 1
    if args.json:
        json.dump({"totals": [asdict(t) for t in totals]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render_table(totals, sys.stdout)
    return 0


def _sqlite_exists(dsn: str) -> bool:
    from pathlib import Path

    return Path(dsn.removeprefix("sqlite://")).exists()
