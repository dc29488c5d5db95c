"""Proxying to a route's upstream, as APISIX's balancer and nginx's proxy module do it.

- Nodes are picked by weighted round robin (the interleaved algorithm of ``resty.roundrobin``),
  with state per upstream. A node that cannot be reached is not asked again for that request; the
  next one is, up to ``retries`` more tries (default: every other node once).
- The request goes with the headers the plugins left (hop-by-hop ones dropped), ``Host`` by
  ``pass_host`` (``pass``, APISIX's default, keeps the client's Host or the one a Rewrite set;
  ``node`` uses the node; ``rewrite`` uses ``upstream_host``), ``X-Real-IP`` and the
  ``X-Forwarded-*`` headers of APISIX's nginx.conf, and the body the plugins left (nginx buffers
  request bodies, so it is sent whole with its length).
- Timeouts come from the upstream's ``timeout``: ``connect`` for the connection, ``read`` between
  two reads (the answer's head included); ``send`` bounds the sending of the request, which here
  is also bounded by reading the answer's head (one client call does both). No node reachable:
  502; a timeout: 504; both with nginx's error page.
- The answer comes back as a ``Reply`` whose body streams to the client as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import math
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from devgateway.conf import Node, Upstream
from devgateway.exchange import Exchange
from devgateway.responses import HOP_BY_HOP, Reply, from_upstream, nginx_page
from devgateway.variables import lookup, nginx_host

log = logging.getLogger("devgateway")

_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}
_URI_SAFE = "!#$&'()*+,/:;=?@[]~%"  # what core.utils.uri_safe_encode leaves alone


class RoundRobin:
    """Interleaved weighted round robin: each node in turn, weight times per cycle."""

    def __init__(self, nodes: tuple[Node, ...]) -> None:
        self.nodes = nodes
        self._gcd = math.gcd(*(n.weight for n in nodes)) if nodes else 1
        self._max = max((n.weight for n in nodes), default=0)
        self._i = -1
        self._cw = 0

    def next(self) -> Node:
        while True:
            self._i = (self._i + 1) % len(self.nodes)
            if self._i == 0:
                self._cw -= self._gcd
                if self._cw <= 0:
                    self._cw = self._max
            if self.nodes[self._i].weight >= self._cw:
                return self.nodes[self._i]

    def pick(self, tried: set[Node]) -> Node:
        """The next node not tried yet for this request (or any, if all were)."""
        for _ in range(sum(n.weight for n in self.nodes) // self._gcd):
            node = self.next()
            if node not in tried:
                return node
        return self.next()


def upstream_path(ex: Exchange) -> str:
    """The path and query the upstream receives."""
    query = ex.query_string()
    if ex.upstream_path is not None:
        path = ex.upstream_path
    elif not ex.args_changed:
        return ex.request.raw_path  # the client's bytes, as nginx passes them
    else:
        path = ex.request.raw_path.partition("?")[0]
    return path + (f"?{query}" if query else "")


def encode_path(path: str) -> str:
    """A Rewrite's path made safe for the request line (``core.utils.uri_safe_encode``)."""
    return quote(path, safe=_URI_SAFE)


def host_for(ex: Exchange, upstream: Upstream, node: Node) -> str | None:
    if upstream.pass_host == "node":  # noqa: S105 - pass_host is not a password
        return node.host if node.port in (80, 443) else f"{node.host}:{node.port}"
    if upstream.pass_host == "rewrite":  # noqa: S105
        return upstream.upstream_host
    return ex.host_header()


