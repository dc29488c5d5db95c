"""The APISIX stand-in, in process: what it refuses, how it routes, authenticates, rewrites, limits
and proxies.

Each test writes its own config.yaml / apisix.yaml into a temporary directory, serves them from an
in-process gateway on a free port and talks to it over HTTP; the upstream is an aiohttp server in
the same loop that records what it received and can stream slowly. The ext-plugin phases and the
gateway as a process have their own files (``test_devgateway_ext.py``,
``test_devgateway_process.py``), which reuse the helpers here.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml
from aiohttp import web

from deepgate.config import ConfigError
from deepgate.logs import JsonFormatter
from devgateway import expr
from devgateway.conf import load
from devgateway.gateway import Gateway
from devgateway.upstream import RoundRobin

ROOT = Path(__file__).resolve().parents[2]

CONFIG: dict[str, Any] = {
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


# --- an upstream that records what it got ------------------------------------------------------


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class Upstream:
    port: int
    name: str
    seen: list[Seen] = field(default_factory=list)
    written: list[float] = field(default_factory=list)  # when /sse wrote each event

    @property
    def node(self) -> str:
        return f"127.0.0.1:{self.port}"


SSE_EVENTS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
SSE_GAP_S = 0.5


async def start_upstream(name: str = "up") -> tuple[Upstream, web.AppRunner]:
    state = Upstream(port=0, name=name)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state.seen.append(
            Seen(request.method, request.path_qs, list(request.headers.items()), body)
        )
        if request.path == "/sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i, event in enumerate(SSE_EVENTS):
                if i:
                    await asyncio.sleep(SSE_GAP_S)
                state.written.append(time.monotonic())
                await resp.write(event)
            await resp.write_eof()
            return resp
        if request.path.startswith("/status/"):
            code = int(request.path.rsplit("/", 1)[1])
            return web.json_response({"upstream": name}, status=code, headers={"ETag": '"x"'})
        if request.path == "/slow":
            await asyncio.sleep(1)
        if request.path == "/broken":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(SSE_EVENTS[0])
            assert request.transport is not None
            request.transport.close()  # gone before the answer ended
            return resp
        return web.json_response(
            {"path": request.path_qs, "body": body.decode(errors="replace")},
            headers={"X-Upstream": name, "Server": "upstream-server"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    return state, runner


async def upstream_server() -> AsyncIterator[Upstream]:
    """The ``upstream`` fixture (other test files register it too)."""
    state, runner = await start_upstream()
    yield state
    await runner.cleanup()


upstream_fixture = pytest.fixture(name="upstream")(upstream_server)


# --- writing configs and serving them ---------------------------------------------------------

_files = itertools.count()


def write(
    directory: Path, routes: dict[str, Any], config: dict[str, Any] | None = None, end: bool = True
) -> tuple[Path, Path]:
    n = next(_files)
    cfile, rfile = directory / f"config-{n}.yaml", directory / f"apisix-{n}.yaml"
    cfile.write_text(yaml.safe_dump(config if config is not None else CONFIG))
    rfile.write_text(yaml.safe_dump(routes) + ("#END\n" if end else ""))
    return cfile, rfile


def route(up: Upstream | str, uri: str = "/x", **kw: Any) -> dict[str, Any]:
    node = up.node if isinstance(up, Upstream) else up
    return {"uri": uri, "upstream": {"nodes": {node: 1}}, **kw}


@dataclass
class Served:
    url: str
    gateway: Gateway


Serve = Callable[..., Awaitable[Served]]


async def gateway_server(tmp_path: Path) -> AsyncIterator[Serve]:
    """The ``serve`` fixture: serve a routes file (and config) from an in-process gateway."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(
        routes: dict[str, Any],
        *,
        config: dict[str, Any] | None = None,
        runner: str | None = None,
        runner_timeout_s: float = 60.0,
    ) -> Served:
        cfg = dict(config if config is not None else CONFIG)
        if runner is not None:
            cfg["ext-plugin"] = {"path_for_test": runner}
        conf = load(*write(tmp_path, routes, cfg))
        gateway = Gateway(conf, runner or str(tmp_path / "no-runner.sock"), runner_timeout_s)
        await gateway.start()
        app_runner = web.AppRunner(gateway.app(), access_log=None)
        await app_runner.setup()
        await web.TCPSite(app_runner, "127.0.0.1", 0).start()
        cleanups.extend([app_runner.cleanup, gateway.stop])
        return Served(f"http://127.0.0.1:{app_runner.addresses[0][1]}", gateway)

    yield start
    for cleanup in cleanups:
        await cleanup()


