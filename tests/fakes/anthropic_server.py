"""A fake Anthropic Messages API: ``POST /v1/messages``, JSON or SSE, in Anthropic's wire format.

The answer is picked from the request the way the real API shapes it: a request with ``tools``
gets the tool_use recording, one with ``thinking`` the extended-thinking recording, any other the
plain text one ("Hello from anthropic."); ``stream: true`` gets the SSE transcript of the same.
Errors use Anthropic's real body (``{"type": "error", "error": {"type", "message"}}``) with the
error type Anthropic sends for each status, including 529 ``overloaded_error``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer, fixture

PROVIDER = "anthropic"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# What the real API says; the adapter must never pass it on to clients (only as provider_detail).
ERROR_MESSAGE = "upstream says: something about your request (raw provider text)"


def error_body(status: int) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": ERROR_MESSAGE},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
    }


@dataclass
class FakeAnthropic(FakeServer):
    # Hanging handlers wait on this, released by stop(): aiohttp does not cancel a handler when
    # its client goes away, and would wait 60 s for it at shutdown.
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.messages)

    async def delay(self) -> None:
        if self.behaviour.hang:
            await self._release.wait()
        else:
            await super().delay()

    async def stop(self) -> None:
        self._release.set()
        await super().stop()

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        await self.delay()
        b = self.behaviour
        headers = {"request-id": "req_011CSHoEeqs5C35K2UUqR7Fy"}
        if b.status != 200:
            if b.retry_after is not None:
                headers["retry-after"] = b.retry_after
            return web.json_response(error_body(b.status), status=b.status, headers=headers)
        kind = self.kind(body)
        if body.get("stream"):
            transcript = (
                b.reply if isinstance(b.reply, str) else fixture(PROVIDER, f"stream_{kind}.sse")
            )
            return await self.send_sse(request, transcript)
        reply = b.reply if isinstance(b.reply, dict) else fixture(PROVIDER, f"message_{kind}.json")
        return web.json_response(reply, headers=headers)

    @staticmethod
    def kind(body: dict[str, Any]) -> str:
        if body.get("tools"):
            return "tool_use"
        if body.get("thinking"):
            return "thinking"
        return "text"
