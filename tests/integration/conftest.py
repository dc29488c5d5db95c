"""Real runners on real Unix sockets, and the APISIX-side driver to talk to them.

``runner_process`` starts ``python -m plugins.runner`` exactly as APISIX's ext-plugin.cmd does;
``inproc_runner`` serves a registry of test plugins (slow, failing, variable-reading, response
hooks) from the test's own event loop, for behaviour the shipped plugins do not exercise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
from pydantic import Field

from deepgate.errors import RateLimited
from devgateway.driver import RunnerConnection
from plugins import auth_bridge, prompt_filter
from plugins.base import PluginConfig, PluginSpec, RequestContext, ResponseContext
from plugins.registry import build_registry
from plugins.runner import codec
from plugins.runner.server import Runner
from tests.fakes.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: keep them short, not under pytest's tmp_path.
    d = Path(tempfile.mkdtemp(prefix="dg-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class RunnerProcess:
    proc: subprocess.Popen[bytes]
    path: str
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, wait_s: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(wait_s)


def start_runner(sock_dir: Path, expire: str = "3600", name: str = "runner") -> RunnerProcess:
    path = str(sock_dir / f"{name}.sock")
    log_path = sock_dir / f"{name}.log"
    env = dict(os.environ, APISIX_LISTEN_ADDRESS=f"unix:{path}", APISIX_CONF_EXPIRE_TIME=expire)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "plugins.runner"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while not _accepts(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"runner did not start: {log_path.read_text()}")
        time.sleep(0.02)
    return RunnerProcess(proc, path, log_path)


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


@pytest.fixture
def runner_process(sock_dir: Path) -> Iterator[RunnerProcess]:
    rp = start_runner(sock_dir)
    yield rp
    if rp.proc.poll() is None:
        rp.proc.kill()
        rp.proc.wait()


# --- test plugins -----------------------------------------------------------------------------


class SlowConfig(PluginConfig):
    delay_ms: int = 0


async def slow(ctx: RequestContext, conf: SlowConfig) -> codec.Stop | None:
    await asyncio.sleep(conf.delay_ms / 1000)
    ctx.set_header("x-slept-ms", str(conf.delay_ms))
    return None


class BoomConfig(PluginConfig):
    pass


async def boom(ctx: RequestContext, conf: BoomConfig) -> codec.Stop | None:
    raise RuntimeError("plugin bug")


async def boom_response(ctx: ResponseContext, conf: BoomConfig) -> None:
    raise RuntimeError("hook bug")


class VarsConfig(PluginConfig):
    names: list[str] = Field(default_factory=list)


async def read_vars(ctx: RequestContext, conf: VarsConfig) -> codec.Stop | None:
    for name in conf.names:
        value = await ctx.var(name)
        await ctx.var(name)  # asked twice by the plugin, once on the wire
        ctx.set_header(f"x-var-{name}", value)
    ctx.add_response_header("x-seen", "yes")
    return None


class ReadBodyConfig(PluginConfig):
    pass


async def read_body(ctx: RequestContext, conf: ReadBodyConfig) -> codec.Stop | None:
    body = await ctx.json()
    ctx.set_header("x-model", body.get("model"))
    return None


class StopConfig(PluginConfig):
    status: int = 200
    text: str = "cached"


async def stop_now(ctx: RequestContext, conf: StopConfig) -> codec.Stop | None:
    return codec.Stop(status=conf.status, headers=[("x-by", "stop")], body=conf.text.encode())


class DeferConfig(PluginConfig):
    delay_ms: int = 0
    outcome: Literal["pass", "refuse", "crash"] = "pass"


async def defer_check(ctx: RequestContext, conf: DeferConfig) -> codec.Stop | None:
    async def check() -> None:
        await asyncio.sleep(conf.delay_ms / 1000)
        # what later plugins had done by the time the check finished
        later = ",".join(name for name, _ in ctx.rewrite_headers) or "-"
        ctx.add_response_header("x-checked-after", later)
        if conf.outcome == "refuse":
            raise RateLimited("Rate limit reached (deferred check).", retry_after=3)
        if conf.outcome == "crash":
            raise RuntimeError("check bug")

    ctx.defer(check())
    return None


class UpperConfig(PluginConfig):
    pass


async def upper_response(ctx: ResponseContext, conf: UpperConfig) -> None:
    ctx.new_body = (await ctx.body()).upper()
    ctx.new_headers = [("x-upper", "1")]


TEST_REGISTRY = build_registry(
    [
        auth_bridge.SPEC,
        prompt_filter.SPEC,
        PluginSpec("test-slow", SlowConfig, on_request=slow),
        PluginSpec("test-boom", BoomConfig, on_request=boom, on_response=boom_response),
        PluginSpec("test-vars", VarsConfig, on_request=read_vars),
        PluginSpec(
            "test-prefetch",
            VarsConfig,
            on_request=read_vars,
            wants_vars=("consumer_name", "remote_addr"),
            wants_body=True,
        ),
        PluginSpec("test-read-body", ReadBodyConfig, on_request=read_body),
        PluginSpec("test-stop", StopConfig, on_request=stop_now),
        PluginSpec("test-defer", DeferConfig, on_request=defer_check),
        PluginSpec("test-upper", UpperConfig, on_response=upper_response),
    ]
)


@pytest.fixture
async def inproc_runner(sock_dir: Path) -> AsyncIterator[str]:
    runner = Runner(TEST_REGISTRY, conf_expire_s=3600)
    path = str(sock_dir / "inproc.sock")
    await runner.start(path)
    yield path
    await runner.stop(grace_s=0.5)


# --- driving helpers --------------------------------------------------------------------------


class Apisix:
    """Answers a call's ExtraInfo questions as APISIX would, and records what was asked."""

    def __init__(self, body: bytes | None = None, **variables: str) -> None:
        self.body = body
        self.variables = variables
        self.asked: list[str] = []

    async def __call__(self, info: codec.ExtraInfo) -> bytes | None:
        if isinstance(info, codec.Var):
            self.asked.append(f"var:{info.name}")
            value = self.variables.get(info.name)
            return None if value is None else value.encode()
        self.asked.append("body" if isinstance(info, codec.ReqBody) else "resp_body")
        return self.body


