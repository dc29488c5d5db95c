"""The request path of the APISIX stand-in, in APISIX's phase order, and its access log.

For a matched route, the rewrite phase runs by plugin priority: ``client-control`` (22000: a
Content-Length over ``max_body_size`` is 413 before anything reads the body, and so is a body that
grows past it), the request id (12015: ``X-Request-Id`` set when the client sent none, a uuid4
that the runner and the upstream see), ``ext-plugin-pre-req`` (12000), ``key-auth`` (2500). Then
the access phase: ``ext-plugin-post-req`` (-3000, the consumer known). Then the upstream, through
``ext-plugin-post-resp`` (-4000) when the route has it.

Every response of the route then goes through the header filters by priority, as in APISIX:
``X-Request-Id`` on the response (12015), pre-req's ``resp_headers`` (12000), response-rewrite
(899), post-req's ``resp_headers`` (-3000). No route: 404 ``{"error_msg":"404 Route Not Found"}``.

One JSON access-log line per request: request id, method, path (never the query, which may hold a
key), route, consumer, status, upstream status, milliseconds and body bytes sent (nginx's
``$body_bytes_sent``); never bodies or credentials.
"""

from __future__ import annotations

import logging
import time
import uuid

from aiohttp import web

from deepgate.logs import request_scope
from devgateway import keyauth, rewrite, variables
from devgateway.conf import GatewayConfig
from devgateway.driver import ExtPluginDriver
from devgateway.exchange import BodyTooLarge, Exchange
from devgateway.extplugin import ExtPlugins
from devgateway.responses import Reply, apisix_exit, nginx_page, send
from devgateway.routing import Router
from devgateway.upstream import Proxy

access_log = logging.getLogger("devgateway.access")

REQUEST_ID_HEADER = "X-Request-Id"


class Gateway:
    def __init__(
        self, conf: GatewayConfig, runner_socket: str, runner_timeout_s: float = 60.0
    ) -> None:
        self.conf = conf
        self.router = Router(conf.routes)
        # APISIX's socket timeouts towards the runner: connect 1 s, send and read 60 s.
        self.driver = ExtPluginDriver(runner_socket, timeout_s=runner_timeout_s)
        self.ext = ExtPlugins(self.driver)
        self.proxy = Proxy()

    async def start(self) -> None:
        await self.proxy.start()

    async def stop(self) -> None:
        await self.driver.close()
        await self.proxy.stop()

    def app(self) -> web.Application:
        """An aiohttp application that sends every request through the gateway."""
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        new_id = uuid.uuid4()
        rid = request.headers.get(REQUEST_ID_HEADER) or str(new_id)
        with request_scope(rid):
            route = self.router.match(request.method, request.path, variables.nginx_host(request))
            ex: Exchange | None = None
            if route is None:
                reply = apisix_exit(404, {"error_msg": "404 Route Not Found"})
            else:
                ex = Exchange.begin(request, route, rid, new_id.hex)
                ex.headers[REQUEST_ID_HEADER] = rid
                try:
                    reply = await self._phases(ex)
                    self._filters(ex, reply)
                except BaseException:
                    self._log(request, ex, None, started)  # aiohttp answers 500
                    raise
            try:
                resp = await send(reply, request)
            finally:
                reply.close()
                self._log(request, ex, reply, started)
        return resp

    async def _phases(self, ex: Exchange) -> Reply:
        plugins = ex.route.plugins
        cc = plugins.client_control
        if cc is not None and cc.max_body_size:
            length = ex.request.content_length
            if length is not None and length > cc.max_body_size:
                return nginx_page(413)
            try:
                await ex.read_body(cc.max_body_size)
            except BodyTooLarge:
                return nginx_page(413)
        reply = await self.ext.request_phase(ex, "ext-plugin-pre-req")
        if reply is not None:
            return reply
        if plugins.key_auth is not None:
            reply = keyauth.authenticate(ex, plugins.key_auth, self.conf.consumers)
            if reply is not None:
                return reply
        reply = await self.ext.request_phase(ex, "ext-plugin-post-req")
        if reply is not None:
            return reply
        if plugins.ext_plugin_post_resp is not None:
            return await self.ext.post_resp(ex, self.proxy, plugins.ext_plugin_post_resp)
        return await self.proxy.forward(ex)

    def _filters(self, ex: Exchange, reply: Reply) -> None:
        """The header and body filters of the route's plugins, by priority."""
        ex.status = reply.status
        reply.headers.setdefault(REQUEST_ID_HEADER, ex.request_id)
        for name, value in ex.resp_headers.get("ext-plugin-pre-req", ()):
            reply.headers.add(name, value)
        rule = ex.route.rewrite
        if rule is not None:
            rewrite.apply(rule, reply, lambda name: variables.lookup(ex, name))
        for name, value in ex.resp_headers.get("ext-plugin-post-req", ()):
            reply.headers.add(name, value)
        ex.status = reply.status

    @staticmethod
    def _log(
        request: web.Request, ex: Exchange | None, reply: Reply | None, started: float
    ) -> None:
        access_log.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "route": ex.route.id if ex else None,
                "consumer": ex.consumer if ex else None,
                "status": reply.status if reply is not None else 500,
                "upstream_status": ex.upstream_status if ex else None,
                "ms": round((time.perf_counter() - started) * 1000, 2),
                "bytes": reply.body_bytes_sent if reply is not None else 0,
            },
        )
