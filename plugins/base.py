"""What a deepgate plugin is, and what it sees of a request.

A plugin is one module with a strict ``Config`` (validated once, when APISIX prepares the route's
conf) and an async handler. The handler reads the request through ``RequestContext`` and either
returns ``None`` (go on; any changes it made through the context become the Rewrite), returns a
``Stop`` (answer the client now), or raises a ``DeepgateError`` (answer with that error).

The context fetches what APISIX does not send up front (the body, variables) lazily, over the
same connection, at most once per call, and parses the body at most once: every plugin of the
chain shares the same parsed object, so a change one plugin makes is what the next one sees.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from deepgate.chat import Dialect, TextSlot, check_chat_body, dialect_for_path, text_slots
from deepgate.errors import DeepgateError, InvalidRequest
from deepgate.flags import FlagContext
from deepgate.request_facts import HEADER as FACTS_HEADER
from deepgate.request_facts import Facts, seal
from deepgate.unique import unique_id
from plugins.runner.codec import (
    Entries,
    ExtraInfo,
    HTTPReqCallReq,
    HTTPRespCallReq,
    ReqBody,
    RespBody,
    Rewrite,
    Stop,
    Var,
)

Ask = Callable[[ExtraInfo], Awaitable[bytes | None]]
"""Asks APISIX for a variable or a body over the call's connection."""

_UNSET: Any = object()

OnStop = Callable[[], Awaitable[None]]
"""Undoes what a plugin did when a later one stops the request (a quota reservation, say)."""


def _route_key() -> bytes | None:
    key = os.environ.get("DEEPGATE_ROUTE_KEY")
    return key.encode() if key else None


class PluginConfig(BaseModel):
    """Base of every plugin's config: strict, immutable, with the shared ``on_error`` rule.

    ``on_error``: what happens to the request when the plugin itself fails (a bug, a backend
    down): ``closed`` answers 500, ``open`` lets the request go on without the plugin.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    on_error: Literal["open", "closed"] = "closed"

    def private(self, name: str) -> Any:
        """A private attribute (what a validator compiled), read from pydantic's own dict: the
        plain attribute lookup costs ~1.3 µs, and the hot path reads these on every request."""
        return self.__pydantic_private__[name]  # type: ignore[index]


class RequestContext:
    """One HTTPReqCall as the plugins of its chain see it."""

    __slots__ = (
        "_ask",
        "_body",
        "_chat",
        "_headers",
        "_json",
        "_slots",
        "_vars",
        "body_changed",
        "call",
        "deferred",
        "dialect",
        "facts",
        "on_stop",
        "request_id",
        "rewrite_args",
        "rewrite_headers",
        "rewrite_path",
        "rewrite_resp_headers",
    )

    def __init__(self, call: HTTPReqCallReq, ask: Ask) -> None:
        self.call = call
        self._ask = ask
        self._body: bytes | None = _UNSET
        self._json: Any = _UNSET
        self._chat: dict[str, Any] | None = None  # the body, once checked as a chat request
        self._slots: list[TextSlot] | None = None  # its prompt texts
        self._vars: dict[str, str | None] = {}
        self._headers: dict[str, str] | None = None
        self.dialect: Dialect = dialect_for_path(call.path)
        self.body_changed = False
        self.rewrite_path: str | None = None
        self.rewrite_headers: Entries = []
        self.rewrite_args: Entries = []
        self.rewrite_resp_headers: Entries = []
        # The client's (or an earlier proxy's) id, else a fresh one: call ids repeat across
        # APISIX workers and restarts, and the ledger keys usage by this id.
        self.request_id = self.header("x-request-id") or unique_id()
        # What the chain learned, for later plugins and (sealed) for the sidecar.
        self.facts: Facts = Facts()
        self.on_stop: list[OnStop] = []
        self.deferred: list[Awaitable[None]] = []

    def defer(self, check: Awaitable[None]) -> None:
        """Finish a check later: the chain goes on while ``check`` waits on I/O it has already
        started (a quota reservation in Redis, say). The runner awaits it before the request is
        forwarded or answered; a refusal it raises is the answer, ahead of anything a later
        plugin decided, just as if the plugin had waited for it."""
        self.deferred.append(check)

    def header(self, name: str) -> str | None:
        """The first value of a request header (names are lower-case on the wire)."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for key, value in self.call.headers:
                if value is not None:
                    headers.setdefault(key.lower(), value)
            self._headers = headers
        return self._headers.get(name.lower())

    def know_var(self, name: str, value: str | None) -> None:
        """Record a variable the runner already knows, so asking for it costs no round trip."""
        self._vars[name] = value

    def answered(self, questions: tuple[ExtraInfo, ...], answers: list[bytes | None]) -> None:
        """What APISIX answered to questions the runner asked for the chain ahead of time."""
        for question, raw in zip(questions, answers, strict=True):
            if isinstance(question, Var):
                self._vars[question.name] = None if raw is None else raw.decode("utf-8", "replace")
            else:
                self._body = raw

    async def var(self, name: str) -> str | None:
        """An APISIX/nginx variable (``consumer_name``, ``remote_addr``, ...), asked once."""
        if name not in self._vars:
            raw = await self._ask(Var(name))
            self._vars[name] = None if raw is None else raw.decode("utf-8", "replace")
        return self._vars[name]

    async def body(self) -> bytes:
        """The raw request body (empty when there is none), asked of APISIX once."""
        if self._body is _UNSET:
            self._body = await self._ask(ReqBody())
        return self._body or b""

    async def json(self) -> Any:
        """The request body parsed as JSON, once for the whole chain."""
        if self._json is _UNSET:
            raw = await self.body()
            try:
                self._json = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise InvalidRequest(
                    "The request body is not valid JSON. Send a JSON object with "
                    "'Content-Type: application/json'."
                ) from None
        return self._json

    async def chat(self) -> dict[str, Any]:
        """The body checked as a chat request of the route's dialect (``InvalidRequest`` if it
        is not one), checked once for the chain until a plugin replaces the body."""
        body = await self.json()
        if self._chat is not body:
            self._chat = check_chat_body(body, self.dialect)
        return self._chat

    async def slots(self) -> list[TextSlot]:
        """The chat body's prompt texts (``text_slots``), listed once for the chain until a
        plugin replaces the body. A slot edits the body in place: ``slot.text = ...``."""
        body = await self.chat()
        if self._slots is None:
            self._slots = list(text_slots(body, self.dialect))
        return self._slots

    def parsed_json(self) -> Any:
        """The body as parsed so far by the chain, or ``None`` (never asks APISIX)."""
        return None if self._json is _UNSET else self._json

    def replace_json(self, value: Any) -> None:
        """Replace the whole parsed body (the next plugins see the new one)."""
        self._json = value
        self._chat = None  # edited in place or replaced: checked again when next asked
        self._slots = None
        self.body_changed = True

    async def flag_context(self) -> FlagContext:
        """Who the request is for feature flags: consumer, groups (policy), route and model."""
        model = self.facts.get("alias")
        if model is None:
            try:
                body = await self.json()
            except DeepgateError:  # not JSON: the plugins will say so
                body = None
            model = body.get("model") if isinstance(body, dict) else None
        return FlagContext(
            consumer=await self.var("consumer_name"),
            groups=tuple(self.facts.get("groups", ())),
            route=await self.var("route_id"),
            model=model if isinstance(model, str) else None,
        )

    def set_header(self, name: str, value: str | None) -> None:
        """Set (or, with ``None``, remove) a header on the way to the upstream."""
        self.rewrite_headers.append((name, value))

    def add_response_header(self, name: str, value: str) -> None:
        """Add a header to the response the client eventually gets."""
        self.rewrite_resp_headers.append((name, value))

    def rewrite(self) -> Rewrite | None:
        """The Rewrite this chain amounts to, or ``None`` when nothing changed.

        The facts the chain gathered travel to the sidecar sealed under the route key; a facts
        header the client sent itself is always dropped.
        """
        if self.facts or self.header(FACTS_HEADER) is not None:
            key = _route_key()
            sealed = seal(key, self.request_id, self.facts) if key and self.facts else None
            self.set_header(FACTS_HEADER, sealed)
        body = orjson.dumps(self._json) if self.body_changed else b""
        if not (
            body
            or self.rewrite_path
            or self.rewrite_headers
            or self.rewrite_args
            or self.rewrite_resp_headers
        ):
            return None
        return Rewrite(
            path=self.rewrite_path,
            headers=self.rewrite_headers,
            args=self.rewrite_args,
            resp_headers=self.rewrite_resp_headers,
            body=body,
        )


