"""One client request as it moves through the phases, and what the phases change in it.

APISIX keeps this state in nginx variables and its per-request context: the request headers and
query args as plugins rewrote them, the upstream URI and Host a Rewrite set, the consumer key-auth
found, the response headers a Rewrite asked for. Keeping it in one object makes the phase order
explicit and gives ``variables`` one place to answer ``$name`` questions from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_plus

from aiohttp import web
from multidict import CIMultiDict

from devgateway.conf import Route

Args = list[tuple[str, str | None]]
"""Query args in order; a value of ``None`` is an arg without ``=`` (``?flag``)."""


class BodyTooLarge(Exception):
    """The body passed client-control's ``max_body_size`` while being read."""


def parse_args(raw_query: str) -> Args:
    """Split a raw query string the way ``ngx.req.get_uri_args`` does (``+`` is a space)."""
    args: Args = []
    for part in raw_query.split("&"):
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not name:
            continue  # nginx drops args without a name
        args.append((unquote_plus(name), unquote_plus(value) if eq else None))
    return args


def encode_args(args: Args) -> str:
    """A query string from args, as ``ngx.encode_args`` writes it."""
    return "&".join(
        quote(name, safe="") + ("" if value is None else "=" + quote(value, safe=""))
        for name, value in args
    )


@dataclass
class Exchange:
    request: web.Request
    route: Route
    request_id: str  # X-Request-Id: the client's, or a new uuid4
    nginx_request_id: str  # nginx's $request_id: 32 hex digits, new for each request
    headers: CIMultiDict[str]  # the request headers as the plugins left them
    args: Args
    args_changed: bool = False
    upstream_path: str | None = None  # set by a Rewrite's path (already URI-encoded)
    upstream_host: str | None = None  # set by a Rewrite's host header
    body: bytes | None = None  # None: not read yet
    consumer: str | None = None
    # Rewrite resp_headers, per ext-plugin phase: APISIX adds them in each phase's header filter.
    resp_headers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    status: int | None = None  # of the response, once there is one
    upstream_status: int | None = None
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def begin(
        cls, request: web.Request, route: Route, request_id: str, nginx_request_id: str
    ) -> Exchange:
        return cls(
            request=request,
            route=route,
            request_id=request_id,
            nginx_request_id=nginx_request_id,
            headers=CIMultiDict(request.headers),
            args=parse_args(request.rel_url.raw_query_string),
        )

    @property
    def uri(self) -> str:
        """nginx's ``$uri``: the decoded path the route matched."""
        return self.request.path

    def query_string(self) -> str:
        """The query as it goes upstream: the client's bytes unless a plugin changed the args."""
        if not self.args_changed:
            return self.request.rel_url.raw_query_string
        return encode_args(self.args)

    def set_args(self, args: Args) -> None:
        self.args = args
        self.args_changed = True

    def host_header(self) -> str | None:
        """APISIX's ``$upstream_host`` before a node is picked: the client's Host, or a
        Rewrite's."""
        return self.upstream_host if self.upstream_host is not None else self.headers.get("Host")

    async def read_body(self, limit: int | None = None) -> bytes:
        """The request body, read once (``limit``: client-control's ``max_body_size``)."""
        if self.body is None:
            chunks: list[bytes] = []
            size = 0
            async for chunk in self.request.content.iter_any():
                size += len(chunk)
                if limit and size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
            self.body = b"".join(chunks)
        return self.body

    @property
    def peer(self) -> tuple[str, int] | None:
        transport = self.request.transport
        peer = transport.get_extra_info("peername") if transport else None
        return (str(peer[0]), int(peer[1])) if peer else None
