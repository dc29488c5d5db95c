"""The shared machinery of our fake provider servers.

A fake is a real HTTP server on 127.0.0.1 (port 0) speaking one provider's wire format, so the
official SDKs inside our adapters talk to it exactly as they talk to the real API. Tests steer it
with ``behave(...)``: answer normally, fail with a status (and ``Retry-After``), wait before the
first byte, drop a stream after some events, or hang. Every request it received is recorded.

Answers come from recorded fixtures in ``tests/fixtures/providers/<provider>/``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"


def fixture(provider: str, name: str) -> Any:
    """A recorded JSON fixture (``.json``) or SSE transcript (``.sse``, returned as text)."""
    path = FIXTURES / provider / name
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else text


@dataclass
class Behaviour:
    """How the fake answers the next requests (until changed)."""

    status: int = 200  # != 200: answer this status with the provider's error body
    retry_after: str | None = None  # Retry-After header on an error answer
    first_byte_delay_s: float = 0.0  # wait before answering (slow first token)
    drop_after_events: int | None = None  # streams: close the connection after N events
    hang: bool = False  # never answer (client timeouts)
    reply: Any = None  # override the fixture answer for this behaviour (dict or SSE text)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeServer:
    """Base of a fake: subclasses add routes in ``routes``."""

    behaviour: Behaviour = field(default_factory=Behaviour)
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def behave(self, **kw: Any) -> None:
        self.behaviour = Behaviour(**kw)

    def routes(self, app: web.Application) -> None:
        """Add the provider's endpoints (each subclass speaks one wire format)."""
        raise TypeError(f"{type(self).__name__} must add its routes")

    async def start(self) -> FakeServer:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        assert server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def record(self, request: web.Request) -> Any:
        body = await request.json() if request.can_read_body else None
        self.received.append(Received(request.path, dict(request.headers), body))
        return body

    async def delay(self) -> None:
        b = self.behaviour
        if b.hang:
            await asyncio.sleep(3600)
        if b.first_byte_delay_s:
            await asyncio.sleep(b.first_byte_delay_s)

    async def send_sse(self, request: web.Request, transcript: str) -> web.StreamResponse:
        """Stream a recorded SSE transcript event by event, honouring ``drop_after_events``."""
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        events = [e for e in transcript.split("\n\n") if e.strip()]
        for i, event in enumerate(events):
            if (
                self.behaviour.drop_after_events is not None
                and i >= self.behaviour.drop_after_events
            ):
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(event.encode() + b"\n\n")
        await resp.write_eof()
        return resp
