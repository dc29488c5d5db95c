"""The request path of the APISIX stand-in, in APISIX's phase order.

For a matched route: request id, ``client-control`` (body size), ``ext-plugin-pre-req``,
``key-auth`` (consumer, ``hide_credentials``), ``ext-plugin-post-req``, then the upstream —
through ``ext-plugin-post-resp`` when the route has it — with the answer streamed back as it
arrives. ``response-rewrite`` applies to every response of the route, including ones a plugin
ended early, as APISIX runs its header and body filters for them too. The ext-plugin phases talk
to the real runner over the real socket protocol through ``devgateway.driver``.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import logging
import operator
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from devgateway.conf import GatewayConfig, Route, Upstream
from devgateway.driver import ExtPluginDriver, PluginChain, RunnerError
from plugins.runner import codec
from plugins.runner.codec import ProtocolError

log = logging.getLogger("devgateway.access")

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
# Headers a Rewrite's resp_headers may not set (APISIX skips them).
_RESP_HEADERS_DENIED = {
    "connection",
    "content-length",
    "transfer-encoding",
    "location",
    "server",
    "www-authenticate",
    "content-encoding",
    "content-type",
    "content-location",
    "content-language",
}
_RUNNER_FAILURES = (RunnerError, OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError)
_SERVICE_UNAVAILABLE = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    b"<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n</body>\r\n</html>\r\n"
)


@dataclass
class Exchange:
    """One client request as it moves through the phases."""

    request: web.Request
    route: Route
    request_id: str
    headers: CIMultiDict[str]
    path: str
    args: list[tuple[str, str | None]]
    body: bytes
    consumer: str | None = None
    upstream_host: str | None = None
    resp_headers: list[tuple[str, str]] = field(default_factory=list)
    upstream_status: int | None = None


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _prefix_match(pattern: str, path: str) -> int:
    """How specific a match of ``pattern`` is (-1: none; exact beats any prefix)."""
    if pattern.endswith("*"):
        return len(pattern) if path.startswith(pattern[:-1]) else -1
    return 1_000_000 if path == pattern else -1


class Gateway:
    def __init__(self, conf: GatewayConfig, runner_socket: str) -> None:
        self.conf = conf
        self.driver = ExtPluginDriver(runner_socket, timeout_s=60.0)
        self.session: aiohttp.ClientSession | None = None
        self._rr = itertools.count()

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(auto_decompress=False)

    async def stop(self) -> None:
        await self.driver.close()
        if self.session is not None:
            await self.session.close()

    # --- routing ----------------------------------------------------------------------------

    def match(self, method: str, path: str, host: str) -> Route | None:
        best: tuple[int, int, int] | None = None
        found = None
        host = host.split(":")[0].lower()
        for route in self.conf.routes:
            if route.methods and method not in route.methods:
                continue
            if route.hosts and host not in route.hosts:
                continue
            score = max(_prefix_match(u, path) for u in route.uris)
            if score < 0:
                continue
            rank = (score, route.priority, -route.index)
            if best is None or rank > best:
                best, found = rank, route
        return found

    # --- the pipeline -----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        route = self.match(request.method, request.path, request.host)
        if route is None:
            resp: web.StreamResponse = _json(404, {"error_msg": "404 Route Not Found"})
            self._access(request, None, rid, resp, None, started)
            return resp
        headers = CIMultiDict(request.headers)
        headers["X-Request-Id"] = rid
        args: list[tuple[str, str | None]] = [
            (k, v if v != "" or f"{k}=" in request.query_string else None)
            for k, v in request.query.items()
        ]
        ex = Exchange(request, route, rid, headers, request.path, args, b"")
        resp = await self._phases(ex)
        resp = await self._finish(ex, resp)
        self._access(request, route, rid, resp, ex, started)
        return resp

    async def _phases(self, ex: Exchange) -> web.StreamResponse:
        plugins = ex.route.plugins
        limit = plugins.get("client-control", {}).get("max_body_size")
        if limit is not None and (ex.request.content_length or 0) > int(limit):
            return _too_large()
        ex.body = await ex.request.read()
        if limit is not None and len(ex.body) > int(limit):
            return _too_large()
        early = await self._ext_request(ex, "ext-plugin-pre-req")
        if early is not None:
            return early
        if "key-auth" in plugins:
            refused = self._key_auth(ex, plugins["key-auth"])
            if refused is not None:
                return refused
        early = await self._ext_request(ex, "ext-plugin-post-req")
        if early is not None:
            return early
        return await self._proxy(ex)

    def _key_auth(self, ex: Exchange, conf: dict[str, Any]) -> web.Response | None:
        header = conf.get("header", "apikey")
        query = conf.get("query", "apikey")
        key = ex.headers.get(header)
        from_query = False
        if not key:
            key = next((v for k, v in ex.args if k == query and v), None)
            from_query = key is not None
        if not key:
            return _json(401, {"message": "Missing API key in request"})
        consumer = self.conf.consumers.get(key)
        if consumer is None:
            return _json(401, {"message": "Invalid API key in request"})
        ex.consumer = consumer
        if conf.get("hide_credentials"):
            ex.headers.popall(header, None)
            if from_query:
                ex.args = [(k, v) for k, v in ex.args if k != query]
        return None

    # --- ext-plugin phases ------------------------------------------------------------------

    def _chain(self, ex: Exchange, phase: str) -> tuple[PluginChain, dict[str, Any]] | None:
        conf = ex.route.plugins.get(phase)
        if conf is None:
            return None
        entries = tuple((str(e["name"]), str(e.get("value", "{}"))) for e in conf.get("conf") or [])
        return PluginChain(f"route#routes#{ex.route.id}#{phase}#0", entries), conf

    async def _answer(self, ex: Exchange, info: codec.ExtraInfo) -> bytes | None:
        if isinstance(info, codec.ReqBody):
            return ex.body or None
        if isinstance(info, codec.Var):
            value = self._var(ex, info.name)
            return None if value is None else value.encode()
        return None

    def _var(self, ex: Exchange, name: str) -> str | None:
        req = ex.request
        peer = req.transport.get_extra_info("peername") if req.transport else None
        values = {
            "consumer_name": ex.consumer,
            "request_id": ex.request_id,
            "remote_addr": peer[0] if peer else None,
            "route_id": ex.route.id,
            "uri": ex.path,
            "request_uri": req.path_qs,
            "request_method": req.method,
            "host": req.host.split(":")[0],
            "server_port": str(req.url.port or ""),
            "scheme": req.scheme,
        }
        if name.startswith("http_"):
            return ex.headers.get(name[5:].replace("_", "-"))
        if name.startswith("arg_"):
            return next((v for k, v in ex.args if k == name[4:]), None)
        return values.get(name)

    def _call(self, ex: Exchange) -> codec.HTTPReqCallReq:
        peer = ex.request.transport.get_extra_info("peername") if ex.request.transport else None
        try:
            src_ip = ipaddress.ip_address(peer[0]).packed if peer else b""
        except ValueError:
            src_ip = b""
        return codec.HTTPReqCallReq(
            id=0,
            conf_token=0,
            method=codec.Method[ex.request.method].value,
            path=ex.path,
            src_ip=src_ip,
            args=list(ex.args),
            headers=[(k.lower(), v) for k, v in ex.headers.items()],
        )

    async def _ext_request(self, ex: Exchange, phase: str) -> web.StreamResponse | None:
        found = self._chain(ex, phase)
        if found is None or phase == "ext-plugin-post-resp":
            return None
        chain, conf = found

        async def answer(info: codec.ExtraInfo) -> bytes | None:
            return await self._answer(ex, info)

        try:
            reply = await self.driver.req_call(chain, self._call(ex), answer)
        except _RUNNER_FAILURES as exc:
            return self._runner_down(ex, phase, conf, exc)
        action = reply.action
        if isinstance(action, codec.Stop):
            headers = CIMultiDict((k, v) for k, v in action.headers if v is not None)
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
            return web.Response(status=action.status or 200, headers=headers, body=action.body)
        if isinstance(action, codec.Rewrite):
            self._apply_rewrite(ex, action)
        return None

    def _runner_down(
        self, ex: Exchange, phase: str, conf: dict[str, Any], exc: BaseException
    ) -> web.Response | None:
        log.warning("%s failed on route %s: %s", phase, ex.route.id, type(exc).__name__)
        if conf.get("allow_degradation"):
            return None
        return web.Response(status=503, body=_SERVICE_UNAVAILABLE, content_type="text/html")

    def _apply_rewrite(self, ex: Exchange, rw: codec.Rewrite) -> None:
        if rw.path:
            ex.path = rw.path
        for name, value in rw.headers:
            if value is None:
                ex.headers.popall(name, None)
            else:
                ex.headers[name] = value
                if name.lower() == "host":
                    ex.upstream_host = value
        if rw.body:
            ex.body = rw.body
        for name, value in rw.resp_headers:
            if value is not None and name.lower() not in _RESP_HEADERS_DENIED:
                ex.resp_headers.append((name, value))
        if rw.args:
            current = dict(ex.args)
            for name, value in rw.args:
                if value is None:
                    current.pop(name, None)
                else:
                    current[name] = value
            ex.args = list(current.items())

    # --- the upstream -----------------------------------------------------------------------

    def _node(self, upstream: Upstream) -> tuple[str, int]:
        ring = [(h, p) for h, p, w in upstream.nodes for _ in range(max(w, 1))]
        return ring[next(self._rr) % len(ring)]

    def _upstream_request(self, ex: Exchange) -> tuple[str, CIMultiDict[str]]:
        host, port = self._node(ex.route.upstream)
        query = "&".join(
            quote(k, safe="") + ("" if v is None else "=" + quote(v, safe="")) for k, v in ex.args
        )
        url = f"http://{host}:{port}{quote(ex.path, safe='/%:@')}" + (f"?{query}" if query else "")
        headers = CIMultiDict((k, v) for k, v in ex.headers.items() if k.lower() not in _HOP_BY_HOP)
        headers["Host"] = ex.upstream_host or f"{host}:{port}"
        peer = ex.request.remote or ""
        headers["X-Real-IP"] = peer
        headers["X-Forwarded-For"] = peer
        headers["X-Forwarded-Proto"] = ex.request.scheme
        return url, headers

    async def _proxy(self, ex: Exchange) -> web.StreamResponse:
        assert self.session is not None
        up = ex.route.upstream
        url, headers = self._upstream_request(ex)
        timeout = aiohttp.ClientTimeout(sock_connect=up.connect_s, sock_read=up.read_s)
        try:
            upstream = await self.session.request(
                ex.request.method, url, headers=headers, data=ex.body or None, timeout=timeout
            )
        except TimeoutError:
            return _json(504, {"error_msg": "upstream timed out"})
        except aiohttp.ClientError:
            return _json(502, {"error_msg": "upstream unreachable"})
        ex.upstream_status = upstream.status
        found = self._chain(ex, "ext-plugin-post-resp")
        if found is not None:
            return await self._post_resp(ex, upstream, *found)
        return _Streamed(upstream)

    async def _post_resp(
        self,
        ex: Exchange,
        upstream: aiohttp.ClientResponse,
        chain: PluginChain,
        conf: dict[str, Any],
    ) -> web.StreamResponse:
        body: bytes | None = None

        async def answer(info: codec.ExtraInfo) -> bytes | None:
            nonlocal body
            if isinstance(info, codec.RespBody):
                if body is None:
                    body = await upstream.read()
                return body
            return await self._answer(ex, info)

        req = codec.HTTPRespCallReq(
            id=0,
            conf_token=0,
            status=upstream.status,
            headers=[(k.lower(), v) for k, v in upstream.headers.items()],
        )
        try:
            reply = await self.driver.resp_call(chain, req, answer)
        except _RUNNER_FAILURES as exc:
            down = self._runner_down(ex, "ext-plugin-post-resp", conf, exc)
            if down is not None:
                upstream.release()
                return down
            return _Streamed(upstream)
        if not reply.body and not reply.headers and body is None:
            return _Streamed(upstream)
        if body is None and not reply.body:
            body = await upstream.read()
        status = reply.status or upstream.status
        headers = (
            CIMultiDict((k, v) for k, v in reply.headers if v is not None)
            if reply.headers
            else CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP
            )
        )
        return web.Response(status=status, headers=headers, body=reply.body or body)

    # --- response-rewrite and sending -------------------------------------------------------

    async def _finish(self, ex: Exchange, resp: web.StreamResponse) -> web.StreamResponse:
        rewrite = ex.route.plugins.get("response-rewrite")
        status = resp.upstream.status if isinstance(resp, _Streamed) else resp.status
        if rewrite is not None and _vars_match(rewrite.get("vars"), status):
            resp = await _rewritten(resp, rewrite)
        if isinstance(resp, _Streamed):
            return await resp.send(ex)
        for name, value in ex.resp_headers:
            resp.headers.add(name, value)
        return resp

    def _access(
        self,
        request: web.Request,
        route: Route | None,
        rid: str,
        resp: web.StreamResponse,
        ex: Exchange | None,
        started: float,
    ) -> None:
        log.info(
            "request",
            extra={
                "request_id": rid,
                "method": request.method,
                "path": request.path,
                "route": route.id if route else None,
                "consumer": ex.consumer if ex else None,
                "status": resp.status,
                "upstream_status": ex.upstream_status if ex else None,
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )


class _Streamed(web.StreamResponse):
    """An upstream answer passed through chunk by chunk, as it arrives."""

    def __init__(self, upstream: aiohttp.ClientResponse) -> None:
        super().__init__(status=upstream.status)
        self.upstream = upstream

    async def send(self, ex: Exchange) -> web.StreamResponse:
        for name, value in self.upstream.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                self.headers.add(name, value)
        for name, value in ex.resp_headers:
            self.headers.add(name, value)
        try:
            await self.prepare(ex.request)
            async for chunk in self.upstream.content.iter_any():
                await self.write(chunk)
            await self.write_eof()
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            log.warning("stream from upstream broke: %s", type(exc).__name__)
        finally:
            self.upstream.release()
        return self


def _too_large() -> web.Response:
    body = (
        b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
        b"<center><h1>413 Request Entity Too Large</h1></center>\r\n</body>\r\n</html>\r\n"
    )
    return web.Response(status=413, body=body, content_type="text/html")


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "~=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
    "in": lambda a, b: a in b,
}


def _vars_match(rules: Any, status: int) -> bool:
    """lua-resty-expr rules on ``status`` (all must hold); no rules = always."""
    for rule in rules or []:
        name, op, value = rule
        if name != "status":
            raise ValueError(f"response-rewrite vars on {name!r} are not imitated")
        if not _OPS[op](status, value):
            return False
    return True


async def _rewritten(resp: web.StreamResponse, conf: dict[str, Any]) -> web.StreamResponse:
    if isinstance(resp, _Streamed):
        if "body" not in conf and "body_base64" not in conf:
            new: web.StreamResponse = resp
        else:
            await resp.upstream.read()
            resp.upstream.release()
            new = web.Response(status=resp.upstream.status)
            for k, v in resp.upstream.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    new.headers.add(k, v)
    else:
        new = resp
    if "status_code" in conf:
        new.set_status(int(conf["status_code"]))
    ops = conf.get("headers") or {}
    for name in ops.get("remove") or []:
        new.headers.popall(name, None)
    for name, value in (ops.get("set") or {}).items():
        new.headers[name] = str(value)
    for item in ops.get("add") or []:
        name, _, value = str(item).partition(":")
        new.headers.add(name.strip(), value.strip())
    if isinstance(new, web.Response):
        if "body" in conf:
            new.body = str(conf["body"]).encode()
        elif "body_base64" in conf:
            new.body = base64.b64decode(conf["body_base64"])
    return new
