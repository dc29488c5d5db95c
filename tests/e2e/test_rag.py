"""End to end: a route with deepgate-rag, driven by the official OpenAI and Anthropic SDKs.

A stack of its own: the sidecar in role ``all`` (its pool embeds for ``deepgate rag ingest`` and
for the runner), the APISIX stand-in serving the shipped routes with deepgate-rag added before
the router (as examples/apisix-rag.yaml says to), and a sqlite-vec store that the installed
``deepgate rag ingest`` fills first. The fake providers show what the model was sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import orjson
import pytest
import yaml

from tests.e2e.conftest import KEY, Fakes, answers, free_port

ROOT = Path(__file__).resolve().parents[2]
KEPT = ("deepgate-router",)
HANDBOOK = """# Travel policy

## Hotels

Employees may book hotels up to 180 euros a night in Berlin and 150 euros elsewhere.

## Trains

Train journeys under six hours are booked in second class; longer ones may be first class.
"""


@dataclass
class RagStack:
    port: int
    fakes: Fakes
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0, timeout=60)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.base, api_key=KEY, max_retries=0, timeout=60)


def routes_file(path: Path, sidecar_port: int) -> None:
    """The shipped routes at this stack's sidecar, the chat chain cut to rag and the router."""
    routes = yaml.safe_load((ROOT / "apisix-conf" / "apisix.yaml").read_text())
    routes["upstreams"][0]["nodes"] = {f"127.0.0.1:{sidecar_port}": 1}
    rag = {
        "name": "deepgate-rag",
        "value": orjson.dumps(
            {"collection": "travel", "top_k": 2, "min_score": 0.2, "timeout_ms": 10000}
        ).decode(),
    }
    for route in routes["routes"]:
        post = route["plugins"].get("ext-plugin-post-req")
        if post is not None:
            post["conf"] = [rag, *(c for c in post["conf"] if c["name"] in KEPT)]
    path.write_text(yaml.safe_dump(routes, sort_keys=False) + "#END\n")


def wait_until(ok: Callable[[], bool], what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 180
    while not ok():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagStack]:
    tmp = tmp_path_factory.mktemp("rag")
    fakes = Fakes()
    sidecar_port, grpc_port, port = free_port(), free_port(), free_port()
    routes_file(tmp / "apisix.yaml", sidecar_port)
    (tmp / "travel.md").write_text(HANDBOOK)
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_BASE_URL"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DEEPGATE_DEMO_KEY=KEY,
        DEEPGATE_ROUTE_KEY="e2e-rag-route-key",
        DEEPGATE_SIDECAR_GRPC=f"127.0.0.1:{grpc_port}",
        DEEPGATE_VECTOR_DSN=f"sqlite://{tmp / 'vectors.db'}",
        DEEPSEEK_API_KEY="sk-fake-deepseek",
        DEEPSEEK_BASE_URL=fakes.deepseek.url,
        OPENAI_API_KEY="sk-fake-openai",
        OPENAI_BASE_URL=f"{fakes.openai.url}/v1",
        ANTHROPIC_API_KEY="sk-fake-anthropic",
        ANTHROPIC_BASE_URL=fakes.anthropic.url,
    )
    env.pop("DEEPGATE_REDIS_URL", None)
    log = tmp / "stack.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with log.open("wb") as out:
            sidecar = [sys.executable, "-m", "sidecar", "--role", "all"]
            sidecar += ["--http", f"127.0.0.1:{sidecar_port}", "--grpc", f"127.0.0.1:{grpc_port}"]
            procs.append(subprocess.Popen(sidecar, cwd=ROOT, env=env, stdout=out, stderr=out))
            wait_until(
                lambda: answers(f"http://127.0.0.1:{sidecar_port}/healthz"), "the sidecar", procs
            )
            ingest = subprocess.run(
                ["deepgate", "rag", "ingest", "travel", str(tmp / "travel.md")],
                cwd=tmp,
                env=env,
                capture_output=True,
                timeout=120,
                check=False,
            )
            assert ingest.returncode == 0, ingest.stderr.decode()
            assert b"travel.md: 2 chunks" in ingest.stdout
            gateway = [sys.executable, "-m", "devgateway", "--config", "apisix-conf/config.yaml"]
            gateway += ["--routes", str(tmp / "apisix.yaml"), "--listen", f"127.0.0.1:{port}"]
            procs.append(subprocess.Popen(gateway, cwd=ROOT, env=env, stdout=out, stderr=out))
        s = RagStack(port, fakes, log)
        wait_until(lambda: answers(f"{s.base}/v1/models"), "the gateway", procs)
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
        fakes.close()


def test_openai_answer_is_grounded_with_citations(stack: RagStack) -> None:
    with stack.openai() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": "How much may I spend on a hotel in Berlin?"}],
        )
    assert raw.headers["x-deepgate-rag"] == "hit"
    assert raw.parse().choices[0].message.content
    sent = stack.fakes.deepseek.received[-1].body
    system = sent["messages"][0]
    assert system["role"] == "system"
    assert "[1] travel.md — Travel policy > Hotels\n" in system["content"]
    assert "180 euros a night in Berlin" in system["content"]
    assert sent["messages"][-1]["content"] == "How much may I spend on a hotel in Berlin?"


def test_streamed_answer_is_grounded_too(stack: RagStack) -> None:
    with stack.openai() as client:
        stream = client.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": "Which class do I book for a long train trip?"}],
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    context = stack.fakes.deepseek.received[-1].body["messages"][0]["content"]
    assert context.index("Travel policy > Trains") < context.find("Travel policy > Hotels") or (
        "Travel policy > Hotels" not in context
    )
    assert "first class" in context


def test_anthropic_answer_is_grounded_in_system(stack: RagStack) -> None:
    with stack.anthropic() as client:
        message = client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=64,
            system="Answer in one sentence.",
            messages=[{"role": "user", "content": "What is the hotel limit outside Berlin?"}],
        )
    assert message.content
    system = stack.fakes.anthropic.received[-1].body["system"]
    text = system if isinstance(system, str) else " ".join(b["text"] for b in system)
    assert text.startswith("Answer in one sentence.")
    assert "[1] travel.md — Travel policy > Hotels" in text
    assert "150 euros elsewhere" in text