serve_fixture = pytest.fixture(name="serve")(gateway_server)


def client(served: Served) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=served.url, timeout=20)


# --- what it refuses --------------------------------------------------------------------------

UP = {"nodes": {"127.0.0.1:1": 1}}


@pytest.mark.parametrize(
    ("routes", "config", "expected"),
    [
        pytest.param(
            {"routes": [{"uri": "/x", "upstream": UP, "plugins": {"limit-count": {}}}]},
            None,
            ["routes[0].plugins.limit-count", "unsupported plugin 'limit-count'"],
            id="plugin",
        ),
        pytest.param(
            {"routes": [{"uri": "/x", "upstream": UP, "plugins": {"key-auth": {"realm": "x"}}}]},
            None,
            ["routes[0].plugins.key-auth.realm", "unsupported option 'realm'"],
            id="option",
        ),
        pytest.param(
            {"routes": [{"uri": "/x", "upstream": UP, "timeout": {"connect": 1}}]},
            None,
            ["routes[0].timeout", "unsupported key 'timeout'"],
            id="route-key",
        ),
        pytest.param(
            {"routes": [], "ssls": []}, None, ["ssls", "unsupported key 'ssls'"], id="top-key"
        ),
        pytest.param(
            {"upstreams": [{"id": "u", "type": "chash", "nodes": {"a:1": 1}}], "routes": []},
            None,
            ["upstreams[0].type", "roundrobin"],
            id="upstream-type",
        ),
        pytest.param(
            {"routes": []},
            {**CONFIG, "plugins": ["key-auth", "limit-req"]},
            ["plugins[1]", "unsupported plugin 'limit-req'"],
            id="config-plugins",
        ),
        pytest.param(
            {"routes": []},
            {**CONFIG, "apisix": {"node_listen": 9080, "enable_ipv6": False}},
            ["apisix.enable_ipv6", "unsupported key"],
            id="config-key",
        ),
        pytest.param(
            {"routes": [{"uri": "/x", "upstream": UP, "plugins": {"response-rewrite": {}}}]},
            {**CONFIG, "plugins": ["key-auth"]},
            ["routes[0].plugins.response-rewrite", "not in the plugins list"],
            id="not-enabled",
        ),
        pytest.param(
            {
                "consumers": [
                    {
                        "username": "a",
                        "plugins": {"key-auth": {"key": "$env://NOT_SET_ANYWHERE_42"}},
                    }
                ]
            },
            None,
            ["consumers[0].plugins.key-auth.key", "NOT_SET_ANYWHERE_42"],
            id="env-missing",
        ),
        pytest.param(
            {
                "routes": [
                    {
                        "uri": "/x",
                        "upstream": UP,
                        "plugins": {
                            "response-rewrite": {"filters": [{"regex": "a", "replace": ""}]}
                        },
                    }
                ]
            },
            None,
            ["routes[0].plugins.response-rewrite.filters", "unsupported option 'filters'"],
            id="rewrite-filters",
        ),
        pytest.param(
            {
                "routes": [
                    {
                        "uri": "/x",
                        "upstream": UP,
                        "plugins": {"response-rewrite": {"vars": [["status", "~~", "^4"]]}},
                    }
                ]
            },
            None,
            ["routes[0].plugins.response-rewrite", "'~~'"],
            id="vars-regex",
        ),
        pytest.param(
            {
                "routes": [
                    {
                        "uri": "/x",
                        "upstream": UP,
                        "plugins": {"response-rewrite": {"vars": [["upstream_addr", "==", "x"]]}},
                    }
                ]
            },
            None,
            ["routes[0].plugins.response-rewrite", "upstream_addr"],
            id="vars-unknown-variable",
        ),
        pytest.param(
            {"routes": [{"uri": "/x", "upstream": UP, "plugins": {"key-auth": None}}]},
            None,
            ["routes[0].plugins", "'key-auth' has no configuration"],
            id="null-plugin",
        ),
        pytest.param(
            {"routes": [{"uri": "/users/:id", "upstream": UP}]},
            None,
            ["routes[0].uri", "parameters"],
            id="uri-parameter",
        ),
        pytest.param(
            {"routes": [{"uri": "/x", "upstream_id": "missing"}]},
            None,
            ["routes[0].upstream_id", "no upstream 'missing'"],
            id="unknown-upstream",
        ),
        pytest.param(
            {"routes": []},
            {**CONFIG, "apisix": {"enable_admin": True}},
            ["apisix.enable_admin"],
            id="admin-api",
        ),
    ],
)
def test_what_it_does_not_imitate_stops_start_up_naming_file_path_and_name(
    tmp_path: Path, routes: dict[str, Any], config: dict[str, Any] | None, expected: list[str]
) -> None:
    cfile, rfile = write(tmp_path, routes, config)
    with pytest.raises(ConfigError) as err:
        load(cfile, rfile)
    message = str(err.value)
    for part in expected:
        assert part in message
    assert str(tmp_path) in message


