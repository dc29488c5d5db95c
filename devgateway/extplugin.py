"""The three ext-plugin phases: build the calls as APISIX does, and apply what the runner answers.

``ext-plugin-pre-req`` (before auth) and ``ext-plugin-post-req`` (after auth) send an HTTPReqCall:
a per-worker id, the client address as raw bytes, the method, the path (the upstream path once a
Rewrite set one), the args and the lower-case headers expanded one entry per value, where ``host``
carries ``$upstream_host`` (the client's Host until a Rewrite changes it). The runner's ExtraInfo
questions get ``Var`` values from ``variables`` and the raw body for ``ReqBody``.

Its answer: ``Stop`` ends the request (status 0 is 200, the Stop's headers set in order, the body
if non-empty, and ``text/plain; charset=utf-8`` when the Stop names no content type, as observed
on APISIX). ``Rewrite`` is applied in APISIX's order: path, headers (no value deletes; ``host``
also sets the upstream Host), body (if non-empty; the length follows), ``resp_headers`` kept for
the response minus APISIX's forbidden list, args (each name given replaces that arg, repeats
append, no value deletes it).

``ext-plugin-post-resp`` calls the upstream itself, sends an HTTPRespCall with the status and
headers, answers ``RespBody`` with the whole upstream body, and applies the reply: a non-empty body
replaces the answer (with the reply's headers, if any, and status, 0 meaning the upstream's);
otherwise the upstream answer goes on with the reply's status, if any.

A runner that cannot be reached, times out, answers BAD_REQUEST, SERVICE_UNAVAILABLE, a frame of
the wrong type or garbage makes the phase answer 503, unless its conf has ``allow_degradation``,
which skips the plugin instead. (CONF_TOKEN_NOT_FOUND is retried by the driver first.)
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from multidict import CIMultiDict

from devgateway import variables
from devgateway.conf import ExtPluginConf, Route
from devgateway.driver import ExtPluginDriver, PluginChain, RunnerError
from devgateway.exchange import Exchange
from devgateway.responses import DEFAULT_TYPE, HOP_BY_HOP, Reply, from_upstream, nginx_page
from devgateway.upstream import Proxy, encode_path
from plugins.runner import codec
from plugins.runner.codec import ProtocolError

log = logging.getLogger("devgateway")

_unknown_vars: set[str] = set()

RUNNER_FAILURES = (RunnerError, OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError)
# What a Rewrite's resp_headers may not set (APISIX drops these).
RESP_HEADERS_DENIED = frozenset(
    {
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
)
# Upstream headers ext-plugin-post-resp does not pass on (APISIX's exclude list).
_POST_RESP_EXCLUDED = HOP_BY_HOP | {"content-length", "apisix-cache-status", "date", "server"}


def var_answer(ex: Exchange, name: str) -> bytes | None:
    """A ``Var`` answer; a variable devgateway does not fill is unset (said once in the log)."""
    if not variables.is_known(name) and name not in _unknown_vars:
        _unknown_vars.add(name)
        log.warning("the runner asked for $%s, which devgateway does not imitate: unset", name)
    return variables.lookup_bytes(ex, name)


def chain_for(route: Route, phase: str, conf: ExtPluginConf) -> PluginChain:
    """The plugin list APISIX prepares for a route's phase, with its PrepareConf key."""
    entries = tuple((e.name, e.value) for e in conf.conf or ())
    return PluginChain(f"route#routes#{route.id}#{phase}#0", entries)


def build_call(ex: Exchange) -> codec.HTTPReqCallReq:
    """An HTTPReqCall for the request as it stands (the driver sets id and token)."""
    method = codec.Method.__members__.get(ex.request.method)
    if method is None:
        raise RunnerError(f"method {ex.request.method} has no code in the protocol")
    host = ex.host_header()
    headers: list[tuple[str, str | None]] = [
        (name.lower(), host if name.lower() == "host" and host is not None else value)
        for name, value in ex.headers.items()
    ]
    return codec.HTTPReqCallReq(
        id=0,
        conf_token=0,
        method=method,
        path=ex.upstream_path if ex.upstream_path is not None else ex.uri,
        src_ip=variables.lookup_bytes(ex, "binary_remote_addr") or b"",
        args=list(ex.args),
        headers=headers,
    )


def stop_reply(stop: codec.Stop) -> Reply:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in stop.headers:
        if value is None:
            headers.popall(name, None)
        else:
            headers[name] = value  # core.response.set_header: a later entry replaces
    headers.setdefault("Content-Type", DEFAULT_TYPE)
    return Reply(stop.status or 200, headers, stop.body, None, "runner")


