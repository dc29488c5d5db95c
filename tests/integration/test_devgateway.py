"""The APISIX stand-in: what it refuses, how it routes, authenticates, rewrites and proxies.

Each test writes its own config.yaml / apisix.yaml, serves them from an in-process gateway, and
talks to it over HTTP. Ext-plugin phases go to a real runner over its socket (the in-process test
runner, reached through ``ext-plugin.path_for_test``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml
from aiohttp import web

from deepgate.config import ConfigError
from devgateway.conf import load
from devgateway.gateway import Gateway

Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """An upstream that echoes what it received; ``/slow`` streams two chunks 0.6 s apart."""
    seen: list[dict[str, Any]] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
        if request.path == "/slow":
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: one\n\n")
            await asyncio.sleep(0.6)
            await resp.write(b"data: two\n\n")
            await resp.write_eof()
            return resp
        if request.path == "/unauthorized":
            return web.json_response({"upstream": "says no"}, status=401)
        return web.json_response({"path": request.path_qs, "body": body.decode()})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, seen
    await runner.cleanup()


CONFIG = {
    "apisix": {"node_listen": 9080, "enable_admin": False},
    "deployment": {"role": "data_plane", "role_data_plane": {"config_provider": "yaml"}},
    "plugins": [
        "client-control",
        "key-auth",
        "response-rewrite",
        "ext-plugin-pre-req",
        "ext-plugin-post-req",
        "ext-plugin-post-resp",
    ],
}


def write(
    tmp_path: Path, routes: dict[str, Any], config: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    cfile, rfile = tmp_path / "config.yaml", tmp_path / "apisix.yaml"
    cfile.write_text(yaml.safe_dump(config or CONFIG))
    rfile.write_text(yaml.safe_dump(routes) + "#END\n")
    return cfile, rfile


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(routes: dict[str, Any], runner_socket: str | None = None) -> str:
        config = dict(CONFIG)
        if runner_socket:
            config["ext-plugin"] = {"path_for_test": runner_socket}
        conf = load(*write(tmp_path, routes, config))
        gateway = Gateway(conf, runner_socket or "/nonexistent/runner.sock")
        await gateway.start()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", gateway.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        cleanups.extend([runner.cleanup, gateway.stop])
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    yield start
    for cleanup in cleanups:
        await cleanup()


def route(port: int, **kw: Any) -> dict[str, Any]:
    return {"uri": "/x", "upstream": {"nodes": {f"127.0.0.1:{port}": 1}}, **kw}


# --- what it refuses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routes", "config", "expected"),
    [
        (
            {"routes": [{"uri": "/x", "plugins": {"limit-count": {}}}]},
            None,
            "routes[0].plugins.limit-count",
        ),
        (
            {"routes": [{"uri": "/x", "plugins": {"key-auth": {"realm": "x"}}}]},
            None,
            "routes[0].plugins.key-auth.realm",
        ),
        ({"routes": [], "ssls": []}, None, "(top).ssls"),
        ({"routes": [{"uri": "/x", "timeout": {}}]}, None, "routes[0].timeout"),
        ({"routes": []}, {**CONFIG, "plugins": ["key-auth", "limit-req"]}, "plugins[1]"),
        (
            {"routes": [{"uri": "/x", "plugins": {"response-rewrite": {}}}]},
            {**CONFIG, "plugins": ["key-auth"]},
            "routes[0].plugins.response-rewrite",
        ),
        (
            {
                "consumers": [
                    {
                        "username": "a",
                        "plugins": {"key-auth": {"key": "$env://NOT_SET_ANYWHERE_42"}},
                    }
                ]
            },
            None,
            "NOT_SET_ANYWHERE_42",
        ),
    ],
)
def test_unsupported_config_stops_start_up_naming_file_and_path(
    tmp_path: Path, routes: dict[str, Any], config: dict[str, Any] | None, expected: str
) -> None:
    cfile, rfile = write(tmp_path, routes, config)
    with pytest.raises(ConfigError) as err:
        load(cfile, rfile)
    assert expected in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_a_routes_file_without_end_marker_is_refused(tmp_path: Path) -> None:
    cfile, rfile = write(tmp_path, {"routes": []})
    rfile.write_text("routes: []\n")
    with pytest.raises(ConfigError, match="#END"):
        load(cfile, rfile)


def test_the_shipped_files_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGATE_DEMO_KEY", "k")
    root = Path(__file__).resolve().parents[2] / "apisix-conf"
    conf = load(root / "config.yaml", root / "apisix.yaml")
    assert {r.id for r in conf.routes} == {
        "chat-completions",
        "anthropic-messages",
        "embeddings",
        "models",
    }
    assert conf.runner_cmd == ["deepgate-runner"]
    assert conf.consumers == {"k": "demo"}


# --- routing ----------------------------------------------------------------------------------


async def test_route_precedence_methods_and_hosts(
    serve: Serve, upstream: tuple[int, list[Any]]
) -> None:
    port, _ = upstream
    node = {"nodes": {f"127.0.0.1:{port}": 1}}
    url = await serve(
        {
            "routes": [
                {
                    "id": "prefix",
                    "uri": "/v1/*",
                    "upstream": node,
                    "plugins": {"response-rewrite": {"headers": {"set": {"x-route": "prefix"}}}},
                },
                {
                    "id": "exact",
                    "uri": "/v1/models",
                    "methods": ["GET"],
                    "upstream": node,
                    "plugins": {"response-rewrite": {"headers": {"set": {"x-route": "exact"}}}},
                },
                {"id": "hosted", "uri": "/h", "hosts": ["api.example.com"], "upstream": node},
                {
                    "id": "low",
                    "uri": "/p/*",
                    "priority": 0,
                    "upstream": node,
                    "plugins": {"response-rewrite": {"headers": {"set": {"x-route": "low"}}}},
                },
                {
                    "id": "high",
                    "uri": "/p/*",
                    "priority": 10,
                    "upstream": node,
                    "plugins": {"response-rewrite": {"headers": {"set": {"x-route": "high"}}}},
                },
            ]
        }
    )
    async with httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/v1/models")).headers["x-route"] == "exact"
        assert (await c.post("/v1/models")).headers["x-route"] == "prefix"  # exact is GET only
        assert (await c.get("/v1/chat")).headers["x-route"] == "prefix"
        assert (await c.get("/p/q")).headers["x-route"] == "high"
        assert (await c.get("/h")).status_code == 404
        assert (await c.get("/h", headers={"host": "api.example.com"})).status_code == 200
        missing = await c.get("/nowhere")
        assert missing.status_code == 404
        assert missing.json() == {"error_msg": "404 Route Not Found"}


# --- key-auth, response-rewrite, client-control -----------------------------------------------


async def test_key_auth_header_and_query_with_hidden_credentials(
    serve: Serve, upstream: tuple[int, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, seen = upstream
    monkeypatch.setenv("TEST_CONSUMER_KEY", "sk-alice")
    url = await serve(
        {
            "consumers": [
                {"username": "alice", "plugins": {"key-auth": {"key": "$env://TEST_CONSUMER_KEY"}}}
            ],
            "routes": [route(port, plugins={"key-auth": {"hide_credentials": True}})],
        }
    )
    async with httpx.AsyncClient(base_url=url) as c:
        missing = await c.get("/x")
        assert (missing.status_code, missing.json()) == (
            401,
            {"message": "Missing API key in request"},
        )
        wrong = await c.get("/x", headers={"apikey": "nope"})
        assert (wrong.status_code, wrong.json()) == (401, {"message": "Invalid API key in request"})
        assert (await c.get("/x", headers={"apikey": "sk-alice"})).status_code == 200
        assert "apikey" not in {k.lower() for k in seen[-1]["headers"]}
        assert (await c.get("/x?apikey=sk-alice&keep=1")).status_code == 200
        assert seen[-1]["path"] == "/x?keep=1"


async def test_response_rewrite_gives_401s_the_sdk_shape(
    serve: Serve, upstream: tuple[int, list[Any]]
) -> None:
    port, _ = upstream
    body = (
        '{"error": {"message": "bad key", "type": "authentication_error", "param": null, '
        '"code": "invalid_api_key"}}'
    )
    rewrite = {
        "vars": [["status", "==", 401]],
        "headers": {"set": {"content-type": "application/json"}},
        "body": body,
    }
    url = await serve(
        {"routes": [route(port, plugins={"key-auth": {}, "response-rewrite": rewrite})]}
    )
    async with httpx.AsyncClient(base_url=url) as c:
        r = await c.get("/x")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "invalid_api_key"


async def test_client_control_refuses_large_bodies(
    serve: Serve, upstream: tuple[int, list[Any]]
) -> None:
    port, seen = upstream
    url = await serve({"routes": [route(port, plugins={"client-control": {"max_body_size": 100}})]})
    async with httpx.AsyncClient(base_url=url) as c:
        assert (await c.post("/x", content=b"a" * 101)).status_code == 413
        assert (await c.post("/x", content=b"a" * 100)).status_code == 200
    assert len(seen) == 1


# --- proxying ---------------------------------------------------------------------------------


async def test_streams_pass_through_as_they_arrive(
    serve: Serve, upstream: tuple[int, list[Any]]
) -> None:
    port, _ = upstream
    url = await serve({"routes": [route(port, uri="/slow")]})
    async with httpx.AsyncClient(base_url=url) as c, c.stream("GET", "/slow") as r:
        started = time.monotonic()
        arrivals = []
        async for chunk in r.aiter_raw():
            arrivals.append((time.monotonic() - started, chunk))
    assert arrivals[0][1].startswith(b"data: one")
    assert arrivals[0][0] < 0.4  # the first event came before the second was written
    assert b"".join(c for _, c in arrivals) == b"data: one\n\ndata: two\n\n"


async def test_an_unreachable_upstream_is_502(serve: Serve) -> None:
    url = await serve({"routes": [{"uri": "/x", "upstream": {"nodes": {"127.0.0.1:1": 1}}}]})
    async with httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/x")).status_code == 502


# --- ext-plugin phases ------------------------------------------------------------------------


def ext(phase: str, *entries: tuple[str, str], degrade: bool = False) -> dict[str, Any]:
    conf: dict[str, Any] = {"conf": [{"name": n, "value": v} for n, v in entries]}
    if degrade:
        conf["allow_degradation"] = True
    return {phase: conf}


async def test_post_req_rewrite_and_stop(
    serve: Serve, upstream: tuple[int, list[dict[str, Any]]], inproc_runner: str
) -> None:
    port, seen = upstream
    plugins = ext(
        "ext-plugin-post-req", ("deepgate-prompt-filter", '{"deny_patterns": ["forbidden"]}')
    )
    url = await serve(
        {"routes": [route(port, uri="/v1/chat/completions", plugins=plugins)]}, inproc_runner
    )
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hello\u200b   world"}]}
    async with httpx.AsyncClient(base_url=url) as c:
        ok = await c.post("/v1/chat/completions", json=chat)
        assert ok.status_code == 200
        assert b"Hello world" in seen[-1]["body"]
        assert int(seen[-1]["headers"]["Content-Length"]) == len(seen[-1]["body"])
        chat["messages"][0]["content"] = "forbidden"
        stop = await c.post("/v1/chat/completions", json=chat)
    assert stop.status_code == 400
    assert stop.headers["content-type"] == "application/json"
    assert stop.json()["error"]["code"] == "content_policy_violation"


async def test_pre_req_moves_the_sdk_credential_before_key_auth(
    serve: Serve,
    upstream: tuple[int, list[dict[str, Any]]],
    inproc_runner: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, seen = upstream
    monkeypatch.setenv("TEST_CONSUMER_KEY", "sk-bob")
    plugins = {
        **ext("ext-plugin-pre-req", ("deepgate-auth-bridge", "{}")),
        "key-auth": {"hide_credentials": True},
    }
    url = await serve(
        {
            "consumers": [
                {"username": "bob", "plugins": {"key-auth": {"key": "$env://TEST_CONSUMER_KEY"}}}
            ],
            "routes": [route(port, plugins=plugins)],
        },
        inproc_runner,
    )
    async with httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/x", headers={"authorization": "Bearer sk-bob"})).status_code == 200
        assert (await c.get("/x", headers={"x-api-key": "sk-bob"})).status_code == 200
        assert (await c.get("/x", headers={"x-api-key": "sk-eve"})).status_code == 401
    sent = {k.lower() for k in seen[-1]["headers"]}
    assert not sent & {"authorization", "x-api-key", "apikey"}


async def test_post_resp_hook_replaces_the_upstream_body(
    serve: Serve, upstream: tuple[int, list[Any]], inproc_runner: str
) -> None:
    port, _ = upstream
    url = await serve(
        {"routes": [route(port, plugins=ext("ext-plugin-post-resp", ("test-upper", "{}")))]},
        inproc_runner,
    )
    async with httpx.AsyncClient(base_url=url) as c:
        r = await c.get("/x")
    assert r.status_code == 200
    assert r.headers["x-upper"] == "1"
    assert r.content == b'{"PATH": "/X", "BODY": ""}'


async def test_runner_down_is_503_unless_degradation_is_allowed(
    serve: Serve, upstream: tuple[int, list[Any]], tmp_path: Path
) -> None:
    port, _ = upstream
    missing = str(tmp_path / "no-runner.sock")
    strict = ext("ext-plugin-post-req", ("deepgate-prompt-filter", "{}"))
    lenient = ext("ext-plugin-post-req", ("deepgate-prompt-filter", "{}"), degrade=True)
    url = await serve(
        {
            "routes": [
                route(port, uri="/strict", plugins=strict),
                route(port, uri="/lenient", plugins=lenient),
            ]
        },
        missing,
    )
    async with httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/strict")).status_code == 503
        assert (await c.get("/lenient")).status_code == 200
