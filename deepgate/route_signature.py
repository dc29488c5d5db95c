"""Signed route decisions: the plugin runner decides, the sidecar verifies.

The router plugin picks the chain of targets a request may use and sends it to the sidecar in
the ``x-deepgate-route`` request header, signed with HMAC-SHA256 under a key both share
(``DEEPGATE_ROUTE_KEY``). The signature covers the request id, the chain and an expiry, so a
client that reaches the sidecar directly can neither pick its own route nor replay another
request's decision for long.

Header value: ``<provider:model>[,<provider:model>...];exp=<unix seconds>;sig=<hex>``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from typing import Any

from deepgate.errors import AuthenticationFailed

HEADER = "x-deepgate-route"
_VERSION = b"deepgate-route-v1"


def _mac(key: bytes, request_id: str, chain: str, exp: int) -> str:
    message = b"\n".join((_VERSION, request_id.encode(), chain.encode(), str(exp).encode()))
    inner, outer = _pads(key)
    i = inner.copy()
    i.update(message)
    o = outer.copy()
    o.update(i.digest())
    signature: str = o.hexdigest()
    return signature


@functools.lru_cache(maxsize=8)
def _pads(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256 (RFC 2104) with the keyed inner and outer states made once per key: a
    signature then costs two hash copies instead of keying HMAC again (~0.6 µs vs ~1.5)."""
    block = hashlib.sha256(key).digest() if len(key) > 64 else key
    block = block.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
    return inner, outer


def sign_route(
    key: bytes, request_id: str, targets: list[str], ttl_s: float = 60.0, now: float | None = None
) -> str:
    """The header value that lets ``targets`` serve request ``request_id`` for ``ttl_s``."""
    chain = ",".join(targets)
    exp = int((time.time() if now is None else now) + ttl_s)
    return f"{chain};exp={exp};sig={_mac(key, request_id, chain, exp)}"


def verify_route(
    key: bytes, request_id: str, value: str | None, now: float | None = None
) -> list[str]:
    """The signed chain, or ``AuthenticationFailed`` when missing, forged or expired."""
    if not value:
        raise gateway_only("the request carries no signed route")
    chain, _, rest = value.partition(";")
    fields = dict(part.partition("=")[::2] for part in rest.split(";") if part)
    try:
        exp = int(fields.get("exp", ""))
    except ValueError:
        raise gateway_only("the route header is malformed") from None
    expected = _mac(key, request_id, chain, exp)
    if not hmac.compare_digest(expected, fields.get("sig", "")):
        raise gateway_only("the route signature does not match")
    if exp < (time.time() if now is None else now):
        raise gateway_only("the route signature has expired")
    targets = [t for t in chain.split(",") if t]
    if not targets:
        raise gateway_only("the signed route names no target")
    return targets


def gateway_only(why: str) -> AuthenticationFailed:
    """The refusal of a request that did not come through the gateway's plugin chain."""
    return AuthenticationFailed(
        f"This endpoint only serves requests routed by the gateway: {why}. Send requests "
        "through APISIX, not to the sidecar directly.",
        code="invalid_route_signature",
    )