def forwarded_headers(ex: Exchange) -> CIMultiDict[str]:
    """The request headers for the upstream, with the ones APISIX's nginx.conf sets."""
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in ex.headers.items() if k.lower() not in _NOT_FORWARDED
    )
    remote = lookup(ex, "remote_addr") or ""
    prior = ", ".join(ex.request.headers.getall("X-Forwarded-For", []))
    headers["X-Real-IP"] = remote
    headers["X-Forwarded-For"] = f"{prior}, {remote}" if prior else remote
    # APISIX keeps the client's X-Forwarded-Proto/Host/Port, else fills in its own.
    headers["X-Forwarded-Proto"] = ex.request.headers.get("X-Forwarded-Proto", ex.request.scheme)
    headers["X-Forwarded-Host"] = ex.request.headers.get("X-Forwarded-Host", nginx_host(ex.request))
    headers["X-Forwarded-Port"] = ex.request.headers.get(
        "X-Forwarded-Port", lookup(ex, "server_port") or ""
    )
    return headers


def _has_body(ex: Exchange, body: bytes) -> bool:
    sent = ex.request.headers
    return bool(body) or "Content-Length" in sent or "Transfer-Encoding" in sent


class Proxy:
    """One pooled client session for every upstream, and the balancers' state."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self._balancers: dict[str, RoundRobin] = {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            auto_decompress=False,
            # Send what the client sent, not aiohttp's defaults.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _balancer(self, upstream: Upstream) -> RoundRobin:
        found = self._balancers.get(upstream.key)
        if found is None:
            found = self._balancers[upstream.key] = RoundRobin(upstream.nodes)
        return found

    async def _request(
        self,
        ex: Exchange,
        node: Node,
        headers: CIMultiDict[str],
        body: bytes,
        connect_s: float,
        send_s: float,
        read_s: float,
    ) -> aiohttp.ClientResponse:
        assert self.session is not None
        host = f"[{node.host}]" if ":" in node.host else node.host
        url = URL(f"http://{host}:{node.port}{upstream_path(ex)}", encoded=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)
        async with asyncio.timeout(connect_s + send_s + read_s):
            return await self.session.request(
                ex.request.method,
                url,
                headers=headers,
                data=body if _has_body(ex, body) else None,
                timeout=timeout,
                allow_redirects=False,
            )

    async def forward(self, ex: Exchange) -> Reply:
        """Send the request to a node of the route's upstream; the answer, or nginx's 502/504."""
        up = ex.route.upstream
        body = await ex.read_body()
        headers = forwarded_headers(ex)
        balancer = self._balancer(up)
        tried: set[Node] = set()
        failure = 502
        for _ in range(1 + up.retries):
            node = balancer.pick(tried)
            tried.add(node)
            host = host_for(ex, up, node)
            if host is None:
                headers.popall("Host", None)
            else:
                headers["Host"] = host
            try:
                answer = await self._request(
                    ex, node, headers, body, up.connect_s, up.send_s, up.read_s
                )
            except aiohttp.ConnectionTimeoutError:
                failure = 504  # cannot connect in time: try the next node
                log.warning("upstream %s:%s: connect timed out", node.host, node.port)
                continue
            except aiohttp.ClientConnectorError as exc:
                failure = 502  # refused or unreachable: try the next node
                log.warning(
                    "upstream %s:%s: cannot connect (%s)", node.host, node.port, exc.strerror
                )
                continue
            except TimeoutError:
                log.warning("upstream %s:%s: timed out", node.host, node.port)
                return nginx_page(504)
            except aiohttp.ClientError as exc:
                log.warning("upstream %s:%s: %s", node.host, node.port, type(exc).__name__)
                return nginx_page(502)
            ex.upstream_status = answer.status
            return from_upstream(answer)
        return nginx_page(failure)

    async def fetch_direct(self, ex: Exchange) -> aiohttp.ClientResponse:
        """ext-plugin-post-resp's own call (lua-resty-http in APISIX): one node, the request
        headers as the plugins left them (no X-Forwarded-*, Host as is), 60 s timeouts."""
        up = ex.route.upstream
        body = await ex.read_body()
        node = self._balancer(up).pick(set())
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in ex.headers.items() if k.lower() not in _NOT_FORWARDED - {"host"}
        )
        answer = await self._request(ex, node, headers, body, 60.0, 60.0, 60.0)
        ex.upstream_status = answer.status
        return answer
