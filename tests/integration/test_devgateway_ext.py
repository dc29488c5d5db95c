"""The ext-plugin phases of the APISIX stand-in, over the real socket protocol.

The runner is real: ``python -m plugins.runner`` with the shipped plugins (``runner_process``) for
the prompt filter, restarts and token misses, and the in-process runner of test plugins
(``inproc_runner``: variables, Stop, slow, response hooks) for what the shipped plugins do not
exercise. How the calls are built and Rewrites applied is also checked piece by piece.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from devgateway.conf import ExtPluginConf, Node, RoutePlugins, Upstream
from devgateway.conf import Route as RouteConf
from devgateway.driver import RunnerConnection
from devgateway.exchange import Exchange
from devgateway.extplugin import apply_rewrite, build_call, chain_for, stop_reply
from plugins.runner import codec
from tests.integration.conftest import RunnerProcess, start_runner
from tests.integration.test_devgateway import Serve, client, gateway_server, route, upstream_server
from tests.integration.test_devgateway import Upstream as Up

serve_fixture = pytest.fixture(name="serve")(gateway_server)
upstream_fixture = pytest.fixture(name="upstream")(upstream_server)

PF = "deepgate-prompt-filter"
CHAT = "/v1/chat/completions"


def ext(phase: str, *entries: tuple[str, Any], degrade: bool = False) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "conf": [
            {"name": n, "value": v if isinstance(v, str) else json.dumps(v)} for n, v in entries
        ]
    }
    if degrade:
        conf["allow_degradation"] = True
    return {phase: conf}


def chat(text: str) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": text}]}


# --- with the real runner and the shipped prompt filter --------------------------------------


async def test_post_req_rewrite_reaches_the_upstream_and_a_stop_the_client(
    serve: Serve, upstream: Up, runner_process: RunnerProcess
) -> None:
    plugins = ext("ext-plugin-post-req", (PF, {"deny_patterns": ["forbidden"]}))
    served = await serve(
        {"routes": [route(upstream, CHAT, methods=["POST"], plugins=plugins)]},
        runner=runner_process.path,
    )
    async with client(served) as c:
        ok = await c.post(CHAT, json=chat("Hello\u200b   world"))
        stop = await c.post(CHAT, json=chat("this is forbidden"))
    assert ok.status_code == 200
    seen = upstream.seen[0]
    assert orjson.loads(seen.body)["messages"][0]["content"] == "Hello world"
    assert int(seen.header("content-length") or -1) == len(seen.body)
    assert len(upstream.seen) == 1  # the Stop never reached the upstream
    assert stop.status_code == 400
    assert stop.headers["content-type"] == "application/json"
    assert stop.json()["error"]["code"] == "content_policy_violation"
    assert stop.headers["x-request-id"]


async def test_a_token_miss_after_a_runner_restart_is_retried(
    serve: Serve, upstream: Up, runner_process: RunnerProcess
) -> None:
    plugins = ext("ext-plugin-post-req", (PF, {"max_prompt_tokens": 1000}))
    served = await serve(
        {"routes": [route(upstream, CHAT, plugins=plugins)]}, runner=runner_process.path
    )
    prepares = mock.patch.object(
        RunnerConnection, "prepare", autospec=True, side_effect=RunnerConnection.prepare
    )
    async with client(served) as c:
        with prepares as prepare:
            assert (await c.post(CHAT, json=chat("first"))).status_code == 200
            # A new runner on the same socket knows none of the tokens the gateway holds.
            assert runner_process.stop() == 0
            restarted = start_runner(Path(runner_process.path).parent)
            try:
                again = await c.post(CHAT, json=chat("second\u200b  try"))
            finally:
                restarted.stop()
    assert again.status_code == 200
    assert orjson.loads(upstream.seen[-1].body)["messages"][0]["content"] == "second try"
    assert prepare.call_count == 2  # the first call, then again after CONF_TOKEN_NOT_FOUND


async def test_runner_failures_are_503_unless_degradation_is_allowed(
    serve: Serve, upstream: Up, inproc_runner: str, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-runner.sock")
    down = await serve(
        {
            "routes": [
                route(upstream, "/strict", plugins=ext("ext-plugin-pre-req", (PF, {}))),
                route(
                    upstream, "/lenient", plugins=ext("ext-plugin-pre-req", (PF, {}), degrade=True)
                ),
            ]
        },
        runner=missing,
    )
    async with client(down) as c:
        strict = await c.get("/strict")
        lenient = await c.get("/lenient")
    assert strict.status_code == 503
    assert b"<title>503 Service Temporarily Unavailable</title>" in strict.content
    assert strict.reason_phrase == "Service Temporarily Unavailable"
    assert lenient.status_code == 200

    up = await serve(
        {
            "routes": [
                route(
                    upstream,
                    "/slow",
                    plugins=ext("ext-plugin-pre-req", ("test-slow", {"delay_ms": 3000})),
                ),
                route(
                    upstream, "/bad-conf", plugins=ext("ext-plugin-pre-req", ("no-such-plugin", {}))
                ),
            ]
        },
        runner=inproc_runner,
        runner_timeout_s=0.5,
    )
    async with client(up) as c:
        assert (await c.get("/slow")).status_code == 503  # the runner's answer came too late
        assert (await c.get("/bad-conf")).status_code == 503  # PrepareConf: BAD_REQUEST


# --- with the in-process runner of test plugins ----------------------------------------------

VARS = [
    "consumer_name",
    "request_id",
    "remote_addr",
    "route_id",
    "uri",
    "request_method",
    "host",
    "server_port",
    "http_x_custom",
    "arg_q",
    "no_such_variable",
]


async def test_the_runner_gets_apisix_variables_and_the_consumer_after_auth(
    serve: Serve, upstream: Up, inproc_runner: str
) -> None:
    plugins = {
        "key-auth": {},
        **ext("ext-plugin-post-req", ("test-vars", {"names": VARS})),
    }
    served = await serve(
        {
            "consumers": [{"username": "alice", "plugins": {"key-auth": {"key": "sk-a"}}}],
            "routes": [route(upstream, "/v/*", id="vars-route", plugins=plugins)],
        },
        runner=inproc_runner,
    )
    async with client(served) as c:
        r = await c.get("/v/x?q=1&q=2", headers={"apikey": "sk-a", "x-custom": "yes"})
    assert r.status_code == 200
    assert r.headers["x-seen"] == "yes"  # a Rewrite's resp_headers reach the client
    seen = upstream.seen[0]
    port = served.url.rsplit(":", 1)[1]
    assert seen.header("x-var-consumer_name") == "alice"
    assert len(seen.header("x-var-request_id") or "") == 32
    assert seen.header("x-var-remote_addr") == "127.0.0.1"
    assert seen.header("x-var-route_id") == "vars-route"
    assert seen.header("x-var-uri") == "/v/x"
    assert seen.header("x-var-request_method") == "GET"
    assert seen.header("x-var-host") == "127.0.0.1"
    assert seen.header("x-var-server_port") == port
    assert seen.header("x-var-http_x_custom") == "yes"
    assert seen.header("x-var-arg_q") == "1"
    assert "x-var-no_such_variable" not in seen.names()


async def test_pre_req_runs_before_key_auth_and_post_req_after(
    serve: Serve, upstream: Up, inproc_runner: str
) -> None:
    served = await serve(
        {
            "routes": [
                route(
                    upstream,
                    "/pre",
                    plugins={"key-auth": {}, **ext("ext-plugin-pre-req", ("test-stop", {}))},
                ),
                route(
                    upstream,
                    "/post",
                    plugins={"key-auth": {}, **ext("ext-plugin-post-req", ("test-stop", {}))},
                ),
            ]
        },
        runner=inproc_runner,
    )
    async with client(served) as c:
        pre = await c.get("/pre")
        post = await c.get("/post")
    assert (pre.status_code, pre.content, pre.headers["x-by"]) == (200, b"cached", "stop")
    assert pre.headers["content-type"] == "text/plain; charset=utf-8"  # the Stop named none
    assert post.status_code == 401


async def test_post_resp_replaces_the_upstream_answer(
    serve: Serve, upstream: Up, inproc_runner: str
) -> None:
    served = await serve(
        {"routes": [route(upstream, plugins=ext("ext-plugin-post-resp", ("test-upper", {})))]},
        runner=inproc_runner,
    )
    async with client(served) as c:
        r = await c.get("/x")
    assert r.status_code == 200
    assert r.headers["x-upper"] == "1"
    assert r.content == b'{"PATH": "/X", "BODY": ""}'
    assert "x-forwarded-for" not in upstream.seen[0].names()  # its own call, as lua-resty-http


# --- how calls are built and answers applied --------------------------------------------------


def exchange(path: str, headers: dict[str, str] | list[tuple[str, str]]) -> Exchange:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: {
        "peername": ("10.1.2.3", 5555),
        "sockname": ("127.0.0.1", 9080),
    }.get(name, default)
    request = make_mocked_request("POST", path, headers=CIMultiDict(headers), transport=transport)
    conf = RouteConf(
        id="r1",
        index=0,
        uris=("/v1/*",),
        methods=(),
        hosts=(),
        priority=0,
        upstream=Upstream("u", (Node("127.0.0.1", 1, 1),)),
        plugins=RoutePlugins(),
    )
    return Exchange.begin(request, conf, "rid", "0" * 32)


def test_the_call_is_built_as_apisix_builds_it() -> None:
    ex = exchange(
        "/v1/a%20b?q=1&q=2&flag&e=",
        [("Host", "gw.example:9080"), ("X-Multi", "1"), ("X-Multi", "2")],
    )
    call = build_call(ex)
    assert call.method == codec.Method.POST
    assert call.path == "/v1/a b"
    assert call.src_ip == bytes([10, 1, 2, 3])
    assert call.args == [("q", "1"), ("q", "2"), ("flag", None), ("e", "")]
    assert ("host", "gw.example:9080") in call.headers
    assert [v for k, v in call.headers if k == "x-multi"] == ["1", "2"]
    assert all(k == k.lower() for k, _ in call.headers)
    # Once a Rewrite set the upstream path and host, the next phase sees them.
    apply_rewrite(ex, codec.Rewrite(path="/new path", headers=[("Host", "up.internal")]), "pre")
    again = build_call(ex)
    assert again.path == "/new%20path"
    assert ("host", "up.internal") in again.headers


def test_rewrite_is_applied_in_apisix_order_and_limits() -> None:
    ex = exchange("/v1/x?keep=1&a=1&a=2&drop=x", [("X-Old", "1"), ("Authorization", "k")])
    rw = codec.Rewrite(
        headers=[("x-old", None), ("x-new", "v"), ("host", "backend")],
        args=[("a", "9"), ("a", "10"), ("drop", None), ("add", "y")],
        resp_headers=[("x-ok", "1"), ("content-type", "no"), ("Server", "no"), ("x-none", None)],
        body=b"new body",
    )
    apply_rewrite(ex, rw, "ext-plugin-post-req")
    assert "x-old" not in ex.headers
    assert ex.headers["x-new"] == "v"
    assert ex.upstream_host == "backend"
    assert ex.args == [("keep", "1"), ("a", "9"), ("a", "10"), ("add", "y")]
    assert ex.query_string() == "keep=1&a=9&a=10&add=y"
    assert ex.body == b"new body"
    assert ex.resp_headers["ext-plugin-post-req"] == [("x-ok", "1")]


def test_a_stop_reply() -> None:
    reply = stop_reply(codec.Stop(status=0, headers=[("x-a", "1"), ("x-a", "2")], body=b"hi"))
    assert (reply.status, reply.body, reply.headers["x-a"]) == (200, b"hi", "2")
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    typed = stop_reply(codec.Stop(status=429, headers=[("Content-Type", "application/json")]))
    assert typed.headers["content-type"] == "application/json"


def test_prepare_conf_key_and_values_are_the_routes_verbatim() -> None:
    ex = exchange("/v1/x", {})
    value = '{"max_prompt_tokens":  5}'  # spacing kept: the JSON string as written
    conf = ExtPluginConf.model_validate({"conf": [{"name": PF, "value": value}]})
    chain = chain_for(ex.route, "ext-plugin-post-req", conf)
    assert chain.key == "route#routes#r1#ext-plugin-post-req#0"
    assert chain.conf == ((PF, value),)
