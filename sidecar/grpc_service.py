"""The sidecar's gRPC face: ``deepgate.v1.Deepgate`` over the dispatcher, health, reflection.

The plugin runner calls this service for every chat it forwards. Bodies travel as canonical JSON
(the proto says why); this module only decodes them, asks the dispatcher, and turns the outcome
into the contract's messages and statuses:

- a ``DeepgateError`` becomes its ``grpc_code`` with trailing metadata ``deepgate-code`` (our
  code), ``deepgate-status`` (the HTTP status) and, when set, ``deepgate-retry-after``, so a
  client rebuilds the same class with ``deepgate.errors.from_grpc_code``;
- any other exception is a bug: INTERNAL with a generic message, the traceback logged under the
  request id (never the prompt);
- a stream that fails after its first chunk cannot change its status any more: it ends with a
  ``ChatChunk`` whose ``error`` is set, and status OK.

Deadlines: a call ends at the earlier of the envelope's ``deadline_unix_ms`` (it survives hops
that do not forward gRPC deadlines) and the gRPC deadline, with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import grpc
import orjson
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deepgate.chat import check_chat_body
from deepgate.errors import DeepgateError, GatewayTimeout, InternalError, InvalidRequest
from deepgate.logs import request_id as request_id_var
from deepgate.logs import request_scope
from sidecar._proto.deepgate.v1 import deepgate_pb2, deepgate_pb2_grpc
from sidecar.config import SidecarConfig, Target
from sidecar.dispatch import Dispatcher
from sidecar.health import HealthBoard
from sidecar.inference import Inference

log = logging.getLogger(__name__)

T = TypeVar("T")
# DESIGN.md names the one-process role "both", sidecar/app.py "all": both are accepted until the
# project settles on one.
ROLES = frozenset({"gateway", "pool", "both", "all"})

SERVICE_NAME: str = deepgate_pb2.DESCRIPTOR.services_by_name["Deepgate"].full_name
# Chat bodies carry base64 images; gRPC's default 4 MiB limit would refuse ordinary vision calls.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
_POOL_ONLY = (
    "{rpc} is served by the inference pool: run the sidecar with --role pool or all, or give "
    "this gateway the pool's addresses (pool.addresses in its config)."
)


class DeepgateService(deepgate_pb2_grpc.DeepgateServicer):
    """``deepgate.v1.Deepgate`` for the gateway role: chat through the provider chains.

    ``board`` and ``config`` must be the dispatcher's own: ProviderStats describes the breakers
    that gate its calls. The health servicer lives here so that whoever stops the server can
    first report NOT_SERVING and let load balancers drain it.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        board: HealthBoard,
        config: SidecarConfig,
        inference: Inference | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.board = board
        self.config = config
        self.inference = inference
        self.health = health.aio.HealthServicer()

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the whole server and for ``deepgate.v1.Deepgate``."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (health.OVERALL_HEALTH, SERVICE_NAME):
            await self.health.set(name, status)

    # --- chat -----------------------------------------------------------------------------

    async def Chat(
        self,
        request: deepgate_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[deepgate_pb2.ChatRequest, deepgate_pb2.ChatResponse],
    ) -> deepgate_pb2.ChatResponse:
        rid = request.envelope.request_id
        with request_scope(rid or None):
            return await _unary(context, "Chat", lambda: self._chat(request, context))

    async def _chat(
        self,
        request: deepgate_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[deepgate_pb2.ChatRequest, deepgate_pb2.ChatResponse],
    ) -> deepgate_pb2.ChatResponse:
        deadline = _deadline(request.envelope, context.time_remaining())
        body, chain = self._plan(request)
        async with _until(deadline):
            answer = await self.dispatcher.complete(
                body, chain, request.envelope.request_id or None
            )
        return deepgate_pb2.ChatResponse(
            body_json=orjson.dumps(answer.body),
            target=answer.target.label,
            usage=_usage(answer.body.get("usage")),
        )

    async def ChatStream(
        self,
        request: deepgate_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[deepgate_pb2.ChatRequest, deepgate_pb2.ChatChunk],
    ) -> AsyncIterator[deepgate_pb2.ChatChunk]:
        rid = request.envelope.request_id
        # Each RPC runs in a task of its own, so setting the id (and never resetting it) stays
        # within this call; a token reset across ``yield`` could run in another context.
        request_id_var.set(rid or None)
        deadline = _deadline(request.envelope, context.time_remaining())
        try:
            body, chain = self._plan(request)
            async with _until(deadline):
                opened = await self.dispatcher.open_stream(body, chain, rid or None)
        except DeepgateError as err:
            await _abort(context, err)
        except Exception:
            log.exception("ChatStream failed before its first chunk")
            await _abort(context, _unexpected(rid))

        label, chunks = opened.target.label, opened.chunks
        try:
            while (chunk := await _pull(chunks, deadline)) is not None:
                yield deepgate_pb2.ChatChunk(
                    chunk_json=orjson.dumps(chunk), target=label, usage=_usage(chunk.get("usage"))
                )
        except DeepgateError as err:
            log.info("stream failed after it started", extra={"code": err.code})
            yield _error_chunk(label, err)
        except Exception:
            log.exception("ChatStream failed after its first chunk")
            yield _error_chunk(label, _unexpected(rid))
        finally:
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()

    def _plan(self, request: deepgate_pb2.ChatRequest) -> tuple[dict[str, Any], list[Target]]:
        body = _decode(request.body_json)
        model = request.envelope.route or body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest(
                "The request names no model: set the body's 'model' or the envelope's 'route'.",
                param="model",
            )
        check_chat_body(body if "model" in body else {**body, "model": model}, "openai")
        return body, self.dispatcher.plan(model)

    # --- the pool's RPCs ------------------------------------------------------------------

    def _local_route(self, request: deepgate_pb2.ChatRequest) -> bool:
        """Point a Generate call at the pool's own model; False when this process has none."""
        local = [
            p for p, c in self.config.providers.items()
            if c.kind == "local" and p in self.dispatcher.providers
        ]  # fmt: skip
        alias = next(
            (
                a
                for a in self.config.aliases
                if all(t.provider in local for t in self.config.chain(a))
            ),
            None,
        )
        if alias is None:
            return False
        request.envelope.route = alias
        return True

    async def Generate(
        self,
        request: deepgate_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[deepgate_pb2.ChatRequest, deepgate_pb2.ChatResponse],
    ) -> deepgate_pb2.ChatResponse:
        if not self._local_route(request):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, _POOL_ONLY.format(rpc="Generate"))
        return await self.Chat(request, context)

    async def GenerateStream(
        self,
        request: deepgate_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[deepgate_pb2.ChatRequest, deepgate_pb2.ChatChunk],
    ) -> AsyncIterator[deepgate_pb2.ChatChunk]:
        if not self._local_route(request):
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, _POOL_ONLY.format(rpc="GenerateStream")
            )
        async for chunk in self.ChatStream(request, context):
            yield chunk

    async def Embed(
        self,
        request: deepgate_pb2.EmbedRequest,
        context: grpc.aio.ServicerContext[deepgate_pb2.EmbedRequest, deepgate_pb2.EmbedResponse],
    ) -> deepgate_pb2.EmbedResponse:
        inference = await self._pool(context, "Embed")

        async def embed() -> deepgate_pb2.EmbedResponse:
            deadline = _deadline(request.envelope, context.time_remaining())
            async with _until(deadline):
                out = await inference.embed(request.model, list(request.inputs), _on_loop(deadline))
            await _report_depth(context, inference)
            usage = deepgate_pb2.Usage(
                prompt_tokens=out.prompt_tokens, total_tokens=out.prompt_tokens
            )
            vectors = [deepgate_pb2.Vector(values=v) for v in out.vectors]
            return deepgate_pb2.EmbedResponse(model=out.model, vectors=vectors, usage=usage)

        with request_scope(request.envelope.request_id or None):
            return await _unary(context, "Embed", embed)

    async def Classify(
        self,
        request: deepgate_pb2.ClassifyRequest,
        context: grpc.aio.ServicerContext[
            deepgate_pb2.ClassifyRequest, deepgate_pb2.ClassifyResponse
        ],
    ) -> deepgate_pb2.ClassifyResponse:
        inference = await self._pool(context, "Classify")

        async def classify() -> deepgate_pb2.ClassifyResponse:
            deadline = _deadline(request.envelope, context.time_remaining())
            async with _until(deadline):
                scores = await inference.classify(
                    request.model, list(request.texts), _on_loop(deadline)
                )
            await _report_depth(context, inference)
            results = [deepgate_pb2.LabelScores(scores=s) for s in scores]
            return deepgate_pb2.ClassifyResponse(model=request.model, results=results)

        with request_scope(request.envelope.request_id or None):
            return await _unary(context, "Classify", classify)

    async def _pool(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str) -> Inference:
        if self.inference is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, _POOL_ONLY.format(rpc=rpc))
        assert self.inference is not None
        return self.inference

    # --- provider health ------------------------------------------------------------------

    async def ProviderStats(
        self,
        request: deepgate_pb2.ProviderStatsRequest,
        context: grpc.aio.ServicerContext[
            deepgate_pb2.ProviderStatsRequest, deepgate_pb2.ProviderStatsResponse
        ],
    ) -> deepgate_pb2.ProviderStatsResponse:
        async def stats() -> deepgate_pb2.ProviderStatsResponse:
            return deepgate_pb2.ProviderStatsResponse(
                targets=[self._target_stats(t) for t in self._targets()]
            )

        return await _unary(context, "ProviderStats", stats)

    def _targets(self) -> list[Target]:
        """Every target of every alias whose provider is configured, once, in config order."""
        seen: dict[str, Target] = {}
        for alias in self.config.aliases:
            for target in self.config.chain(alias):
                if target.provider in self.dispatcher.providers:
                    seen.setdefault(target.label, target)
        return list(seen.values())

    def _target_stats(self, target: Target) -> deepgate_pb2.TargetStats:
        # The board creates a closed entry for a target never called yet: it is listed too.
        target_health = self.board[target.label]
        snap = target_health.snapshot()
        return deepgate_pb2.TargetStats(
            target=target.label,
            provider=target.provider,
            model=target.model,
            state=snap.state,
            available=target_health.available(),
            calls=snap.calls,
            failures=snap.failures,
            error_rate=snap.error_rate,
            latency_ms=snap.latency_ms,
            ttft_ms=snap.ttft_ms,
            region=self.config.providers[target.provider].region,
        )