def apply_rewrite(ex: Exchange, rw: codec.Rewrite, phase: str) -> None:
    if rw.path:
        ex.upstream_path = encode_path(rw.path)
    for name, value in rw.headers:
        if value is None:
            ex.headers.popall(name, None)
        else:
            ex.headers[name] = value
        if name.lower() == "host":
            ex.upstream_host = value
    if rw.body:
        ex.body = rw.body  # the upstream request's Content-Length follows the new body
    kept = ex.resp_headers.setdefault(phase, [])
    for name, value in rw.resp_headers:
        if value is not None and name.lower() not in RESP_HEADERS_DENIED:
            kept.append((name, value))
    if rw.args:
        args = list(ex.args)
        changed: set[str] = set()
        for name, value in rw.args:
            if value is None:
                args = [(k, v) for k, v in args if k != name]
            elif name in changed:
                args.append((name, value))
            else:
                at = next((i for i, (k, _) in enumerate(args) if k == name), len(args))
                args = (
                    [(k, v) for k, v in args[:at] if k != name]
                    + [(name, value)]
                    + [(k, v) for k, v in args[at:] if k != name]
                )
                changed.add(name)
        ex.set_args(args)


class ExtPlugins:
    """The ext-plugin phases of every route, over one driver (one socket, one token cache)."""

    def __init__(self, driver: ExtPluginDriver) -> None:
        self.driver = driver
        self._chains: dict[tuple[str, str], PluginChain] = {}

    def _chain(self, route: Route, phase: str, conf: ExtPluginConf) -> PluginChain:
        key = (route.id, phase)
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = chain_for(route, phase, conf)
        return chain

    @staticmethod
    def _degraded(ex: Exchange, phase: str, conf: ExtPluginConf, exc: BaseException) -> bool:
        """Log a runner failure; whether the request goes on without the plugin."""
        detail = str(exc) if isinstance(exc, RunnerError) else type(exc).__name__
        if conf.allow_degradation:
            log.warning("%s failed (%s); allow_degradation: going on without it", phase, detail)
            return True
        log.error("%s failed on route %s: %s", phase, ex.route.id, detail)
        return False

    async def request_phase(self, ex: Exchange, phase: str) -> Reply | None:
        """Run pre-req or post-req; a Reply when the request ends here (Stop or failure)."""
        conf = ex.route.plugins.ext(phase)
        if conf is None:
            return None

        async def answer(info: codec.ExtraInfo) -> bytes | None:
            if isinstance(info, codec.Var):
                return var_answer(ex, info.name)
            if isinstance(info, codec.ReqBody):
                return (await ex.read_body()) or None
            raise RunnerError("unsupported info type: RespBody in a request phase")

        try:
            resp = await self.driver.req_call(
                self._chain(ex.route, phase, conf), build_call(ex), answer
            )
        except RUNNER_FAILURES as exc:
            return None if self._degraded(ex, phase, conf, exc) else nginx_page(503)
        if isinstance(resp.action, codec.Stop):
            return stop_reply(resp.action)
        if isinstance(resp.action, codec.Rewrite):
            apply_rewrite(ex, resp.action, phase)
        return None

    async def post_resp(self, ex: Exchange, proxy: Proxy, conf: ExtPluginConf) -> Reply:
        """Call the upstream, let the runner see (and maybe replace) the answer."""
        phase = "ext-plugin-post-resp"
        try:
            upstream = await proxy.fetch_direct(ex)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.error("%s: the upstream call failed: %s", phase, type(exc).__name__)
            return nginx_page(502)
        try:
            return await self._resp_call(ex, upstream, phase, conf)
        except aiohttp.ClientError as exc:  # the upstream body broke off while read for RespBody
            upstream.close()
            log.error("%s: reading the upstream answer failed: %s", phase, type(exc).__name__)
            return nginx_page(502)
        except BaseException:
            upstream.close()
            raise

    async def _resp_call(
        self, ex: Exchange, upstream: aiohttp.ClientResponse, phase: str, conf: ExtPluginConf
    ) -> Reply:
        body: bytes | None = None

        async def answer(info: codec.ExtraInfo) -> bytes | None:
            nonlocal body
            if isinstance(info, codec.RespBody):
                if body is None:
                    body = await upstream.read()
                return body
            if isinstance(info, codec.Var):
                return var_answer(ex, info.name)
            return (await ex.read_body()) or None

        call = codec.HTTPRespCallReq(
            id=0,
            conf_token=0,
            status=upstream.status,
            headers=[(k.lower(), v) for k, v in upstream.headers.items()],
        )
        status: int | None = None
        new_headers: list[tuple[str, str | None]] = []
        try:
            reply = await self.driver.resp_call(self._chain(ex.route, phase, conf), call, answer)
        except RUNNER_FAILURES as exc:
            # APISIX then sends the upstream's answer, with status 503 unless degraded.
            status = None if self._degraded(ex, phase, conf, exc) else 503
        else:
            status, new_headers = reply.status or None, reply.headers
            if reply.body:
                upstream.close()
                headers = CIMultiDict(
                    (k, v)
                    for k, v in (new_headers or upstream.headers.items())
                    if v is not None and k.lower() not in _POST_RESP_EXCLUDED
                )
                return Reply(status or upstream.status, headers, reply.body, None, "runner")
        out = from_upstream(upstream)
        if new_headers:
            out.headers = CIMultiDict(
                (k, v)
                for k, v in new_headers
                if v is not None and k.lower() not in _POST_RESP_EXCLUDED
            )
        if body is not None:  # read for RespBody: send what was read
            out.upstream, out.body = None, body
            upstream.release()
        if status is not None:
            out.status = status
        return out
