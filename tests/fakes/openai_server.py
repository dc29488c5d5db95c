"""A fake OpenAI-compatible API (OpenAI itself, DeepSeek) for the official ``openai`` SDK.

It serves what our adapters call: ``POST /chat/completions`` (JSON, or SSE when ``stream`` is
set), ``GET /models`` and ``POST /embeddings``, each also under ``/v1`` (OpenAI's base URL ends in
``/v1``, DeepSeek's does not). Answers are recorded fixtures from
``tests/fixtures/providers/<fixtures>/``, chosen from the request:

- ``tools`` present -> ``tool_call``; a ``json_object``/``json_schema`` response format ->
  ``json_mode``; a reasoning model (name contains ``reasoner``, or OpenAI's ``o1``/``o3``/``o4``
  families) -> ``reasoner``; otherwise ``chat``;
- ``.sse`` when streaming, ``.json`` otherwise; a fixture a provider folder lacks is taken from
  ``openai/``.

Fixtures carry ``{{provider}}`` and ``{{model}}`` placeholders: the answer text names the
provider this fake was started as, so a test can tell which target answered, and the answer echoes
the requested model. Errors use the provider's own error bodies (``errors.json``, by status); a
request without a key gets the provider's 401, as from the real API. Besides ``received``, the
fake keeps ``client_ports`` (one per chat request: a repeated port is a reused connection) and adds
``extra_headers`` to its answers (e.g. ``retry-after-ms``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import struct
from typing import Any

from aiohttp import web

from tests.fakes.base import FIXTURES, FakeServer, Received

_REASONING_MODEL = re.compile(r"reasoner|^o[134](?:-|$)")
_GENERIC_ERROR = {
    "error": {
        "message": "The server had an error processing your request.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


class FakeOpenAI(FakeServer):
    """``FakeOpenAI("deepseek")`` answers as DeepSeek, from DeepSeek's fixtures."""

    def __init__(self, provider: str = "openai", *, fixtures: str | None = None) -> None:
        super().__init__()
        self.provider = provider
        self.fixtures = fixtures or (provider if (FIXTURES / provider).is_dir() else "openai")
        # Headers added to every answer (e.g. ``retry-after-ms``, ``x-request-id``).
        self.extra_headers: dict[str, str] = {}
        # The client's port for each chat request: one port for many requests = a reused connection.
        self.client_ports: list[int] = []
        self._release = asyncio.Event()

    # --- plumbing ------------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        for prefix in ("", "/v1"):
            app.router.add_post(f"{prefix}/chat/completions", self.chat)
            app.router.add_get(f"{prefix}/models", self.models)
            app.router.add_post(f"{prefix}/embeddings", self.embeddings)

    async def stop(self) -> None:
        self._release.set()  # let hanging handlers go, so shutdown does not wait on them
        await super().stop()

    async def delay(self) -> None:
        if self.behaviour.hang:
            await self._release.wait()
            raise web.HTTPServiceUnavailable()
        if self.behaviour.first_byte_delay_s:
            await asyncio.sleep(self.behaviour.first_byte_delay_s)

    def fixture_text(self, name: str, model: str) -> str:
        path = FIXTURES / self.fixtures / name
        if not path.exists():
            path = FIXTURES / "openai" / name
        text = path.read_text(encoding="utf-8")
        # json.dumps(...)[1:-1]: the model name as it must appear inside a JSON string.
        return text.replace("{{provider}}", self.provider).replace(
            "{{model}}", json.dumps(model)[1:-1]
        )

    def _json(self, name: str, model: str) -> Any:
        return json.loads(self.fixture_text(name, model))

    def _error(self, status: int, model: str, body: Any = None) -> web.Response:
        """The provider's own error answer for ``status`` (``body`` overrides the fixture)."""
        headers = dict(self.extra_headers)
        if self.behaviour.retry_after is not None:
            headers["retry-after"] = self.behaviour.retry_after
        if body is None:
            body = self._json("errors.json", model).get(str(status), _GENERIC_ERROR)
        if isinstance(body, str):  # an edge proxy's HTML page, not the API's JSON
            return web.Response(status=status, text=body, content_type="text/html", headers=headers)
        return web.json_response(body, status=status, headers=headers)

    def _authorised(self, request: web.Request) -> bool:
        auth = request.headers.get("authorization", "")
        return auth.startswith("Bearer ") and len(auth) > len("Bearer ")

    def _answer_error(self, request: web.Request, model: str) -> web.Response | None:
        """The error to answer instead, if any: no key (as the real API), or the behaviour's."""
        if not self._authorised(request):
            return self._error(401, model)
        if self.behaviour.status != 200:
            return self._error(self.behaviour.status, model, self.behaviour.reply)
        return None

    # --- endpoints -----------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        assert request.transport is not None
        self.client_ports.append(request.transport.get_extra_info("peername")[1])
        await self.delay()
        model = str(body.get("model", ""))
        error = self._answer_error(request, model)
        if error is not None:
            return error
        name = _fixture_name(body)
        if body.get("stream"):
            transcript = self.behaviour.reply or self.fixture_text(f"{name}.sse", model)
            return await self.send_sse(request, transcript)
        answer = self.behaviour.reply or self._json(f"{name}.json", model)
        return web.json_response(answer, headers=self.extra_headers)

    async def models(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), None))
        await self.delay()
        error = self._answer_error(request, "")
        return error or web.json_response(self._json("models.json", ""))

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self.record(request)
        await self.delay()
        model = str(body.get("model", ""))
        error = self._answer_error(request, model)
        if error is not None:
            return error
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        dims = int(body.get("dimensions") or 8)
        data = []
        for i, text in enumerate(texts):
            vector = _vector(str(text), dims)
            # The SDK asks for base64 (packed little-endian float32) unless told otherwise.
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
                if body.get("encoding_format") == "base64"
                else vector
            )
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = sum(len(str(t).split()) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers=self.extra_headers,
        )


def _fixture_name(body: dict[str, Any]) -> str:
    if body.get("tools"):
        return "tool_call"
    fmt = body.get("response_format") or {}
    if fmt.get("type") in ("json_object", "json_schema"):
        return "json_mode"
    if _REASONING_MODEL.search(str(body.get("model", ""))):
        return "reasoner"
    return "chat"


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic unit-ish vector per text, so equal texts embed equally."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(dims)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [x / norm for x in raw]
