"""deepgate-router as APISIX meets it, and what the sidecar makes of its decision.

The runner serves the router over the real socket protocol; a gateway-role sidecar (HTTP and
gRPC on port 0) with fake DeepSeek, OpenAI and Anthropic servers verifies the signed route and
answers; its ProviderStats feed the least-latency strategy through the runner's sidecar link.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from deepgate.route_signature import sign_route
from devgateway.driver import RunnerError
from plugins import policy, router, safety
from plugins.registry import build_registry
from plugins.router import latency
from plugins.router.latency import LatencyBoard
from plugins.runner import codec
from plugins.runner.server import Runner
from plugins.sidecar_link import SidecarLink
from sidecar.app import Sidecar, build_providers
from sidecar.config import load_config
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeOpenAI
from tests.integration.conftest import call, prepare, run_call, stop_json

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "integration-route-key"
ROUTER = "deepgate-router"
DS, OA, AN = "deepseek:deepseek-chat", "openai:gpt-5-mini", "anthropic:claude-haiku-4-5"
CONF: dict[str, Any] = {
    "aliases": {
        "auto": [DS, OA, AN],
        "fast": {"targets": [DS, OA, AN], "strategy": "least_latency"},
        "us-only": [OA, AN],
    },
    "stats": {"refresh_s": 0.05, "timeout_ms": 500},
}


class Fakes:
    def __init__(self) -> None:
        self.deepseek, self.openai = FakeOpenAI("deepseek"), FakeOpenAI("openai")
        self.anthropic = FakeAnthropic()

    def all(self) -> tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]:
        return self.deepseek, self.openai, self.anthropic


@pytest.fixture(scope="module")
def module_env() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fakes(module_env: pytest.MonkeyPatch) -> AsyncIterator[Fakes]:
    f = Fakes()
    for fake in f.all():
        await fake.start()
    for name, value in {
        "DEEPGATE_ROUTE_KEY": KEY,
        "DEEPSEEK_API_KEY": "sk-ds",
        "DEEPSEEK_BASE_URL": f.deepseek.url,
        "OPENAI_API_KEY": "sk-oa",
        "OPENAI_BASE_URL": f"{f.openai.url}/v1",
        "ANTHROPIC_API_KEY": "sk-an",
        "ANTHROPIC_BASE_URL": f.anthropic.url,
    }.items():
        module_env.setenv(name, value)
    yield f
    for fake in f.all():
        await fake.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sidecar(fakes: Fakes) -> AsyncIterator[Sidecar]:
    config = load_config()
    s = Sidecar(
        config,
        "gateway",
        http_address=("127.0.0.1", 0),
        grpc_address="127.0.0.1:0",
        providers=build_providers(config),
        route_key=KEY.encode(),
    )
    await s.start()
    yield s
    await s.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runner(fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    path = str(tmp_path_factory.mktemp("sock") / "router.sock")
    r = Runner(build_registry([router.SPEC]), conf_expire_s=3600)
    await r.start(path)
    yield path
    await r.stop(grace_s=0.5)


@pytest.fixture(autouse=True)
def _fresh(fakes: Fakes) -> Any:
    yield
    for fake in fakes.all():
        fake.behave()


def body(model: str, text: str = "What is the capital of France?") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}]})


async def decide(
    sock: str, raw: bytes, path: str = "/v1/chat/completions"
) -> codec.HTTPReqCallResp:
    token = await prepare(sock, [(ROUTER, CONF)])
    resp, _ = await run_call(sock, token, raw, call(path=path))
    return resp


def upstream_headers(resp: codec.HTTPReqCallResp) -> dict[str, str]:
    assert isinstance(resp.action, codec.Rewrite), resp.action
    return {k: v for k, v in resp.action.headers if v is not None}


def chain(resp: codec.HTTPReqCallResp) -> list[str]:
    return upstream_headers(resp)["x-deepgate-route"].partition(";")[0].split(",")


async def forward(sidecar: Sidecar, headers: dict[str, str], raw: bytes) -> aiohttp.ClientResponse:
    """What APISIX does after the Rewrite: send the request, with the new headers, upstream."""
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"http://127.0.0.1:{sidecar.http_port}/v1/chat/completions",
            data=raw,
            headers={"content-type": "application/json", **headers},
        )
        await resp.read()
        return resp


async def test_the_sidecar_accepts_the_routers_signature(runner: str, sidecar: Sidecar) -> None:
    raw = body("auto")
    resp = await decide(runner, raw)
    assert isinstance(resp.action, codec.Rewrite)
    assert not resp.action.body  # the router never rewrites the body
    headers = upstream_headers(resp)
    assert headers["x-request-id"]  # the id the signature is bound to, for the sidecar
    answer = await forward(sidecar, headers, raw)
    assert answer.status == 200
    assert answer.headers["x-deepgate-route"] == DS


async def test_the_sidecar_falls_back_along_the_signed_chain(
    runner: str, sidecar: Sidecar, fakes: Fakes
) -> None:
    fakes.deepseek.behave(status=500)
    raw = body("auto")
    answer = await forward(sidecar, upstream_headers(await decide(runner, raw)), raw)
    assert answer.status == 200
    assert answer.headers["x-deepgate-route"] == OA


async def test_a_signature_for_another_request_is_refused(runner: str, sidecar: Sidecar) -> None:
    raw = body("us-only")
    headers = upstream_headers(await decide(runner, raw))
    headers["x-request-id"] = "someone-else"
    answer = await forward(sidecar, headers, raw)
    assert answer.status == 401


async def test_unknown_model_is_404_in_each_dialect(runner: str) -> None:
    status, err, _ = stop_json(await decide(runner, body("gpt-9000")))
    assert status == 404
    assert (err["error"]["code"], err["error"]["param"]) == ("model_not_found", "model")
    raw = orjson.dumps(
        {"model": "gpt-9000", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    status, err, _ = stop_json(await decide(runner, raw, path="/v1/messages"))
    assert (status, err["type"], err["error"]["type"]) == (404, "error", "not_found_error")


async def test_a_bad_config_fails_at_prepare_conf_naming_the_field(runner: str) -> None:
    with pytest.raises(RunnerError):
        await prepare(runner, [(ROUTER, {"aliases": {"a": {"targets": ["x:y"], "strategy": "?"}}})])


async def test_least_latency_follows_the_sidecars_provider_stats(
    runner: str, sidecar: Sidecar, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = SidecarLink(f"127.0.0.1:{sidecar.grpc_port}")
    monkeypatch.setattr(latency, "LINK", link)
    monkeypatch.setattr(router, "BOARD", LatencyBoard())
    try:
        # the first request never waits for numbers: the configured order
        assert chain(await decide(runner, body("fast"))) == [DS, OA, AN]
        # real calls through the sidecar give it latencies: DeepSeek slow, OpenAI quick
        fakes.deepseek.behave(first_byte_delay_s=0.4)
        for i, only in enumerate((DS, OA)):
            rid = f"warm-{i}"
            signed = sign_route(KEY.encode(), rid, [only])
            raw = body("auto")
            answer = await forward(sidecar, {"x-request-id": rid, "x-deepgate-route": signed}, raw)
            assert answer.headers["x-deepgate-route"] == only
        for _ in range(100):
            order = chain(await decide(runner, body("fast")))
            if order[0] == OA:
                break
            await asyncio.sleep(0.05)
        assert order == [OA, DS, AN]  # anthropic was never called: after the measured ones
    finally:
        await router.BOARD.close()
        await link.close()


async def test_stats_unavailable_keep_the_configured_order(
    runner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    link = SidecarLink("127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(latency, "LINK", link)
    monkeypatch.setattr(router, "BOARD", LatencyBoard())
    try:
        for _ in range(5):
            assert chain(await decide(runner, body("fast"))) == [DS, OA, AN]
            await asyncio.sleep(0.06)
    finally:
        await router.BOARD.close()
        await link.close()


# --- with the real policy and safety plugins before it ----------------------------------------

POLICY = {
    "store": "memory",
    "consumers": {
        "pat": {"personal_data": "local"},
        "ria": {"personal_data": "refuse"},
        "uma": {"regions": ["us"]},
    },
}
SAFETY = {"injection": {"action": "block"}, "personal_data": {"action": "mask"}}
SHIPPED_LIKE = {
    "aliases": {
        "auto": [DS, OA, AN, "local:smollm2-135m-instruct"],
        "cheap": [DS, OA, AN],
        "local": ["local:smollm2-135m-instruct"],
    },
    "personal_data_alias": "local",
}
WITH_EMAIL = "Write to jane.doe@example.com about the meeting on Friday."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chain_runner(
    fakes: Fakes, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    path = str(tmp_path_factory.mktemp("sock") / "chain.sock")
    r = Runner(build_registry([policy.SPEC, safety.SPEC, router.SPEC]), conf_expire_s=3600)
    await r.start(path)
    yield path
    await r.stop(grace_s=0.5)


async def chain_decision(sock: str, consumer: str, text: str) -> codec.HTTPReqCallResp:
    token = await prepare(
        sock,
        [("deepgate-policy", POLICY), ("deepgate-safety", SAFETY), (ROUTER, SHIPPED_LIKE)],
    )
    resp, apisix = await run_call(sock, token, body(model_for(text), text), consumer_name=consumer)
    assert apisix.asked.count("body") == 1  # one body for the whole chain
    return resp


def model_for(text: str) -> str:
    return "cheap" if text.startswith("cheap:") else "auto"


async def test_the_policys_rules_and_the_safety_findings_steer_the_route(
    chain_runner: str,
) -> None:
    plain = "What is the capital of France?"
    assert chain(await chain_decision(chain_runner, "pat", plain)) == [
        *SHIPPED_LIKE["aliases"]["auto"]
    ]
    # personal data under "local": only the local model, even for an alias without one
    assert chain(await chain_decision(chain_runner, "pat", WITH_EMAIL)) == [
        "local:smollm2-135m-instruct"
    ]
    assert chain(await chain_decision(chain_runner, "pat", "cheap: " + WITH_EMAIL)) == [
        "local:smollm2-135m-instruct"
    ]
    # residency: DeepSeek (cn) and the local model are not in "us"
    assert chain(await chain_decision(chain_runner, "uma", plain)) == [OA, AN]
    # personal data under "refuse": 403 naming the rule, never the data
    status, err, _ = stop_json(await chain_decision(chain_runner, "ria", WITH_EMAIL))
    assert status == 403
    assert "'refuse'" in err["error"]["message"]
    assert "jane" not in err["error"]["message"]