# --- the server ---------------------------------------------------------------------------


async def build_grpc_server(
    service: DeepgateService, address: str, role: str
) -> tuple[grpc.aio.Server, int]:
    """A server (not started) with Deepgate, health and reflection, bound to ``address``.

    Returns the server and the bound port (``127.0.0.1:0`` picks a free one); health already
    says SERVING. Start it with ``await server.start()``; stop it with ``stop_grpc_server``.
    Async only because the aio health servicer's ``set`` is.
    """
    if role not in ROLES:
        raise ValueError(f"unknown sidecar role {role!r}; use one of {', '.join(sorted(ROLES))}")
    if role != "gateway":
        log.warning(
            "the inference pool is not part of this build: Embed and Classify answer "
            "UNIMPLEMENTED in role %s",
            role,
        )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    # The generated registration function has no annotations (protoc writes no .pyi for it).
    deepgate_pb2_grpc.add_DeepgateServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(service.health, server)
    await service.set_serving(True)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:  # older grpcio reports a failed bind this way instead of raising
        raise OSError(f"cannot listen for gRPC on {address}")
    log.info("gRPC server bound", extra={"address": address, "port": port, "role": role})
    return server, port


async def stop_grpc_server(
    server: grpc.aio.Server, service: DeepgateService, grace_s: float
) -> None:
    """Report NOT_SERVING for good, then let calls in flight finish for up to ``grace_s``."""
    await service.health.enter_graceful_shutdown()
    await server.stop(grace_s)


