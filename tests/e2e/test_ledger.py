"""End to end: requests through the whole stack (`make run`'s launcher) land in the usage
ledger, and `deepgate usage` prints them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from deepgate.ledger_db import open_ledger
from tests.e2e.conftest import KEY, Stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data dir of this module's own, so the ledger file is this stack's alone."""
    path = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPGATE_DATA_DIR", str(path))
        mp.delenv("DEEPGATE_LEDGER_DSN", raising=False)
        yield path


@pytest.fixture(scope="module")
def ledger_stack(data_dir: Path, stack: Stack) -> Stack:
    return stack


def usage(data_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from sidecar.cli import main; main()",
            "usage",
            *argv,
            "--dsn",
            f"sqlite://{data_dir / 'ledger.db'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_answered_requests_are_in_the_ledger(ledger_stack: Stack, data_dir: Path) -> None:
    ask = [{"role": "user", "content": f"Ledger check {uuid.uuid4()}: what is 2+2?"}]
    ids = []
    with openai.OpenAI(base_url=f"{ledger_stack.base}/v1", api_key=KEY, max_retries=0) as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=ask)  # type: ignore[arg-type]
        ids.append(raw.headers["x-request-id"])
        usage_reported = raw.parse().usage
        raw = oa.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": f"Another {uuid.uuid4()}"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        ids.append(raw.headers["x-request-id"])
        for _ in raw.parse():
            pass
    assert usage_reported is not None

    deadline = time.monotonic() + 30
    while True:  # the writer follows the stream: a moment behind the answers
        if (data_dir / "ledger.db").exists():
            db = open_ledger(f"sqlite://{data_dir / 'ledger.db'}")
            found = set(db.request_ids())
            db.close()
            if set(ids) <= found:
                break
        assert time.monotonic() < deadline, "the requests never reached the ledger"
        time.sleep(0.3)

    done = usage(data_dir, "--json", "--consumer", "demo")
    assert done.returncode == 0, done.stderr
    [total] = json.loads(done.stdout)["totals"]
    assert total["model"] == "deepseek:deepseek-chat"
    assert total["requests"] == 2
    assert total["prompt_tokens"] >= usage_reported.prompt_tokens
    assert total["cost_usd"] > 0
    table = usage(data_dir)
    assert "demo" in table.stdout
    assert "deepseek:deepseek-chat" in table.stdout


def test_a_request_answered_just_before_ctrl_c_is_in_the_ledger(
    ledger_stack: Stack, data_dir: Path
) -> None:
    ask = [{"role": "user", "content": f"Last words {uuid.uuid4()}"}]
    with openai.OpenAI(base_url=f"{ledger_stack.base}/v1", api_key=KEY, max_retries=0) as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=ask)  # type: ignore[arg-type]
    rid = raw.headers["x-request-id"]
    os.killpg(ledger_stack.proc.pid, signal.SIGINT)  # Ctrl-C in the terminal of `make run`
    assert ledger_stack.proc.wait(30) == 0
    db = open_ledger(f"sqlite://{data_dir / 'ledger.db'}")
    assert rid in db.request_ids()
    db.close()
