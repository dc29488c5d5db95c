"""End to end: a route with deepgate-rag, driven by the official OpenAI and Anthropic SDKs.

A stack of its own: the sidecar in role ``all`` (its pool embeds for ``deepgate rag ingest`` and
for the runner), the APISIX stand-in serving the shipped routes with deepgate-rag added before
the router (as examples/apisix-rag.yaml says to), and a sqlite-vec store that the installed
``deepgate rag ingest`` fills first. The fake providers show what the model was sent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.e2e.conftest import OwnStack, own_stack, post_req_chains, shipped_routes

KEPT = ("deepgate-router",)
HANDBOOK = """# Travel policy

## Hotels

Employees may book hotels up to 180 euros a night in Berlin and 150 euros elsewhere.

## Trains

Train journeys under six hours are booked in second class; longer ones may be first class.
"""


RagStack = OwnStack


def routes_file(sidecar_port: int) -> dict[str, Any]:
    """The shipped routes at this stack's sidecar, the chat chain cut to rag and the router."""
    routes = shipped_routes(sidecar_port, KEPT)
    rag = {
        "name": "deepgate-rag",
        "value": orjson.dumps(
            {"collection": "travel", "top_k": 2, "min_score": 0.2, "timeout_ms": 10000}
        ).decode(),
    }
    for chain in post_req_chains(routes):
        chain.insert(0, rag)
    return routes


def ingest(stack: RagStack) -> None:
    """`deepgate rag ingest` the handbook through the running sidecar's pool."""
    (stack.tmp / "travel.md").write_text(HANDBOOK)
    done = subprocess.run(
        ["deepgate", "rag", "ingest", "travel", str(stack.tmp / "travel.md")],
        cwd=stack.tmp,
        env=stack.env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"travel.md: 2 chunks" in done.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagStack]:
    tmp = tmp_path_factory.mktemp("rag")
    env = {"DEEPGATE_VECTOR_DSN": f"sqlite://{tmp / 'vectors.db'}"}
    with own_stack(tmp, routes_file, role="all", redis=False, env=env, before_gateway=ingest) as s:
        yield s


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
