"""End to end: deepgate-router with the shipped aliases, through the official SDKs.

A stack of its own: a real Redis, the sidecar (gateway role, fake providers) and the APISIX
stand-in serving the shipped routes with the chat routes' post-req chain cut down to
deepgate-policy and deepgate-router (both as shipped), plus a consumer ``resident`` whose policy
keeps its prompts in the ``us`` region.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
import yaml

from deepgate.embedded_redis import EmbeddedRedis
from tests.e2e.conftest import KEY, Fakes, answers, free_port

ROOT = Path(__file__).resolve().parents[2]
RESIDENT_KEY = "sk-e2e-resident-key-8910"
HI = [{"role": "user", "content": "What is the capital of France?"}]
KEPT = ("deepgate-policy", "deepgate-router")
AUTO = {"deepseek:deepseek-chat", "openai:gpt-5-mini", "anthropic:claude-haiku-4-5"}


@dataclass
class RouterStack:
    port: int
    fakes: Fakes
    log: Path

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=30
        )

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=f"http://127.0.0.1:{self.port}", api_key=KEY, max_retries=0, timeout=30
        )


def routes_file(path: Path, sidecar_port: int) -> None:
    routes = yaml.safe_load((ROOT / "apisix-conf" / "apisix.yaml").read_text())
    routes["upstreams"][0]["nodes"] = {f"127.0.0.1:{sidecar_port}": 1}
    routes["consumers"].append(
        {"username": "resident", "plugins": {"key-auth": {"key": RESIDENT_KEY}}}
    )
    for route in routes["routes"]:
        post = route["plugins"].get("ext-plugin-post-req")
        if post is None:
            continue
        post["conf"] = [c for c in post["conf"] if c["name"] in KEPT]
        for conf in post["conf"]:
            if conf["name"] == "deepgate-policy":
                value = orjson.loads(conf["value"])
                value["consumers"]["resident"] = {"regions": ["us"]}
                conf["value"] = orjson.dumps(value).decode()
    path.write_text(yaml.safe_dump(routes, sort_keys=False) + "#END\n")


def wait_until(ok: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterStack]:
    tmp = tmp_path_factory.mktemp("router")
    fakes = Fakes()
    server = EmbeddedRedis().start()
    sidecar_port, grpc_port, port = free_port(), free_port(), free_port()
    routes_file(tmp / "apisix.yaml", sidecar_port)
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DEEPGATE_DEMO_KEY=KEY,
        DEEPGATE_REDIS_URL=server.url,
        DEEPGATE_SIDECAR_GRPC=f"127.0.0.1:{grpc_port}",
        DEEPGATE_ROUTE_KEY="e2e-router-route-key",
        DEEPSEEK_API_KEY="sk-fake-deepseek",
        DEEPSEEK_BASE_URL=fakes.deepseek.url,
        OPENAI_API_KEY="sk-fake-openai",
        OPENAI_BASE_URL=f"{fakes.openai.url}/v1",
        ANTHROPIC_API_KEY="sk-fake-anthropic",
        ANTHROPIC_BASE_URL=fakes.anthropic.url,
    )
    log = tmp / "stack.log"
    procs: list[subprocess.Popen[bytes]] = []
    with log.open("wb") as out:
        sidecar = [sys.executable, "-m", "sidecar", "--role", "gateway"]
        sidecar += ["--http", f"127.0.0.1:{sidecar_port}", "--grpc", f"127.0.0.1:{grpc_port}"]
        procs.append(subprocess.Popen(sidecar, cwd=ROOT, env=env, stdout=out, stderr=out))
        gateway = [sys.executable, "-m", "devgateway", "--config", "apisix-conf/config.yaml"]
        gateway += ["--routes", str(tmp / "apisix.yaml"), "--listen", f"127.0.0.1:{port}"]
        procs.append(subprocess.Popen(gateway, cwd=ROOT, env=env, stdout=out, stderr=out))
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{sidecar_port}/healthz"), "the sidecar")
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/v1/models"), "the gateway")
        yield RouterStack(port, fakes, log)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        server.stop()
        fakes.close()


@pytest.fixture(autouse=True)
def _reset(stack: RouterStack) -> Iterator[None]:
    yield
    stack.fakes.reset()


def test_auto_is_routed_and_the_answer_names_its_target(stack: RouterStack) -> None:
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(model="auto", messages=HI)  # type: ignore[arg-type]
        listed = {m.id for m in oa.models.list()}
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-deepgate-route"] in AUTO
    assert {"auto", "fast", "cheap"} <= listed


def test_auto_through_the_anthropic_sdk(stack: RouterStack) -> None:
    with stack.anthropic() as an:
        raw = an.messages.with_raw_response.create(model="auto", max_tokens=64, messages=HI)  # type: ignore[arg-type]
    assert raw.parse().content
    assert raw.headers["x-deepgate-route"] in AUTO


def test_cheap_picks_the_cheapest_target_for_the_request(stack: RouterStack) -> None:
    long_prompt = [{"role": "user", "content": "Summarise: " + "the quick brown fox " * 1500}]
    with stack.openai() as oa:
        short = oa.chat.completions.with_raw_response.create(
            model="cheap",
            messages=HI,  # type: ignore[arg-type]
            max_tokens=2000,
        )
        long = oa.chat.completions.with_raw_response.create(
            model="cheap",
            messages=long_prompt,  # type: ignore[arg-type]
            max_tokens=1,
        )
    # a short prompt and a long answer: DeepSeek's output price is the lowest
    assert short.headers["x-deepgate-route"] == "deepseek:deepseek-chat"
    # a long prompt and a one-token answer: gpt-5-mini's input price is the lowest
    assert long.headers["x-deepgate-route"] == "openai:gpt-5-mini"


def test_fallback_along_the_routed_chain(stack: RouterStack) -> None:
    stack.fakes.deepseek.behave(status=500)
    with stack.openai() as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-deepgate-route"] == "openai:gpt-5-mini"


def test_a_region_constraint_is_honoured(stack: RouterStack) -> None:
    seen = len(stack.fakes.deepseek.received)
    with stack.openai(RESIDENT_KEY) as oa:
        raw = oa.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)  # type: ignore[arg-type]
        assert raw.headers["x-deepgate-route"] == "openai:gpt-5-mini"  # DeepSeek runs in cn
        with pytest.raises(openai.PermissionDeniedError) as denied:
            oa.chat.completions.create(model="local", messages=HI)  # type: ignore[arg-type]
    assert len(stack.fakes.deepseek.received) == seen  # never sent to the cn provider
    assert "region" in str(denied.value)


def test_unknown_model_is_openais_404(stack: RouterStack) -> None:
    with stack.openai() as oa, pytest.raises(openai.NotFoundError) as info:
        oa.chat.completions.create(model="no-such-model", messages=HI)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"