# --- helpers ------------------------------------------------------------------------------


async def _unary(
    context: grpc.aio.ServicerContext[Any, Any], rpc: str, call: Callable[[], Awaitable[T]]
) -> T:
    """Run a unary RPC's work and turn its failure into a status (aborts stay outside ``try``)."""
    try:
        return await call()
    except DeepgateError as err:
        if err.status >= 500:
            log.info("%s failed", rpc, extra={"code": err.code})
        await _abort(context, err)
    except Exception:
        log.exception("%s failed unexpectedly", rpc)
        await _abort(context, _unexpected(request_id_var.get()))


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: DeepgateError) -> NoReturn:
    metadata = [("deepgate-code", err.code or ""), ("deepgate-status", str(err.status))]
    if err.retry_after is not None:
        metadata.append(("deepgate-retry-after", f"{err.retry_after:g}"))
    await context.abort(grpc.StatusCode[err.grpc_code], err.message, tuple(metadata))


def _unexpected(rid: str | None) -> InternalError:
    where = f" under request id {rid}" if rid else ""
    return InternalError(f"The gateway failed unexpectedly; its log has the details{where}.")


def _error_chunk(target: str, err: DeepgateError) -> deepgate_pb2.ChatChunk:
    return deepgate_pb2.ChatChunk(
        target=target,
        error=deepgate_pb2.Error(
            http_status=err.status, type=err.openai_type, code=err.code or "", message=err.message
        ),
    )


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # The position only: the text around it is the client's prompt.
        raise InvalidRequest(
            f"body_json is not valid JSON (line {exc.lineno}, column {exc.colno}).",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"body_json must be a JSON object (a chat request), not {type(body).__name__}."
        )
    return body


