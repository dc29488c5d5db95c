"""``python -m sidecar`` as a process: start-up, warnings, config errors, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.fakes.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sidecar(
    tmp_path: Path, env: dict[str, str], *extra: str
) -> tuple[subprocess.Popen[bytes], int, Path]:
    http, grpc = free_port(), free_port()
    log = tmp_path / "sidecar.log"
    clean = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    clean.pop("DEEPGATE_ROUTE_KEY", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--role", "gateway", "--http", f"127.0.0.1:{http}",
             "--grpc", f"127.0.0.1:{grpc}", *extra],
            cwd=ROOT, env={**clean, **env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, http, log


def read_log(log: Path) -> str:
    return log.read_text()


async def wait_up(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"sidecar exited: {read_log(log)}")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"sidecar did not come up: {read_log(log)}")


@pytest.fixture
async def deepseek() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI("deepseek")
    await fake.start()
    yield fake
    await fake.stop()


async def test_sigterm_lets_a_stream_in_flight_finish(tmp_path: Path, deepseek: FakeOpenAI) -> None:
    env = {"DEEPSEEK_API_KEY": "sk-test", "DEEPSEEK_BASE_URL": deepseek.url}
    proc, port, log = start_sidecar(tmp_path, env)
    try:
        await wait_up(proc, port, log)
        deepseek.behave(first_byte_delay_s=1.0)
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        ) as client:

            async def stream_text() -> str:
                stream = await client.chat.completions.create(
                    model="deepseek-chat", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                return "".join(
                    [c.choices[0].delta.content or "" async for c in stream if c.choices]
                )

            task = asyncio.create_task(stream_text())
            await asyncio.sleep(0.4)  # the request is waiting on the provider
            proc.send_signal(signal.SIGTERM)
            assert "deepseek" in await task
        rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
        assert rc == 0
        logs = read_log(log)
        assert "running without route signatures" in logs
        assert "sk-test" not in logs  # keys never reach the log
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_unset_keys_are_reported_and_chat_says_what_to_set(tmp_path: Path) -> None:
    proc, port, log = start_sidecar(tmp_path, {})
    try:
        await wait_up(proc, port, log)
        async with httpx.AsyncClient() as client:
            r = await client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]},
            )
            health = (await client.get(f"http://127.0.0.1:{port}/healthz")).json()
        assert r.status_code == 503
        assert "DEEPSEEK_API_KEY" in r.json()["error"]["message"]
        assert health["status"] == "degraded"
        assert "provider deepseek is not available" in read_log(log)
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_bad_config_stops_start_up_with_file_and_path(tmp_path: Path) -> None:
    bad = tmp_path / "sidecar.yaml"
    bad.write_text(
        "providers:\n  deepseek:\n    kind: openai_compat\n    api_key: sk-inlined-secret\n"
        "aliases:\n  x: [deepseek:m]\n"
    )
    proc, _, log = start_sidecar(tmp_path, {}, "--config", str(bad))
    assert proc.wait(30) == 2
    text = log.read_text()
    assert str(bad) in text
    assert "providers.deepseek.api_key" in text
    assert "sk-inlined-secret" not in text
