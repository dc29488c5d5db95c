"""``python -m devgateway`` as a process: it spawns the real runner from ``ext-plugin.cmd`` as
APISIX does, respawns it when it dies, refuses bad configs at start-up, and stops cleanly.

The runner is ``python -m plugins.runner`` (via a one-line wrapper that first records the
environment it was given), serving the real ``deepgate-prompt-filter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson
import pytest

from tests.integration.test_devgateway import (
    CONFIG,
    SSE_EVENTS,
    Upstream,
    route,
    upstream_server,
    write,
)

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"

upstream_fixture = pytest.fixture(name="upstream")(upstream_server)

# The runner APISIX would start, preceded by a note of the environment it got.
RUNNER_RECORDING_ENV = (
    "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)));"
    "from plugins.runner.__main__ import main; main()"
)


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    url: str = ""
    logs: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def messages(self, text: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if text in str(line.get("msg", ""))]

    def runner_pids(self) -> list[int]:
        return [int(line["pid"]) for line in self.messages("runner started")]


async def start_gateway(cfile: Path, rfile: Path, env: dict[str, str]) -> GatewayProcess:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devgateway",
        "--config",
        str(cfile),
        "--routes",
        str(rfile),
        "--listen",
        "127.0.0.1:0",
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    gw = GatewayProcess(proc)
    serving = asyncio.Event()

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"msg": raw.decode(errors="replace").rstrip()}
            gw.logs.append(line)
            if line.get("msg") == "devgateway serving":
                gw.url = f"http://{line['listen']}"
                serving.set()
        serving.set()  # stderr closed: the process ended

    gw.reader = asyncio.create_task(read())
    await asyncio.wait_for(serving.wait(), 60)
    return gw


async def stop_gateway(gw: GatewayProcess, terminate: bool = True) -> int:
    """Its exit code, after SIGTERM (or, with ``terminate=False``, once it ends by itself)."""
    if terminate and gw.proc.returncode is None:
        gw.proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(gw.proc.wait(), 20)
    if gw.reader is not None:
        await gw.reader
    return code


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gw in started:
        if gw.proc.returncode is None:
            gw.proc.kill()
            await gw.proc.wait()
        for pid in gw.runner_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def exists(path: str) -> bool:
    return os.path.exists(path)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def chat(text: str) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": text}]}


async def test_runs_the_runner_as_apisix_does_and_stops_cleanly(
    tmp_path: Path, upstream: Upstream, gateways: list[GatewayProcess]
) -> None:
    env_note = tmp_path / "runner-env.json"
    config = {
        **CONFIG,
        "ext-plugin": {"cmd": [sys.executable, "-c", RUNNER_RECORDING_ENV, str(env_note)]},
        "nginx_config": {"envs": ["DG_PASSED", "DG_SET=fixed"]},
    }
    filter_conf = {"deny_patterns": ["forbidden"]}
    routes = {
        "consumers": [{"username": "dev", "plugins": {"key-auth": {"key": "$env://DG_KEY"}}}],
        "routes": [
            route(
                upstream,
                CHAT,
                methods=["POST"],
                plugins={
                    "key-auth": {"hide_credentials": True},
                    "ext-plugin-post-req": {
                        "conf": [
                            {"name": "deepgate-prompt-filter", "value": json.dumps(filter_conf)}
                        ]
                    },
                },
            ),
            route(upstream, "/sse"),
        ],
    }
    env = dict(os.environ, DG_KEY="sk-dev", DG_PASSED="yes", DG_HIDDEN="no")
    gw = await start_gateway(*write(tmp_path, routes, config), env)
    gateways.append(gw)
    assert gw.url, gw.logs

    # The runner got only what nginx would pass it.
    runner_env = json.loads(env_note.read_text())
    assert runner_env["DG_PASSED"] == "yes"
    assert runner_env["DG_SET"] == "fixed"
    assert "DG_HIDDEN" not in runner_env
    assert "DG_KEY" not in runner_env
    assert runner_env["APISIX_LISTEN_ADDRESS"].startswith("unix:/")
    assert runner_env["APISIX_CONF_EXPIRE_TIME"] == "3600"

    key = {"apikey": "sk-dev"}
    async with httpx.AsyncClient(base_url=gw.url, timeout=20) as c:
        ok = await c.post(CHAT, json=chat("Hello\u200b   world"), headers=key)
        assert ok.status_code == 200
        assert orjson.loads(upstream.seen[-1].body)["messages"][0]["content"] == "Hello world"
        assert "apikey" not in upstream.seen[-1].names()
        refused = await c.post(CHAT, json=chat("forbidden words"), headers=key)
        assert refused.status_code == 400
        assert refused.headers["content-type"] == "application/json"

        # The runner dies: 503 while it is down, served again once respawned (3 s later).
        (first_pid,) = gw.runner_pids()
        os.kill(first_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        statuses: list[int] = []
        while time.monotonic() - killed_at < 20:
            r = await c.post(CHAT, json=chat("again"), headers=key)
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            await asyncio.sleep(0.1)
        back_after = time.monotonic() - killed_at
        assert statuses[0] == 503
        assert statuses[-1] == 200
        assert set(statuses) == {503, 200}
        assert back_after >= 2.5
        assert gw.messages("runner exited")
        second_pid = gw.runner_pids()[-1]
        assert second_pid != first_pid

        # SIGTERM while a stream is in flight: the stream still completes, then it all stops.
        received = b""
        async with c.stream("GET", "/sse") as stream:
            async for chunk in stream.aiter_raw():
                if not received:
                    gw.proc.send_signal(signal.SIGTERM)
                received += chunk
        assert received == b"".join(SSE_EVENTS)
    assert await stop_gateway(gw) == 0
    assert not alive(second_pid)
    # The socket and its temporary directory are gone.
    assert not exists(os.path.dirname(runner_env["APISIX_LISTEN_ADDRESS"].removeprefix("unix:")))
    assert gw.messages("stopped")


async def test_a_config_it_does_not_imitate_stops_start_up(
    tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    routes = {"routes": [route("127.0.0.1:1", plugins={"limit-count": {"count": 1}})]}
    cfile, rfile = write(tmp_path, routes)
    gw = await start_gateway(cfile, rfile, dict(os.environ))
    gateways.append(gw)
    assert await stop_gateway(gw, terminate=False) == 2
    (error,) = [line for line in gw.logs if line.get("level") == "error"]
    assert str(rfile) in error["msg"]
    assert "routes[0].plugins.limit-count" in error["msg"]


async def test_a_runner_that_cannot_start_stops_start_up(
    tmp_path: Path, gateways: list[GatewayProcess]
) -> None:
    config = {**CONFIG, "ext-plugin": {"cmd": [sys.executable, "-c", "raise SystemExit(3)"]}}
    gw = await start_gateway(*write(tmp_path, {"routes": []}, config), dict(os.environ))
    gateways.append(gw)
    assert await stop_gateway(gw, terminate=False) == 2
    assert any("exited (code 3) before listening" in str(line["msg"]) for line in gw.logs)
