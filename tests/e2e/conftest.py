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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import yaml

from deepgate.embedded_redis import EmbeddedRedis
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


# --- a stack of a module's own ----------------------------------------------------------------
#
# Modules that judge one plugin start their own stack: a real Redis, the sidecar and the APISIX
# stand-in serving the shipped routes with the chat routes' post-req chain cut down to what the
# module needs (and its own consumers), pointed at this stack's sidecar.


def shipped_routes(sidecar_port: int, keep: tuple[str, ...], **consumers: str) -> dict[str, Any]:
    """The shipped apisix.yaml, chat chains cut to ``keep``, plus consumers ``name=key``."""
    routes: dict[str, Any] = yaml.safe_load((ROOT / "apisix-conf" / "apisix.yaml").read_text())
    routes["upstreams"][0]["nodes"] = {f"127.0.0.1:{sidecar_port}": 1}
    for name, key in consumers.items():
        routes["consumers"].append({"username": name, "plugins": {"key-auth": {"key": key}}})
    for chain in post_req_chains(routes):
        chain[:] = [c for c in chain if c["name"] in keep]
    return routes


def post_req_chains(routes: dict[str, Any]) -> Iterator[list[dict[str, str]]]:
    for route in routes["routes"]:
        post = route["plugins"].get("ext-plugin-post-req")
        if post is not None:
            yield post["conf"]


def edit_plugin(routes: dict[str, Any], name: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change plugin ``name``'s config on every chat route."""
    for chain in post_req_chains(routes):
        for conf in chain:
            if conf["name"] == name:
                value = orjson.loads(conf["value"])
                edit(value)
                conf["value"] = orjson.dumps(value).decode()


@dataclass
class OwnStack:
    port: int
    sidecar_port: int
    grpc_port: int
    fakes: Fakes
    tmp: Path
    log: Path
    env: dict[str, str]
    redis_url: str | None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, key: str = KEY, timeout: float = 30) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=timeout
        )

    def anthropic(self, key: str = KEY, timeout: float = 30) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.base, api_key=key, max_retries=0, timeout=timeout)

    def provider_calls(self) -> int:
        return sum(len(f.received) for f in self.fakes.all())


def wait_until(ok: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen in {timeout_s}s")
        time.sleep(0.05)


@contextmanager
def own_stack(
    tmp: Path,
    routes: Callable[[int], dict[str, Any]],
    *,
    role: str = "gateway",
    redis: bool = True,
    env: dict[str, str] | None = None,
    before_gateway: Callable[[OwnStack], None] | None = None,
) -> Iterator[OwnStack]:
    """Start Redis, the sidecar (``role``) and the stand-in on ``routes(sidecar_port)``."""
    fakes = Fakes()
    server = EmbeddedRedis().start() if redis else None
    sidecar_port, grpc_port, port = free_port(), free_port(), free_port()
    (tmp / "apisix.yaml").write_text(
        yaml.safe_dump(routes(sidecar_port), sort_keys=False) + "#END\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    environ.pop("DEEPGATE_REDIS_URL", None)
    environ.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        DEEPGATE_DEMO_KEY=KEY,
        DEEPGATE_ROUTE_KEY=f"e2e-route-key-{tmp.name}",
        DEEPGATE_SIDECAR_GRPC=f"127.0.0.1:{grpc_port}",
        DEEPGATE_DATA_DIR=str(tmp),
        DEEPSEEK_API_KEY="sk-fake-deepseek",
        DEEPSEEK_BASE_URL=fakes.deepseek.url,
        OPENAI_API_KEY="sk-fake-openai",
        OPENAI_BASE_URL=f"{fakes.openai.url}/v1",
        ANTHROPIC_API_KEY="sk-fake-anthropic",
        ANTHROPIC_BASE_URL=fakes.anthropic.url,
        **({"DEEPGATE_REDIS_URL": server.url} if server else {}),
        **(env or {}),
    )
    log = tmp / "stack.log"
    s = OwnStack(
        port, sidecar_port, grpc_port, fakes, tmp, log, environ, server.url if server else None
    )
    procs: list[subprocess.Popen[bytes]] = []

    def alive(url: str) -> bool:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process of the stack exited:\n{log.read_text()}")
        return answers(url)

    try:
        with log.open("wb") as out:
            sidecar = [sys.executable, "-m", "sidecar", "--role", role]
            sidecar += ["--http", f"127.0.0.1:{sidecar_port}", "--grpc", f"127.0.0.1:{grpc_port}"]
            procs.append(subprocess.Popen(sidecar, cwd=ROOT, env=environ, stdout=out, stderr=out))
            wait_until(
                lambda: alive(f"http://127.0.0.1:{sidecar_port}/healthz"), "the sidecar", 180
            )
            if before_gateway is not None:
                before_gateway(s)
            gateway = [sys.executable, "-m", "devgateway", "--config", "apisix-conf/config.yaml"]
            gateway += ["--routes", str(tmp / "apisix.yaml"), "--listen", f"127.0.0.1:{port}"]
            procs.append(subprocess.Popen(gateway, cwd=ROOT, env=environ, stdout=out, stderr=out))
        wait_until(lambda: alive(f"{s.base}/v1/models"), "the gateway")
        yield s
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if server is not None:
            server.stop()
        fakes.close()