def _usage(usage: Any) -> deepgate_pb2.Usage | None:
    """The contract's Usage from a canonical ``usage`` object (None when there is none)."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage, "prompt_tokens")
    completion = _count(usage, "completion_tokens")
    return deepgate_pb2.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=_count(usage, "total_tokens") or prompt + completion,
        cached_tokens=_count(usage.get("prompt_tokens_details"), "cached_tokens"),
        reasoning_tokens=_count(usage.get("completion_tokens_details"), "reasoning_tokens"),
    )


def _count(obj: Any, key: str) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _on_loop(deadline: float | None) -> float | None:
    """A monotonic deadline on the running loop's clock (what the pool's batcher reads)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


async def _report_depth(context: grpc.aio.ServicerContext[Any, Any], inference: Inference) -> None:
    """Tell callers how busy this replica is; gateways balance on it."""
    context.set_trailing_metadata((("deepgate-queue-depth", str(await inference.queue_depth())),))


def _deadline(envelope: deepgate_pb2.Envelope, grpc_left: float | None) -> float | None:
    """The call's deadline on the monotonic clock: the earlier of the envelope's and gRPC's."""
    limits: list[float] = []
    if envelope.deadline_unix_ms > 0:
        limits.append(envelope.deadline_unix_ms / 1000 - time.time())
    if grpc_left is not None:  # None: the client set no deadline
        limits.append(grpc_left)
    return time.monotonic() + min(limits) if limits else None


@asynccontextmanager
async def _until(deadline: float | None) -> AsyncIterator[None]:
    """Run a block within the call's deadline; past it, raise ``GatewayTimeout``."""
    if deadline is None:
        yield
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise _deadline_passed()
    scope = asyncio.timeout(left)
    try:
        async with scope:
            yield
    except TimeoutError:
        if scope.expired():
            raise _deadline_passed() from None
        raise


async def _pull(
    chunks: AsyncIterator[dict[str, Any]], deadline: float | None
) -> dict[str, Any] | None:
    """The next chunk, or None at the end of the stream."""
    async with _until(deadline):
        return await anext(chunks, None)


def _deadline_passed() -> GatewayTimeout:
    return GatewayTimeout("The call's deadline passed before the answer was complete.")
