"""deepgate.logs: one JSON object a line, the request id from the context, extras."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from deepgate.logs import request_scope, setup_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """setup_logging replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    out = io.StringIO()
    yield out
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved_handlers:
        root.addHandler(h)
    root.setLevel(saved_level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line(stream: io.StringIO) -> None:
    setup_logging("runner", "info", stream)
    log = logging.getLogger("deepgate.test")
    log.info("prepared %d plugins for %s", 3, "route-1")
    log.warning("second\nline in the message")
    records = lines(stream)
    assert len(records) == 2
    first, second = records
    assert first["msg"] == "prepared 3 plugins for route-1"
    assert first["level"] == "info"
    assert first["service"] == "runner"
    assert first["logger"] == "deepgate.test"
    assert first["ts"].endswith("Z")
    assert "request_id" not in first
    assert second["level"] == "warning"
    assert second["msg"] == "second\nline in the message"


def test_level_filters(stream: io.StringIO) -> None:
    setup_logging("runner", "warning", stream)
    log = logging.getLogger("deepgate.test")
    log.info("hidden")
    log.error("shown")
    assert [r["msg"] for r in lines(stream)] == ["shown"]


def test_level_from_environment(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGATE_LOG_LEVEL", "error")
    setup_logging("runner", stream=stream)
    log = logging.getLogger("deepgate.test")
    log.warning("hidden")
    log.error("shown")
    assert [r["msg"] for r in lines(stream)] == ["shown"]


def test_setup_twice_does_not_duplicate_lines(stream: io.StringIO) -> None:
    setup_logging("runner", "info", io.StringIO())
    setup_logging("runner", "info", stream)
    logging.getLogger("deepgate.test").info("once")
    assert len(lines(stream)) == 1


def test_request_scope_puts_the_id_in_lines(stream: io.StringIO) -> None:
    setup_logging("runner", "info", stream)
    log = logging.getLogger("deepgate.test")
    with request_scope("req-123"):
        log.info("inside")
        with request_scope("req-456"):
            log.info("nested")
        log.info("back")
    log.info("outside")
    got = [(r["msg"], r.get("request_id")) for r in lines(stream)]
    assert got == [
        ("inside", "req-123"),
        ("nested", "req-456"),
        ("back", "req-123"),
        ("outside", None),
    ]


async def test_request_id_follows_each_task(stream: io.StringIO) -> None:
    setup_logging("runner", "info", stream)
    log = logging.getLogger("deepgate.test")

    async def handle(rid: str) -> None:
        with request_scope(rid):
            await asyncio.sleep(0)
            log.info("handled %s", rid)

    await asyncio.gather(handle("a"), handle("b"), handle("c"))
    for record in lines(stream):
        assert record["msg"] == f"handled {record['request_id']}"


def test_extras_appear_as_fields(stream: io.StringIO) -> None:
    setup_logging("runner", "info", stream)
    logging.getLogger("deepgate.test").info(
        "refused", extra={"rule": "deny_patterns[0]", "tokens": 42, "obj": object()}
    )
    (record,) = lines(stream)
    assert record["rule"] == "deny_patterns[0]"
    assert record["tokens"] == 42
    assert record["obj"].startswith("<object object")


def test_exception_is_included(stream: io.StringIO) -> None:
    setup_logging("runner", "info", stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("deepgate.test").exception("handler failed")
    (record,) = lines(stream)
    assert record["level"] == "error"
    assert "ValueError: boom" in record["exc"]


def test_extras_do_not_overwrite_the_standard_fields(stream: io.StringIO) -> None:
    setup_logging("runner", "info", stream)
    logging.getLogger("deepgate.test").info(
        "called provider", extra={"service": "openai", "level": "debug"}
    )
    (record,) = lines(stream)
    assert record["service"] == "runner"
    assert record["level"] == "info"


def test_undecodable_text_still_gives_a_line(stream: io.StringIO) -> None:
    # The codec decodes wire strings with surrogateescape; logging such a value (a route key,
    # a path) must not lose the line.
    setup_logging("runner", "info", stream)
    logging.getLogger("deepgate.test").error("PrepareConf refused for %s", "route#\udcff")
    (record,) = lines(stream)
    assert record["msg"].startswith("PrepareConf refused for route#")
