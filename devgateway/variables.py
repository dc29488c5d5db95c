"""The nginx and APISIX variables (``$name``) of one request.

The runner asks for them with ExtraInfo ``Var`` (``consumer_name``, ``remote_addr``, ...),
response-rewrite's ``vars`` compare them and its header values interpolate them. APISIX answers
from ``ctx.var``; this module answers the same names from the ``Exchange``. Names it does not know
answer nothing at run time (as an unknown nginx variable does), and a config that names one is
refused at start-up, so a rule never silently depends on a variable devgateway cannot fill.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from devgateway.exchange import Exchange

KNOWN = frozenset(
    {
        "uri",
        "request_uri",
        "args",
        "query_string",
        "is_args",
        "request_method",
        "host",
        "remote_addr",
        "remote_port",
        "binary_remote_addr",
        "server_addr",
        "server_port",
        "scheme",
        "server_protocol",
        "content_type",
        "content_length",
        "request_id",
        "consumer_name",
        "route_id",
        "route_name",
        "upstream_uri",
        "upstream_host",
        "status",
        "upstream_status",
    }
)
PREFIXES = ("http_", "arg_", "cookie_")


def is_known(name: str) -> bool:
    return name in KNOWN or any(name.startswith(p) and len(name) > len(p) for p in PREFIXES)


def nginx_host(request: web.Request) -> str:
    """nginx's ``$host``: the Host header, lower-case, without port (else the local address)."""
    raw = request.headers.get("Host", "")
    if raw.startswith("["):
        host = raw[: raw.find("]") + 1] if "]" in raw else raw
    else:
        host = raw.partition(":")[0]
    host = host.lower().rstrip(".")
    if host:
        return host
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return str(sock[0]) if sock else "localhost"


def _sockname(ex: Exchange) -> tuple[str, int] | None:
    transport = ex.request.transport
    sock = transport.get_extra_info("sockname") if transport else None
    return (str(sock[0]), int(sock[1])) if sock else None


def lookup(ex: Exchange, name: str) -> str | None:
    """The variable's value as text, or ``None`` when it is not set."""
    req = ex.request
    if name.startswith("http_"):
        values = ex.headers.getall(name[5:].replace("_", "-"), [])
        return ", ".join(values) if values else None
    if name.startswith("arg_"):
        for key, value in ex.args:
            if key == name[4:]:
                # APISIX stringifies an arg without value (Lua's true) as "true".
                return "true" if value is None else value
        return None
    if name.startswith("cookie_"):
        return req.cookies.get(name[7:])
    peer, sock = ex.peer, _sockname(ex)
    query = ex.query_string()
    if name == "uri":
        return ex.uri
    if name == "request_uri":
        return req.raw_path
    if name in ("args", "query_string"):
        return query or None
    if name == "is_args":
        return "?" if query else ""
    if name == "request_method":
        return req.method
    if name == "host":
        return nginx_host(req)
    if name == "remote_addr":
        return peer[0] if peer else None
    if name == "remote_port":
        return str(peer[1]) if peer else None
    if name == "server_addr":
        return sock[0] if sock else None
    if name == "server_port":
        return str(sock[1]) if sock else None
    if name == "scheme":
        return req.scheme
    if name == "server_protocol":
        return f"HTTP/{req.version.major}.{req.version.minor}"
    if name == "content_type":
        return ex.headers.get("Content-Type")
    if name == "content_length":
        return ex.headers.get("Content-Length")
    if name == "request_id":
        return ex.nginx_request_id
    if name == "consumer_name":
        return ex.consumer
    if name == "route_id":
        return ex.route.id
    if name == "route_name":
        return ex.route.name
    if name == "upstream_uri":
        return ex.upstream_path
    if name == "upstream_host":
        return ex.host_header()
    if name == "status":
        return str(ex.status) if ex.status is not None else None
    if name == "upstream_status":
        return str(ex.upstream_status) if ex.upstream_status is not None else None
    return None


def lookup_bytes(ex: Exchange, name: str) -> bytes | None:
    """The value as the runner receives it in an ExtraInfo answer."""
    if name == "binary_remote_addr":
        peer = ex.peer
        try:
            return ipaddress.ip_address(peer[0]).packed if peer else None
        except ValueError:
            return None
    value = lookup(ex, name)
    return None if value is None else value.encode("utf-8", "surrogateescape")