def test_a_routes_file_without_end_marker_is_refused(tmp_path: Path) -> None:
    cfile, rfile = write(tmp_path, {"routes": []}, end=False)
    with pytest.raises(ConfigError, match="#END"):
        load(cfile, rfile)


def test_env_references_resolve_in_plugin_configurations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DG_TEST_KEY", "sk-from-env")
    monkeypatch.setenv("DG_TEST_HEADER", "x-key")
    routes = {
        "consumers": [{"username": "amy", "plugins": {"key-auth": {"key": "$env://DG_TEST_KEY"}}}],
        "routes": [route("127.0.0.1:1", plugins={"key-auth": {"header": "$env://DG_TEST_HEADER"}})],
    }
    conf = load(*write(tmp_path, routes))
    assert conf.consumers == {"sk-from-env": "amy"}
    assert conf.routes[0].plugins.key_auth is not None
    assert conf.routes[0].plugins.key_auth.header == "x-key"


def test_the_shipped_files_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPGATE_DEMO_KEY", "k")
    conf = load(ROOT / "apisix-conf" / "config.yaml", ROOT / "apisix-conf" / "apisix.yaml")
    assert [r.id for r in conf.routes] == [
        "chat-completions",
        "anthropic-messages",
        "embeddings",
        "models",
    ]
    assert conf.runner_cmd == ["deepgate-runner"]
    assert conf.consumers == {"k": "demo"}
    assert "DEEPGATE_ROUTE_KEY" in conf.runner_env_names()
    assert conf.warnings == []


# --- lua-resty-expr -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "status", "matches"),
    [
        ([["status", "==", 401]], "401", True),
        ([["status", "==", "401"]], "401", True),
        ([["status", "~=", 401]], "401", False),
        ([["status", ">=", 400], ["status", "<", 500]], "404", True),
        ([["status", ">", "400"]], "400", False),
        ([["status", "in", [401, 403]]], "401", False),  # a string never equals a number in Lua
        ([["status", "in", ["401", "403"]]], "403", True),
        ([["status", "!", "==", 200]], "500", True),
        ([["status", 401]], "401", True),
        (["OR", ["status", "==", 401], ["status", "==", 403]], "403", True),
        (["!AND", ["status", ">=", 400], ["status", "<", 600]], "200", True),
        ([["status", "==", 200]], None, False),
    ],
)
def test_vars_compare_as_lua_resty_expr_does(
    rule: list[Any], status: str | None, matches: bool
) -> None:
    compiled = expr.compile_vars(rule)
    assert expr.evaluate(compiled, {"status": status}.get) is matches


def test_vars_that_can_never_match_on_apisix_are_flagged() -> None:
    compiled = expr.compile_vars([["status", "in", [401, 403]]])
    assert expr.warnings(compiled)
    assert not expr.warnings(expr.compile_vars([["status", "in", ["401"]]]))


# --- routing ----------------------------------------------------------------------------------


