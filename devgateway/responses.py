"""Responses as APISIX and nginx write them, and sending one to the client.

Whatever ends a request (the upstream, a plugin's exit, nginx's own error) becomes a ``Reply``
first, so the header and body filters (ext-plugin ``resp_headers``, response-rewrite) run on every
response the same way, as APISIX's do. The bodies match what clients of real APISIX see:
plugin exits with a table body are compact JSON plus a newline under nginx's default type
``text/plain; charset=utf-8`` (``{"error_msg":"404 Route Not Found"}``), and a bare status
(``return 503``, an unreachable upstream) is nginx's HTML error page with APISIX's footer.
Upstream bodies stream through chunk by chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

log = logging.getLogger("devgateway")

SERVER = "APISIX"  # APISIX's Server header with enable_server_tokens off (we have no version)
DEFAULT_TYPE = "text/plain; charset=utf-8"  # nginx's default_type with APISIX's charset

# nginx's reason phrases, where they differ from the usual ones.
REASONS = {
    302: "Moved Temporarily",
    413: "Request Entity Too Large",
    414: "Request-URI Too Large",
    416: "Requested Range Not Satisfiable",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}
_TITLES = {
    400: "Bad Request",
    401: "Authorization Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Not Allowed",
    413: "Request Entity Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}
# Hop-by-hop headers, and what nginx hides from upstream responses by default (Server is its
# own; Date passes, as APISIX sets proxy_pass_header Date).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_HIDDEN_UPSTREAM = frozenset({"server", "x-pad"})


@dataclass
class Reply:
    """A response before the filters: a complete body, or an upstream answer still to stream."""

    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    upstream: aiohttp.ClientResponse | None = None
    source: str = "apisix"  # apisix | nginx | upstream | runner
    body_bytes_sent: int = 0  # nginx's $body_bytes_sent, once sent

    def replace_body(self, body: bytes) -> None:
        """Send ``body`` instead; an upstream body not yet read is dropped."""
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        self.body = body

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None


def apisix_exit(status: int, body: dict[str, Any]) -> Reply:
    """``core.response.exit(status, {table})``: JSON and a newline, nginx's default type."""
    headers = CIMultiDict({"Content-Type": DEFAULT_TYPE})
    return Reply(status, headers, orjson.dumps(body) + b"\n")


def nginx_page(status: int, source: str = "nginx") -> Reply:
    """nginx's error page for a bare status (``return 503`` from a plugin, 502 from proxying)."""
    title = f"{status} {_TITLES.get(status, REASONS.get(status, ''))}".rstrip()
    body = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>openresty</center>\r\n"
        '<p><em>Powered by <a href="https://apisix.apache.org/">APISIX</a>.</em></p></body>\r\n'
        "</html>\r\n"
    ).encode()
    return Reply(
        status, CIMultiDict({"Content-Type": "text/html; charset=utf-8"}), body, None, source
    )


def from_upstream(upstream: aiohttp.ClientResponse) -> Reply:
    """The upstream's answer, headers filtered as nginx's proxy module does, body to stream."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in _HIDDEN_UPSTREAM or lower.startswith("x-accel-"):
            continue
        headers.add(name, value)
    return Reply(upstream.status, headers, b"", upstream, "upstream")


async def send(reply: Reply, request: web.Request) -> web.StreamResponse:
    """Write ``reply`` to the client; an upstream body goes out chunk by chunk as it arrives."""
    headers = reply.headers
    headers.setdefault("Server", SERVER)
    reason = REASONS.get(reply.status)
    upstream = reply.upstream
    if upstream is None:
        headers.popall("Content-Length", None)
        resp = web.Response(status=reply.status, reason=reason, headers=headers, body=reply.body)
        await resp.prepare(request)
        await resp.write_eof()
        reply.body_bytes_sent = 0 if request.method == "HEAD" else len(reply.body)
        return resp
    stream = web.StreamResponse(status=reply.status, reason=reason, headers=headers)
    try:
        await stream.prepare(request)
        if request.method != "HEAD":
            async for chunk in upstream.content.iter_any():
                await stream.write(chunk)
                reply.body_bytes_sent += len(chunk)
        await stream.write_eof()
    except (aiohttp.ClientError, TimeoutError) as exc:
        # The upstream broke off mid-answer. nginx then closes the client connection without
        # ending the body, so the client sees a truncated answer rather than a complete one.
        log.warning("upstream answer broke off: %s", type(exc).__name__)
        if request.transport is not None:
            request.transport.close()
    except ConnectionError:
        pass  # the client went away; nothing more to send
    finally:
        if upstream.content.is_eof():
            upstream.release()  # the connection goes back to the pool
        else:
            upstream.close()
    return stream