def chat_body(text: str = "Hello world", **extra: Any) -> bytes:
    return orjson.dumps(
        {"model": "deepseek-chat", "messages": [{"role": "user", "content": text}], **extra}
    )


def call(
    path: str = "/v1/chat/completions", method: int = codec.Method.POST, **kw: Any
) -> codec.HTTPReqCallReq:
    return codec.HTTPReqCallReq(
        id=kw.pop("id", 1), conf_token=kw.pop("token", 0), method=method, path=path, **kw
    )


async def prepare(path: str, conf: list[tuple[str, Any]]) -> int:
    conn = await RunnerConnection.open(path)
    try:
        return await conn.prepare(
            [(n, v if isinstance(v, str) else orjson.dumps(v).decode()) for n, v in conf]
        )
    finally:
        await conn.close()


async def run_call(
    path: str,
    token: int,
    body: bytes | None,
    req: codec.HTTPReqCallReq | None = None,
    **variables: str,
) -> tuple[codec.HTTPReqCallResp, Apisix]:
    apisix = Apisix(body, **variables)
    req = req or call()
    req.conf_token = token
    conn = await RunnerConnection.open(path)
    try:
        return await conn.req_call(req, apisix), apisix
    finally:
        await conn.close()


def stop_json(resp: codec.HTTPReqCallResp) -> tuple[int, dict[str, Any], dict[str, str | None]]:
    assert isinstance(resp.action, codec.Stop), resp.action
    return resp.action.status, orjson.loads(resp.action.body), dict(resp.action.headers)


# --- a sidecar with the real pool ---------------------------------------------------------------


@asynccontextmanager
async def started_pool_sidecar(
    route_key: bytes, hooks: Callable[[Any], list[Any]] = lambda inference: []
) -> AsyncIterator[tuple[Any, FakeOpenAI]]:
    """A role-``all`` sidecar on free ports: the pool's real models in process, a fake DeepSeek
    as its only provider, ``hooks(inference)`` as its answer hooks. Yields (sidecar, deepseek)."""
    from sidecar.answer_hooks import AnswerHooks
    from sidecar.app import Sidecar, build_local_inference, build_providers
    from sidecar.config import load_config
    from sidecar.metrics import Metrics

    deepseek = await FakeOpenAI("deepseek").start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPSEEK_API_KEY", "sk-ds")
        mp.setenv("DEEPSEEK_BASE_URL", deepseek.url)
        config = load_config()
        providers = {k: v for k, v in build_providers(config).items() if k == "deepseek"}
    metrics = Metrics()
    inference = await asyncio.to_thread(build_local_inference, config, metrics)
    sidecar = Sidecar(
        config,
        "all",
        http_address=("127.0.0.1", 0),
        grpc_address="127.0.0.1:0",
        providers=providers,
        route_key=route_key,
        inference=inference,
        metrics=metrics,
        hooks=AnswerHooks(hooks(inference)),
    )
    await sidecar.start()
    try:
        yield sidecar, deepseek
    finally:
        await sidecar.stop()
        await deepseek.stop()
