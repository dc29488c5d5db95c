"""The sidecar's HTTP face: OpenAI-compatible and Anthropic-compatible endpoints.

This is the upstream of deepgate's APISIX routes. Clients' SDKs talk to it through APISIX:

- ``POST /v1/chat/completions`` — OpenAI Chat Completions, JSON or SSE;
- ``POST /v1/messages`` — Anthropic Messages in, whichever provider answers, Anthropic out;
- ``GET /v1/models``, ``GET /healthz``, ``GET /metrics``.

Which chain of targets serves a request comes from the signed route header when a route key is
configured (the plugin runner decides), else from the model alias in the body. The target that
answered is in the ``x-deepgate-route`` response header. Errors come in the shape of the
endpoint's SDK with the status from deepgate's error table.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from deepgate.chat import Dialect, check_chat_body, from_anthropic
from deepgate.errors import (
    DeepgateError,
    InternalError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from deepgate.logs import request_scope
from deepgate.request_facts import HEADER as FACTS_HEADER
from deepgate.request_facts import Facts, unseal
from deepgate.route_signature import HEADER as ROUTE_HEADER
from deepgate.route_signature import verify_route
from sidecar.answer_hooks import AnswerHooks, Exchange
from sidecar.config import SidecarConfig, Target
from sidecar.dispatch import Dispatcher
from sidecar.faces import anthropic as anthropic_face
from sidecar.faces import openai as openai_face
from sidecar.inference import Inference
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)
access = logging.getLogger("deepgate.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)


@dataclass
class Face:
    config: SidecarConfig
    dispatcher: Dispatcher
    metrics: Metrics
    route_key: bytes | None
    inference: Inference | None = None
    hooks: AnswerHooks = field(default_factory=AnswerHooks)

    # --- helpers ----------------------------------------------------------------------------

    def chain_for(self, request: web.Request, model: str, request_id: str) -> list[Target]:
        if self.route_key is None:
            return self.dispatcher.plan(model)
        labels = verify_route(self.route_key, request_id, request.headers.get(ROUTE_HEADER))
        targets = [Target.parse(label) for label in labels]
        usable = [t for t in targets if t.provider in self.dispatcher.providers]
        if not usable:
            raise ServiceUnavailable(
                "None of the providers this request was routed to is configured here.",
                code="no_provider",
            )
        return usable

    def error_response(self, err: DeepgateError, dialect: Dialect) -> web.Response:
        body = err.to_anthropic() if dialect == "anthropic" else err.to_openai()
        if self.config.expose_provider_errors and err.provider_detail:
            body["error"]["message"] = f"{err.message} The provider said: {err.provider_detail}"
        return web.Response(
            status=err.status,
            body=orjson.dumps(body),
            content_type="application/json",
            headers=err.http_headers(),
        )

    async def read_chat(self, request: web.Request, dialect: Dialect) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest("The request body is not valid JSON.") from None
        return check_chat_body(body, dialect)

    # --- endpoints --------------------------------------------------------------------------

    def facts_for(self, request: web.Request, request_id: str) -> Facts:
        """The plugin chain's sealed facts (none without a route key to open them)."""
        if self.route_key is None:
            return Facts()
        return unseal(self.route_key, request_id, request.headers.get(FACTS_HEADER))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        rid = request[REQUEST_ID]
        body = await self.read_chat(request, "openai")
        ex = Exchange(rid, "openai", self.facts_for(request, rid), body, bool(body.get("stream")))
        try:
            return await self._chat_completions(request, ex)
        except DeepgateError as err:
            ex.status, ex.error_code = err.status, err.code
            raise
        finally:
            await self.hooks.finish(ex)

    async def _chat_completions(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        body = ex.body
        chain = self.chain_for(request, body["model"], ex.request_id)
        if not ex.stream:
            answer = await self.dispatcher.complete(body, chain, ex.request_id)
            ex.target = answer.target.label
            result = await self.hooks.answer(ex, answer.body)
            ex.complete = True
            return web.Response(
                body=orjson.dumps(result),
                content_type="application/json",
                headers={"x-deepgate-route": answer.target.label},
            )
        opened = await self.dispatcher.open_stream(body, chain, ex.request_id)
        ex.target = opened.target.label
        resp = _sse_response(opened.target.label)
        await resp.prepare(request)
        include_usage = openai_face.wants_usage(body)
        try:
            async for chunk in self.hooks.stream(ex, opened.chunks):
                event = openai_face.sse_chunk(chunk, include_usage)
                if event is not None:
                    await resp.write(event)
        except DeepgateError as err:
            log.warning("stream failed after it started", extra={"code": err.code})
            ex.error_code, ex.complete = err.code, False
            await resp.write(openai_face.sse_error(err))
        else:
            await resp.write(openai_face.DONE)
        await resp.write_eof()
        return resp

    async def messages(self, request: web.Request) -> web.StreamResponse:
        rid = request[REQUEST_ID]
        body = await self.read_chat(request, "anthropic")
        canonical = from_anthropic(body).model_dump(exclude_none=True)
        facts = self.facts_for(request, rid)
        ex = Exchange(rid, "anthropic", facts, canonical, bool(body.get("stream")))
        try:
            return await self._messages(request, ex, body["model"])
        except DeepgateError as err:
            ex.status, ex.error_code = err.status, err.code
            raise
        finally:
            await self.hooks.finish(ex)

    async def _messages(self, request: web.Request, ex: Exchange, model: str) -> web.StreamResponse:
        canonical = ex.body
        chain = self.chain_for(request, model, ex.request_id)
        if not ex.stream:
            answer = await self.dispatcher.complete(canonical, chain, ex.request_id)
            ex.target = answer.target.label
            result = await self.hooks.answer(ex, answer.body)
            ex.complete = True
            message = anthropic_face.to_anthropic_message(result, model)
            return web.Response(
                body=orjson.dumps(message),
                content_type="application/json",
                headers={"x-deepgate-route": answer.target.label},
            )
        canonical["stream_options"] = {"include_usage": True}
        opened = await self.dispatcher.open_stream(canonical, chain, ex.request_id)
        ex.target = opened.target.label
        resp = _sse_response(opened.target.label)
        await resp.prepare(request)
        encoder = anthropic_face.AnthropicStreamEncoder(model=model)
        try:
            async for chunk in self.hooks.stream(ex, opened.chunks):
                for event in encoder.feed(chunk):
                    await resp.write(event)
            for event in encoder.finish():
                await resp.write(event)
        except DeepgateError as err:
            log.warning("stream failed after it started", extra={"code": err.code})
            ex.error_code, ex.complete = err.code, False
            await resp.write(anthropic_face.error_event(err))
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's embeddings endpoint, served by the inference pool."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise InvalidRequest("The request body is not valid JSON.") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise InvalidRequest("Missing required parameter 'model' (a string).", param="model")
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise InvalidRequest(
                "'input' must be a string or an array of strings (token arrays are not supported).",
                param="input",
            )
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise InvalidRequest(
                "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
            )
        if self.inference is None:
            raise ServiceUnavailable(
                "No inference pool serves embeddings here: run the sidecar with --role all or "
                "pool, or give it the pool's addresses.",
                code="no_pool",
            )
        deadline = asyncio.get_running_loop().time() + self.config.deadlines.total_s
        out = await self.inference.embed(body["model"], inputs, deadline)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(v, encoding)}
            for i, v in enumerate(out.vectors)
        ]
        usage = {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data, "model": out.model, "usage": usage}),
            content_type="application/json",
        )

    async def models(self, request: web.Request) -> web.StreamResponse:
        pooled = self.inference.embedding_models() if self.inference is not None else []
        ids = [*self.dispatcher.models(), *dict.fromkeys([*self.config.embedding_models, *pooled])]
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "deepgate"} for m in ids]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        providers = sorted(self.dispatcher.providers)
        status = "ok" if providers else "degraded"
        return web.json_response({"status": status, "providers": providers}, dumps=_dumps)

    async def metrics_page(self, request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=self.metrics.render())
        resp.headers["content-type"] = METRICS_CONTENT_TYPE
        return resp

    # --- middleware ---------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request[REQUEST_ID] = rid
        dialect: Dialect = "anthropic" if request.path.endswith("/messages") else "openai"
        started = time.perf_counter()
        with request_scope(rid):
            try:
                resp = await handler(request)
            except DeepgateError as err:
                resp = self.error_response(err, dialect)
            except web.HTTPException as exc:
                resp = self.error_response(_http_error(exc), dialect)
            except Exception:
                log.exception("request failed")
                resp = self.error_response(
                    InternalError(f"The gateway failed on this request (request id {rid})."),
                    dialect,
                )
            if not resp.prepared:
                resp.headers["x-request-id"] = rid
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "other"
            self.metrics.client_requests.labels(route, str(resp.status)).inc()
            access.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": resp.status,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    "route": resp.headers.get("x-deepgate-route"),
                },
            )
            return resp


def _sse_response(target_label: str) -> web.StreamResponse:
    return web.StreamResponse(
        headers={
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            "x-deepgate-route": target_label,
        }
    )


def _http_error(exc: web.HTTPException) -> DeepgateError:
    if exc.status == 404:
        return NotFound("There is no such endpoint on this gateway.")
    if exc.status == 405:
        return InvalidRequest(
            "This endpoint does not accept that method.", code="method_not_allowed"
        )
    return InvalidRequest(exc.reason or "Bad request.")


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    # What the OpenAI SDK decodes: little-endian float32, base64.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def build_app(face: Face) -> web.Application:
    app = web.Application(middlewares=[face.middleware], client_max_size=32 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", face.chat_completions)
    app.router.add_post("/chat/completions", face.chat_completions)
    app.router.add_post("/v1/messages", face.messages)
    app.router.add_post("/v1/embeddings", face.embeddings)
    app.router.add_get("/v1/models", face.models)
    app.router.add_get("/healthz", face.healthz)
    app.router.add_get("/metrics", face.metrics_page)
    return app
