"""What the plugin chain learned about a request, sealed for the sidecar.

The plugins decide in the runner; the sidecar acts on some of their findings after the provider
answers: whose usage it was (ledger, quota reconciliation), whether that consumer opted out of
logging, where to write the answer in the cache, which output detectors to run and which masked
personal data to put back. Those facts travel in one request header, ``x-deepgate-facts``,
encrypted and authenticated with AES-GCM under a key derived from ``DEEPGATE_ROUTE_KEY`` (the key
that already signs route decisions). The request id is bound in as associated data and the value
expires, so a client can neither read, forge nor replay it; the personal data a mask replaced
never travels in clear.

``Facts`` lists every key once; plugins fill what they know, the sidecar reads what it needs.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from typing import Any, TypedDict

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from deepgate import unique
from deepgate.route_signature import gateway_only

HEADER = "x-deepgate-facts"
_KEY_LABEL = b"deepgate-facts-v1"
_NONCE_BYTES = 12


class Facts(TypedDict, total=False):
    """Every fact the plugin chain may hand to the sidecar (all optional)."""

    consumer: str  # APISIX consumer_name
    groups: list[str]  # the consumer's groups (policy)
    labels: dict[str, str]  # the consumer's labels, e.g. team or cost centre (policy)
    route: str  # APISIX route id
    alias: str  # the model the client asked for
    log_opt_out: bool  # the consumer opted out of prompt/answer logging (policy)
    reservation: dict[str, Any]  # quota reservation to reconcile with real usage (policy)
    cache: dict[str, Any]  # where and how long to write the answer (cache)
    cache_status: str  # hit-exact | hit-semantic | miss | bypass (cache)
    safety_output: dict[str, Any]  # output detectors to run on the answer (safety)
    restore: dict[str, str]  # placeholder -> original text masked in the prompt (safety)
    findings: list[str]  # detectors that fired on the prompt (safety)
    rag: dict[str, Any]  # collection and chunk ids added to the prompt (rag)
    # Read by later plugins of the chain (the router above all):
    allowed_regions: list[str]  # provider regions this consumer may reach (policy)
    allowed_providers: list[str]  # providers this consumer may reach (policy)
    personal_data_rule: str  # allow | local | refuse: prompts with personal data (policy)
    personal_data_found: bool  # the prompt carries personal data (safety)
    prompt_tokens: int  # the prompt's token count, counted once by whichever plugin counts first
    exp: int  # unix seconds after which the sidecar refuses the facts (set by seal)


@functools.lru_cache(maxsize=8)
def _aead(route_key: bytes) -> AESGCM:
    return AESGCM(hashlib.sha256(_KEY_LABEL + route_key).digest())


def seal(route_key: bytes, request_id: str, facts: Facts, ttl_s: float = 600.0) -> str:
    """The header value carrying ``facts`` for request ``request_id``."""
    payload = dict(facts)
    payload["exp"] = int(time.time() + ttl_s)
    nonce = unique.nonce()
    sealed = _aead(route_key).encrypt(nonce, orjson.dumps(payload), request_id.encode())
    return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def unseal(route_key: bytes, request_id: str, value: str | None, now: float | None = None) -> Facts:
    """The facts of request ``request_id``; empty when the header is absent.

    A value that was forged, tampered with, made for another request or expired is refused with
    ``AuthenticationFailed``: only the gateway's plugin chain can state facts.
    """
    if not value:
        return Facts()
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        nonce, sealed = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        payload: dict[str, Any] = orjson.loads(
            _aead(route_key).decrypt(nonce, sealed, request_id.encode())
        )
    except (ValueError, InvalidTag, orjson.JSONDecodeError):
        raise gateway_only("the facts header does not verify") from None
    if int(payload.get("exp", 0)) < (time.time() if now is None else now):
        raise gateway_only("the facts header has expired")
    payload.pop("exp", None)
    facts: Facts = payload  # type: ignore[assignment]
    return facts
