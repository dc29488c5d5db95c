"""APISIX's ``key-auth``: find the consumer from an API key, or answer 401.

As APISIX 3.x does it: the key is the header named by ``header`` (default ``apikey``), else the
query arg named by ``query`` (default ``apikey``); a header that is present but empty is still
"a key" (an invalid one), as in Lua. No key: 401 ``{"message":"Missing API key in request"}``; a
key no consumer has: 401 ``{"message":"Invalid API key in request"}``. On success the consumer
becomes the ``consumer_name`` variable, the upstream gets ``X-Consumer-Username`` (a client's
own copy is replaced), and with ``hide_credentials`` the header or arg the key came from is
removed before anything later (the post-req runner, the upstream) sees it.
"""

from __future__ import annotations

import logging

from devgateway.conf import KeyAuth
from devgateway.exchange import Exchange
from devgateway.responses import Reply, apisix_exit

log = logging.getLogger("devgateway")


def authenticate(ex: Exchange, conf: KeyAuth, consumers: dict[str, str]) -> Reply | None:
    """``None`` when the request may go on (``ex.consumer`` set), else the 401 to answer."""
    key = ex.headers.get(conf.header)
    from_header = key is not None
    if key is None:
        for name, value in ex.args:
            if name == conf.query:
                # An arg without value is Lua's true: a key, and not one any consumer has.
                key = "\0" if value is None else value
                break
    if key is None:
        return apisix_exit(401, {"message": "Missing API key in request"})
    consumer = consumers.get(key)
    if consumer is None:
        log.info("key-auth: no consumer has the key given", extra={"route": ex.route.id})
        return apisix_exit(401, {"message": "Invalid API key in request"})
    ex.consumer = consumer
    if conf.hide_credentials:
        if from_header:
            ex.headers.popall(conf.header, None)
        else:
            ex.set_args([(k, v) for k, v in ex.args if k != conf.query])
    # APISIX's attach_consumer: set from the consumer, so a client cannot send its own. There
    # are no credential objects or labels here, so those two headers are always removed.
    ex.headers["X-Consumer-Username"] = consumer
    ex.headers.popall("X-Credential-Identifier", None)
    ex.headers.popall("X-Consumer-Custom-Id", None)
    return None
