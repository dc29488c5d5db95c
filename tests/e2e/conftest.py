"""The whole stack, as `make run` starts it, with fake providers, for the official SDKs.

One stack per test module: the launcher (`python -m devgateway.launch`, what `make run` runs)
starts the sidecar and the APISIX stand-in, which spawns the plugin runner. DeepSeek, OpenAI and
Anthropic are our fake servers, served from a background thread's event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-e2e-demo-key-0123"


class Fakes:
    """The three fake providers on a private event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.deepseek = FakeOpenAI("deepseek")
        self.openai = FakeOpenAI("openai")
        self.anthropic = FakeAnthropic()
        for fake in self.all():
            self.run(fake.start())

    def all(self) -> tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]:
        return self.deepseek, self.openai, self.anthropic

    def run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def reset(self) -> None:
        for fake in self.all():
            fake.behave()

    def close(self) -> None:
        for fake in self.all():
            self.run(fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    port: int
    fakes: Fakes
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self) -> list[tuple[int, str]]:
        """Every live process of the stack's session (the launcher and all it started)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getsid(int(entry)) != self.proc.pid:
                    continue
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
            found.append((int(entry), cmd))
        return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    fakes = Fakes()
    port = free_port()
    log = tmp_path_factory.mktemp("stack") / "stack.log"
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env.pop("DEEPGATE_ROUTE_KEY", None)
    env.update(
        DEEPGATE_PORT=str(port),
        DEEPGATE_DEMO_KEY=KEY,
        DEEPSEEK_API_KEY="sk-fake-deepseek",
        DEEPSEEK_BASE_URL=fakes.deepseek.url,
        OPENAI_API_KEY="sk-fake-openai",
        OPENAI_BASE_URL=f"{fakes.openai.url}/v1",
        ANTHROPIC_API_KEY="sk-fake-anthropic",
        ANTHROPIC_BASE_URL=fakes.anthropic.url,
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devgateway.launch"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a session of its own, as `make run` in a terminal
        )
    s = Stack(proc, port, fakes, log)
    try:
        deadline = time.monotonic() + 120
        while not answers(f"{s.base}/v1/models"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not start:\n{s.logs()}")
            time.sleep(0.2)
        yield s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        fakes.close()


@pytest.fixture(autouse=True)
def _reset_fakes(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").fakes.reset()
