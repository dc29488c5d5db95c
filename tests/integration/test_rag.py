"""RAG end to end on real parts: ``deepgate rag ingest`` and ``query`` (the installed command)
embedding through a real sidecar's pool over gRPC into sqlite-vec; the real runner serving
``deepgate-rag``; the rewritten request sent on to the sidecar, whose fake DeepSeek (official
OpenAI SDK on our side) receives the ingested text as a numbered, cited system message."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import pytest_asyncio

from deepgate import response_cache as rc
from deepgate.request_facts import HEADER as FACTS_HEADER
from deepgate.request_facts import unseal
from deepgate.route_signature import HEADER as ROUTE_HEADER
from deepgate.route_signature import sign_route
from plugins.registry import REGISTRY
from plugins.runner import codec
from plugins.runner.server import Runner
from plugins.sidecar_link import LINK
from sidecar.app import Sidecar
from tests.fakes.openai_server import FakeOpenAI
from tests.integration.conftest import call, prepare, run_call, started_pool_sidecar, stop_json

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = b"rag-route-key"
DEEPGATE = str(Path(sys.executable).parent / "deepgate")

HANDBOOK = """# Gateway handbook

## Key rotation

Provider keys are rotated with `deepgate secrets rotate --new-value`, which reads the new key
from standard input. The old key stays valid for fifteen minutes so requests in flight finish.

## Opening hours