class ResponseContext:
    """One HTTPRespCall (APISIX's post-resp phase) as response hooks see it."""

    __slots__ = ("_ask", "_body", "call", "new_body", "new_headers", "new_status")

    def __init__(self, call: HTTPRespCallReq, ask: Ask) -> None:
        self.call = call
        self._ask = ask
        self._body: bytes | None = _UNSET
        self.new_status = 0
        self.new_headers: Entries = []
        self.new_body = b""

    async def body(self) -> bytes:
        """The whole upstream body (APISIX buffers it to answer), asked once."""
        if self._body is _UNSET:
            self._body = await self._ask(RespBody())
        return self._body or b""


RequestHandler = Callable[[RequestContext, Any], Awaitable[Stop | None]]
ResponseHandler = Callable[[ResponseContext, Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """A plugin as the runner knows it: its name as APISIX routes write it, config, hooks."""

    name: str
    config: type[PluginConfig]
    on_request: RequestHandler | None = None
    on_response: ResponseHandler | None = None
    # What the request handler always reads, fetched for the whole chain in one round trip.
    wants_vars: tuple[str, ...] = ()
    wants_body: bool = False


def error_stop(err: DeepgateError, dialect: Dialect, extra_headers: Entries | None = None) -> Stop:
    """A Stop that answers the client with ``err`` in its route's error shape.

    The content type is set explicitly: APISIX sends a Stop without one as ``text/plain``.
    ``extra_headers`` are response headers earlier plugins added (rate-limit headers, say).
    """
    body = err.to_anthropic() if dialect == "anthropic" else err.to_openai()
    headers: Entries = [("content-type", "application/json")]
    headers.extend(err.http_headers().items())
    headers.extend(extra_headers or ())
    return Stop(status=err.status, headers=headers, body=orjson.dumps(body))