def tagged(up: Upstream, tag: str, **kw: Any) -> dict[str, Any]:
    """A route whose answers carry ``x-route: <tag>``."""
    plugins = {"response-rewrite": {"headers": {"set": {"x-route": tag}}}}
    return {"upstream": {"nodes": {up.node: 1}}, "plugins": plugins, **kw}


async def test_route_precedence_methods_and_hosts(serve: Serve, upstream: Upstream) -> None:
    served = await serve(
        {
            "routes": [
                tagged(upstream, "prefix", uri="/v1/*"),
                tagged(upstream, "exact-get", uri="/v1/models", methods=["GET"]),
                tagged(upstream, "longer-prefix", uri="/v1/chat/*"),
                tagged(upstream, "low", uri="/p/*", priority=0),
                tagged(upstream, "high", uri="/p/*", priority=10),
                tagged(upstream, "first", uri="/same"),
                tagged(upstream, "second", uri="/same"),
                tagged(upstream, "any-host", uri="/h"),
                tagged(upstream, "wild-host", uri="/h", hosts=["*.example.com"]),
                tagged(upstream, "exact-host", uri="/h", host="api.example.com"),
                tagged(upstream, "host-prefix", uri="/hp/*", host="api.example.com"),
                tagged(upstream, "no-host-exact", uri="/hp/x"),
                tagged(upstream, "post-only", uri="/post", methods=["POST"]),
            ]
        }
    )

    async def which(method: str, path: str, host: str | None = None) -> str | None:
        headers = {"host": host} if host else {}
        async with client(served) as c:
            r = await c.request(method, path, headers=headers)
        return r.headers.get("x-route")

    assert await which("GET", "/v1/models") == "exact-get"
    assert await which("POST", "/v1/models") == "prefix"  # the exact route is GET only
    assert await which("GET", "/v1/chat/completions") == "longer-prefix"
    assert await which("GET", "/v1/") == "prefix"
    assert await which("GET", "/p/q") == "high"
    assert await which("GET", "/same") == "first"
    assert await which("GET", "/h") == "any-host"
    assert await which("GET", "/h", "other.example.com") == "wild-host"
    assert await which("GET", "/h", "API.example.com:9080") == "exact-host"
    assert await which("GET", "/h", "example.com") == "any-host"  # *.x does not match x
    # A route with a matching host wins even over a host-less exact path.
    assert await which("GET", "/hp/x", "api.example.com") == "host-prefix"

    async with client(served) as c:
        missing = await c.get("/nowhere")
        wrong_method = await c.get("/post")
    for r in (missing, wrong_method):
        assert r.status_code == 404
        assert r.content == b'{"error_msg":"404 Route Not Found"}\n'
        assert r.headers["content-type"] == "text/plain; charset=utf-8"


async def test_routes_with_status_0_take_no_traffic(serve: Serve, upstream: Upstream) -> None:
    served = await serve({"routes": [route(upstream, status=0)]})
    async with client(served) as c:
        assert (await c.get("/x")).status_code == 404


# --- key-auth ---------------------------------------------------------------------------------