The support desk answers tickets from 08:00 to 18:00 Central European Time, Monday to Friday.
"""

NOTES = "The staging gateway listens on port 9443 and uses the sandbox provider accounts.\n"


async def deepgate_cli(*args: str) -> tuple[int, str, str]:
    """The installed ``deepgate`` command, without blocking the loop that serves the sidecar."""
    proc = await asyncio.create_subprocess_exec(
        DEEPGATE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


class Rag:
    def __init__(self, sidecar: Sidecar, deepseek: FakeOpenAI, dsn: str, docs: Path) -> None:
        self.sidecar, self.deepseek, self.dsn, self.docs = sidecar, deepseek, dsn, docs
        self.grpc = f"127.0.0.1:{sidecar.grpc_port}"
        self.sock = ""
        self.calls = 0

    async def cli(self, *args: str) -> tuple[int, str, str]:
        return await deepgate_cli("rag", *args, "--dsn", self.dsn, "--sidecar", self.grpc)

    async def conf(self, **conf: Any) -> int:
        return await prepare(self.sock, [("deepgate-rag", {"store": self.dsn, **conf})])

    async def chain(
        self,
        token: int,
        body: dict[str, Any],
        path: str = "/v1/chat/completions",
        headers: list[tuple[str, str | None]] | None = None,
    ) -> codec.HTTPReqCallResp:
        self.calls += 1
        req = call(path=path, headers=[("x-request-id", f"rag-{self.calls}"), *(headers or [])])
        resp, _ = await run_call(self.sock, token, orjson.dumps(body), req, route_id="chat")
        return resp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rag(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rag]:
    async with started_pool_sidecar(KEY) as (sidecar, deepseek):
        tmp = tmp_path_factory.mktemp("rag")
        docs = tmp / "docs"
        docs.mkdir()
        (docs / "handbook.md").write_text(HANDBOOK)
        (docs / "staging.txt").write_text(NOTES)
        yield Rag(sidecar, deepseek, f"sqlite://{tmp / 'vectors.db'}", docs)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ingested(rag: Rag) -> Rag:
    code, out, err = await rag.cli("ingest", "handbook", str(rag.docs))
    assert code == 0, err
    assert "handbook: 3 chunks from 2 files" in out
    return rag


@pytest_asyncio.fixture(loop_scope="module")
async def served(
    ingested: Rag, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rag]:
    monkeypatch.setenv("DEEPGATE_ROUTE_KEY", KEY.decode())
    monkeypatch.setattr(LINK, "address", ingested.grpc)
    await LINK.close()
    runner = Runner(REGISTRY, conf_expire_s=3600)
    ingested.sock = str(sock_dir / "rag.sock")
    await runner.start(ingested.sock)
    yield ingested
    await runner.stop(grace_s=0.5)
    await LINK.close()
    await rc.close_stores()


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": text}], **extra}


async def test_query_shows_ranked_chunks_with_sources(ingested: Rag) -> None:
    code, out, err = await ingested.cli("query", "handbook", "how do I rotate a provider key?")
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("[1] ")
    assert first.endswith("handbook.md — Gateway handbook > Key rotation")
    assert "deepgate secrets rotate --new-value" in out.split("[2]")[0]
    code, out, _ = await ingested.cli(
        "query", "handbook", "which port does staging use?", "-k", "1"
    )
    assert code == 0
    assert out.splitlines()[0].endswith("staging.txt")
    assert "port 9443" in out
    assert "[2]" not in out


async def test_reingesting_a_file_replaces_its_chunks(rag: Rag, tmp_path: Path) -> None:
    doc = tmp_path / "faq.md"
    doc.write_text("# FAQ\n\n" + "\n\n".join(f"## Q{i}\n\nAnswer number {i}." for i in range(5)))
    code, out, err = await rag.cli("ingest", "faq", str(doc))
    assert code == 0, err
    assert ": 5 chunks" in out
    doc.write_text("# FAQ\n\n## Refunds\n\nRefunds take ten working days.\n")
    code, out, err = await rag.cli("ingest", "faq", str(doc))
    assert code == 0, err
    assert ": 1 chunks, 4 stale removed" in out
    code, out, _ = await rag.cli("query", "faq", "answer number three", "--json", "-k", "10")
    records = [orjson.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in records] == ["Refunds take ten working days."]
    assert records[0]["metadata"]["heading"] == "FAQ > Refunds"
    assert records[0]["metadata"]["chunk"] == 0
    code, out, _ = await deepgate_cli("rag", "list", "--dsn", rag.dsn)
    assert "faq\t384 dimensions\t1 chunks" in out


async def test_cli_errors_say_what_to_do(rag: Rag) -> None:
    code, _, err = await rag.cli("query", "nothing_here", "hello")
    assert code == 1
    assert "collection 'nothing_here' does not exist" in err
    assert "deepgate rag ingest nothing_here" in err
    code, _, err = await deepgate_cli(
        "rag",
        "query",
        "handbook",
        "x",
        "--dsn",
        rag.dsn,
        "--sidecar",
        "127.0.0.1:1",
        "--timeout",
        "5",
    )
    assert code == 1
    assert "is the sidecar running" in err
    assert "--local" in err


async def test_answer_cites_ingested_text(served: Rag) -> None:
    token = await served.conf(collection="handbook", top_k=2, min_score=0.2)
    body = ask("How are provider keys rotated?")
    resp = await served.chain(token, body)
    action = resp.action
    assert isinstance(action, codec.Rewrite)
    assert dict(action.resp_headers)["x-deepgate-rag"] == "hit"
    sent = orjson.loads(action.body)
    system = sent["messages"][0]
    assert system["role"] == "system"
    assert "[1] " in system["content"]
    assert (
        "handbook.md — Gateway handbook > Key rotation\nProvider keys are rotated"
        in (system["content"])
    )
    assert sent["messages"][1] == body["messages"][0]

    facts = unseal(KEY, "rag-1", str(dict(action.headers)[FACTS_HEADER]))
    assert facts["rag"]["collection"] == "handbook"
    assert len(facts["rag"]["chunks"]) >= 1
    assert facts["rag"]["sources"][0].endswith("handbook.md")

    # on to the sidecar, as APISIX forwards the rewritten request
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{served.sidecar.http_port}/v1", api_key="x", max_retries=0
    ) as client:
        await client.chat.completions.create(
            extra_headers={
                "x-request-id": "rag-1",
                ROUTE_HEADER: sign_route(KEY, "rag-1", ["deepseek:deepseek-chat"]),
                FACTS_HEADER: str(dict(action.headers)[FACTS_HEADER]),
            },
            **sent,
        )
    received = served.deepseek.received[-1].body
    assert received["messages"][0]["role"] == "system"
    assert "[1] " in received["messages"][0]["content"]
    assert "deepgate secrets rotate --new-value" in received["messages"][0]["content"]


async def test_anthropic_system_gets_the_context(served: Rag) -> None:
    token = await served.conf(collection="handbook", top_k=1, min_score=0.2)
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "When is the support desk open?"}],
    }
    resp = await served.chain(token, body, path="/v1/messages")
    assert isinstance(resp.action, codec.Rewrite)
    sent = orjson.loads(resp.action.body)
    assert sent["system"].startswith("Be brief.\n\n")
    assert "[1] " in sent["system"]
    assert "08:00 to 18:00" in sent["system"]
    assert sent["messages"] == body["messages"]


async def test_budget_and_min_score_limit_the_context(served: Rag) -> None:
    # a budget that only fits the instructions and one chunk
    token = await served.conf(collection="handbook", top_k=3, min_score=-1, max_context_tokens=120)
    resp = await served.chain(token, ask("How are provider keys rotated?"))
    assert isinstance(resp.action, codec.Rewrite)
    context = orjson.loads(resp.action.body)["messages"][0]["content"]
    assert "[1] " in context
    assert "[2] " not in context
    # nothing close enough: the request goes on untouched
    token = await served.conf(collection="handbook", min_score=0.95)
    resp = await served.chain(token, ask("Tell me a joke about penguins."))
    assert isinstance(resp.action, codec.Rewrite)
    assert dict(resp.action.resp_headers)["x-deepgate-rag"] == "miss"
    assert not resp.action.body


async def test_request_may_pick_only_an_allowed_collection(served: Rag) -> None:
    token = await served.conf(collection="faq", allowed_collections=["handbook"], min_score=0.2)
    header = [("x-deepgate-rag-collection", "handbook")]
    resp = await served.chain(token, ask("How are provider keys rotated?"), headers=header)
    assert isinstance(resp.action, codec.Rewrite)
    assert "deepgate secrets rotate" in orjson.loads(resp.action.body)["messages"][0]["content"]
    assert ("x-deepgate-rag-collection", None) in resp.action.headers  # not for the provider

    token = await served.conf(collection="handbook")
    header = [("x-deepgate-rag-collection", "secret_plans")]
    status, error, _ = stop_json(await served.chain(token, ask("hi"), headers=header))
    assert status == 403
    assert error["error"]["code"] == "rag_collection_not_allowed"
    assert "Use one of: handbook" in error["error"]["message"]


async def test_store_failure_follows_on_error(served: Rag) -> None:
    token = await served.conf(collection="never_ingested")
    resp = await served.chain(token, ask("How are provider keys rotated?"))
    assert isinstance(resp.action, codec.Rewrite)
    assert dict(resp.action.resp_headers)["x-deepgate-rag"] == "error"
    assert not resp.action.body  # the request goes on untouched

    token = await served.conf(collection="never_ingested", on_error="closed")
    status, error, _ = stop_json(await served.chain(token, ask("How are keys rotated?")))
    assert status == 503
    assert error["error"]["code"] == "rag_unavailable"
    assert "deepgate rag list" in error["error"]["message"]


async def test_store_may_be_a_secret_reference(
    served: Rag, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAG_TEST_VECTOR_DSN", served.dsn)
    token = await prepare(
        served.sock,
        [("deepgate-rag", {"collection": "handbook", "store": "$env://RAG_TEST_VECTOR_DSN"})],
    )
    resp = await served.chain(token, ask("How are provider keys rotated?"))
    assert isinstance(resp.action, codec.Rewrite)
    assert dict(resp.action.resp_headers)["x-deepgate-rag"] == "hit"