async def test_key_auth_from_header_or_query(
    serve: Serve, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CONSUMER_KEY", "sk-alice")
    consumers = [
        {"username": "alice", "plugins": {"key-auth": {"key": "$env://TEST_CONSUMER_KEY"}}}
    ]
    served = await serve(
        {
            "consumers": consumers,
            "routes": [
                route(upstream, "/plain", plugins={"key-auth": {}}),
                route(upstream, "/custom", plugins={"key-auth": {"header": "x-key", "query": "k"}}),
            ],
        }
    )
    async with client(served) as c:
        missing = await c.get("/plain")
        assert missing.status_code == 401
        assert missing.content == b'{"message":"Missing API key in request"}\n'
        assert missing.headers["content-type"] == "text/plain; charset=utf-8"
        wrong = await c.get("/plain", headers={"apikey": "sk-eve"})
        assert (wrong.status_code, wrong.json()) == (401, {"message": "Invalid API key in request"})
        empty = await c.get("/plain", headers={"apikey": ""})  # present, so a (bad) key
        assert empty.json() == {"message": "Invalid API key in request"}
        assert (await c.get("/plain", headers={"apikey": "sk-alice"})).status_code == 200
        assert (await c.get("/plain?apikey=sk-alice")).status_code == 200
        assert (await c.get("/custom", headers={"x-key": "sk-alice"})).status_code == 200
        assert (await c.get("/custom?k=sk-alice")).status_code == 200
        assert (await c.get("/custom", headers={"apikey": "sk-alice"})).status_code == 401
    assert len(upstream.seen) == 4
    # Not hidden: the key travels on, and the consumer is named to the upstream.
    assert upstream.seen[0].header("apikey") == "sk-alice"
    assert upstream.seen[0].header("x-consumer-username") == "alice"
    assert upstream.seen[1].path_qs == "/plain?apikey=sk-alice"


async def test_hide_credentials_and_consumer_headers_cannot_be_forged(
    serve: Serve, upstream: Upstream
) -> None:
    served = await serve(
        {
            "consumers": [{"username": "bob", "plugins": {"key-auth": {"key": "sk-bob"}}}],
            "routes": [route(upstream, plugins={"key-auth": {"hide_credentials": True}})],
        }
    )
    forged = {"x-consumer-username": "admin", "x-credential-identifier": "forged"}
    async with client(served) as c:
        assert (await c.get("/x", headers={"apikey": "sk-bob", **forged})).status_code == 200
        assert (await c.get("/x?a=1&apikey=sk-bob&b=%20two")).status_code == 200
    by_header, by_query = upstream.seen
    assert "apikey" not in by_header.names()
    assert by_header.header("x-consumer-username") == "bob"
    assert "x-credential-identifier" not in by_header.names()
    assert by_query.path_qs == "/x?a=1&b=%20two"


# --- response-rewrite -------------------------------------------------------------------------

SDK_401 = (
    '{"error": {"message": "bad key", "type": "authentication_error", "code": "invalid_api_key"}}'
)


async def test_response_rewrite_gives_key_auth_401_the_sdk_shape(
    serve: Serve, upstream: Upstream
) -> None:
    rewrite = {
        "vars": [["status", "==", 401]],
        "headers": {"set": {"content-type": "application/json"}},
        "body": SDK_401,
    }
    served = await serve(
        {
            "consumers": [{"username": "c", "plugins": {"key-auth": {"key": "sk-c"}}}],
            "routes": [route(upstream, plugins={"key-auth": {}, "response-rewrite": rewrite})],
        }
    )
    async with client(served) as c:
        refused = await c.get("/x")
        ok = await c.get("/x", headers={"apikey": "sk-c"})
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.headers["x-request-id"]
    assert ok.status_code == 200
    assert ok.json()["path"] == "/x"  # vars did not match: the upstream's answer is untouched


async def test_response_rewrite_on_upstream_answers(serve: Serve, upstream: Upstream) -> None:
    body64 = base64.b64encode(b"replaced").decode()
    served = await serve(
        {
            "routes": [
                route(
                    upstream,
                    "/status/*",
                    plugins={
                        "response-rewrite": {
                            "vars": [["status", ">=", 500]],
                            "status_code": 503,
                            "headers": {
                                "add": ["x-added: $remote_addr"],
                                "set": {"x-set": "${request_method} $uri", "x-upstream": ""},
                                "remove": ["etag"],
                            },
                            "body": body64,
                            "body_base64": True,
                        }
                    },
                ),
                route(upstream, "/legacy", plugins={"response-rewrite": {"headers": {"x-old": 7}}}),
                route(
                    upstream,
                    "/never/*",
                    plugins={"response-rewrite": {"vars": [["status", "in", [200]]], "body": "no"}},
                ),
            ]
        }
    )
    async with client(served) as c:
        failed = await c.get("/status/500")
        fine = await c.get("/status/200")
        legacy = await c.get("/legacy")
        never = await c.get("/never/x")
    assert (failed.status_code, failed.content) == (503, b"replaced")
    assert failed.headers["x-added"] == "127.0.0.1"
    assert failed.headers["x-set"] == "GET /status/500"
    assert "etag" not in failed.headers
    assert failed.headers["content-length"] == "8"
    assert fine.status_code == 200
    assert fine.headers["etag"] == '"x"'
    assert legacy.headers["x-old"] == "7"
    assert never.json()["path"] == "/never/x"  # ["status", "in", [200]] never holds in APISIX


# --- client-control and the request id ------------------------------------------------------


async def test_client_control_refuses_large_bodies_before_anything_reads_them(
    serve: Serve, upstream: Upstream
) -> None:
    served = await serve(
        {"routes": [route(upstream, plugins={"client-control": {"max_body_size": 100}})]}
    )

    async def chunked(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"a" * 30

    async with client(served) as c:
        declared = await c.post("/x", content=b"a" * 101)
        streamed = await c.post("/x", content=chunked(4))  # no length given: caught while read
        fits = await c.post("/x", content=b"a" * 100)
    for r in (declared, streamed):
        assert r.status_code == 413
        assert b"<title>413 Request Entity Too Large</title>" in r.content
        assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert fits.status_code == 200
    assert len(upstream.seen) == 1


async def test_request_id_set_when_absent_and_kept_when_given(
    serve: Serve, upstream: Upstream
) -> None:
    served = await serve({"routes": [route(upstream)]})
    async with client(served) as c:
        fresh = await c.get("/x")
        given = await c.get("/x", headers={"x-request-id": "client-chosen"})
    rid = fresh.headers["x-request-id"]
    assert uuid.UUID(rid).version == 4
    assert upstream.seen[0].header("x-request-id") == rid
    assert given.headers["x-request-id"] == "client-chosen"
    assert upstream.seen[1].header("x-request-id") == "client-chosen"


# --- the access log -------------------------------------------------------------------------


async def test_one_access_log_line_per_request_without_credentials(
    serve: Serve, upstream: Upstream
) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("devgateway"))
    logger = logging.getLogger("devgateway")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        served = await serve(
            {
                "consumers": [{"username": "ann", "plugins": {"key-auth": {"key": "sk-secret"}}}],
                "routes": [route(upstream, id="logged", plugins={"key-auth": {}})],
            }
        )
        async with client(served) as c:
            await c.get("/x?apikey=sk-secret", headers={"authorization": "Bearer sk-secret"})
            await c.get("/x", headers={"apikey": "sk-wrong", "x-api-key": "sk-other"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = out.getvalue()
    assert "sk-secret" not in text
    assert "sk-wrong" not in text
    assert "sk-other" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    access = [line for line in lines if line["logger"] == "devgateway.access"]
    assert len(access) == 2
    ok, refused = access
    assert ok["request_id"] == upstream.seen[0].header("x-request-id")
    assert {k: ok[k] for k in ("method", "path", "route", "consumer", "status")} == {
        "method": "GET",
        "path": "/x",
        "route": "logged",
        "consumer": "ann",
        "status": 200,
    }
    assert ok["upstream_status"] == 200
    assert ok["bytes"] > 0
    assert ok["ms"] >= 0
    assert ok["ts"]
    assert (refused["status"], refused["consumer"], refused["upstream_status"]) == (401, None, None)
    assert refused["bytes"] == len(b'{"message":"Invalid API key in request"}\n')


# --- proxying ---------------------------------------------------------------------------------


async def test_what_the_upstream_receives(serve: Serve, upstream: Upstream) -> None:
    served = await serve({"routes": [route(upstream, "/echo/*")]})
    async with client(served) as c:
        r = await c.post(
            "/echo/a%20b?x=1&x=2&flag&e=",
            content=b'{"k": 1}',
            headers={
                "content-type": "application/json",
                "x-forwarded-for": "10.0.0.1",
                "connection": "keep-alive, x-drop",
                "host": "client.example:8080",
            },
        )
    assert r.status_code == 200
    assert r.headers["x-upstream"] == "up"
    assert r.headers["server"] == "APISIX"  # nginx replaces the upstream's Server
    seen = upstream.seen[0]
    assert seen.path_qs == "/echo/a%20b?x=1&x=2&flag&e="
    assert seen.body == b'{"k": 1}'
    assert seen.header("content-length") == "8"
    assert seen.header("host") == "client.example:8080"  # pass_host: pass, APISIX's default
    assert seen.header("x-forwarded-for") == "10.0.0.1, 127.0.0.1"
    assert seen.header("x-real-ip") == "127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == "client.example"
    assert "httpx" in (seen.header("user-agent") or "")  # the client's, not aiohttp's own
    assert "x-drop" not in seen.names()


async def test_pass_host_node(serve: Serve, upstream: Upstream) -> None:
    up = {"nodes": {upstream.node: 1}, "pass_host": "node"}
    served = await serve({"routes": [{"uri": "/x", "upstream": up}]})
    async with client(served) as c:
        await c.get("/x")
    assert upstream.seen[0].header("host") == upstream.node


async def test_streams_pass_through_chunk_by_chunk(serve: Serve, upstream: Upstream) -> None:
    served = await serve({"routes": [route(upstream, "/sse")]})
    arrivals: list[tuple[float, bytes]] = []
    async with client(served) as c, c.stream("GET", "/sse") as r:
        assert r.headers["content-type"] == "text/event-stream"
        async for chunk in r.aiter_raw():
            arrivals.append((time.monotonic(), chunk))
    assert b"".join(chunk for _, chunk in arrivals) == b"".join(SSE_EVENTS)
    # Each event reached the client before the upstream had even written the next one.
    first_with = [next(t for t, _ in _upto(arrivals, i)) for i in range(len(SSE_EVENTS))]
    for i in range(len(SSE_EVENTS) - 1):
        assert first_with[i] < upstream.written[i + 1]


def _upto(arrivals: list[tuple[float, bytes]], i: int) -> list[tuple[float, bytes]]:
    """The arrivals from the one that completed event ``i`` on."""
    want = len(b"".join(SSE_EVENTS[: i + 1]))
    got = 0
    for n, (_, chunk) in enumerate(arrivals):
        got += len(chunk)
        if got >= want:
            return arrivals[n:]
    raise AssertionError(f"event {i} never arrived")


async def test_an_upstream_that_breaks_off_leaves_the_client_a_truncated_answer(
    serve: Serve, upstream: Upstream
) -> None:
    served = await serve({"routes": [route(upstream, "/broken")]})
    received: list[bytes] = []

    async def read_all(r: httpx.Response) -> None:
        async for chunk in r.aiter_raw():
            received.append(chunk)

    async with client(served) as c, c.stream("GET", "/broken") as r:
        with pytest.raises(httpx.RemoteProtocolError):
            await read_all(r)
    assert b"".join(received) == SSE_EVENTS[0]


async def test_unreachable_is_502_and_a_timeout_504(serve: Serve, upstream: Upstream) -> None:
    slow = {"nodes": {upstream.node: 1}, "timeout": {"connect": 1, "send": 1, "read": 0.3}}
    served = await serve(
        {"routes": [route("127.0.0.1:1", "/down"), {"uri": "/slow", "upstream": slow}]}
    )
    async with client(served) as c:
        down = await c.get("/down")
        late = await c.get("/slow")
    assert down.status_code == 502
    assert b"<title>502 Bad Gateway</title>" in down.content
    assert b"error_msg" not in down.content
    assert late.status_code == 504
    assert late.reason_phrase == "Gateway Time-out"


async def test_weighted_round_robin_and_retry_on_a_dead_node(serve: Serve) -> None:
    a, a_runner = await start_upstream("a")
    b, b_runner = await start_upstream("b")
    try:
        served = await serve(
            {
                "routes": [
                    {"uri": "/x", "upstream": {"nodes": {a.node: 2, b.node: 1}}},
                    {"uri": "/y", "upstream": {"nodes": {"127.0.0.1:1": 1, b.node: 1}}},
                ]
            }
        )
        async with client(served) as c:
            got = [(await c.get("/x")).headers["x-upstream"] for _ in range(6)]
            retried = [(await c.get("/y")).status_code for _ in range(4)]
        assert sorted(got) == ["a", "a", "a", "a", "b", "b"]
        assert retried == [200] * 4  # the dead node is skipped, the other one answers
    finally:
        await a_runner.cleanup()
        await b_runner.cleanup()


def test_round_robin_interleaves_by_weight() -> None:
    from devgateway.conf import Node

    a, b, c = Node("a", 1, 5), Node("b", 1, 1), Node("c", 1, 1)
    rr = RoundRobin((a, b, c))
    picks = [rr.next().host for _ in range(14)]
    assert sorted(picks) == ["a"] * 10 + ["b"] * 2 + ["c"] * 2
