"""Calling the sidecar's ``deepgate.v1.Deepgate`` service, with errors back in our own classes.

A failed call raises the ``DeepgateError`` subclass the sidecar raised (rebuilt from the gRPC
status and the ``deepgate-code`` trailing metadata by ``deepgate.errors.from_grpc_code``); a
stream that fails after it started raises it from its in-stream ``error`` chunk. Callers never
see ``grpc.RpcError``.

The channel is the caller's (one per process, reused): open it with ``grpc.aio.insecure_channel``
and the same message-size options as the server (``sidecar.grpc_service.MAX_MESSAGE_BYTES``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson

from deepgate.errors import DeepgateError, from_grpc_code, from_http_status
from sidecar._proto.deepgate.v1 import deepgate_pb2, deepgate_pb2_grpc


async def chat(
    channel: grpc.aio.Channel,
    body: dict[str, Any],
    *,
    route: str = "",
    request_id: str = "",
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """One chat completion: the canonical ``chat.completion`` dict."""
    stub = deepgate_pb2_grpc.DeepgateStub(channel)  # type: ignore[no-untyped-call]
    request = chat_request(body, route, request_id, stream=False)
    try:
        reply: deepgate_pb2.ChatResponse = await stub.Chat(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        raise error_from_status(err) from None
    answer: dict[str, Any] = orjson.loads(reply.body_json)
    return answer


async def chat_stream(
    channel: grpc.aio.Channel,
    body: dict[str, Any],
    *,
    route: str = "",
    request_id: str = "",
    timeout_s: float | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """A streamed chat: canonical ``chat.completion.chunk`` dicts, in order.

    Leaving the loop early cancels the call, so the sidecar stops asking the provider.
    """
    stub = deepgate_pb2_grpc.DeepgateStub(channel)  # type: ignore[no-untyped-call]
    call = stub.ChatStream(chat_request(body, route, request_id, stream=True), timeout=timeout_s)
    try:
        async for message in call:
            chunk: deepgate_pb2.ChatChunk = message
            if chunk.HasField("error"):
                raise error_from_chunk(chunk.error)
            decoded: dict[str, Any] = orjson.loads(chunk.chunk_json)
            yield decoded
    except grpc.aio.AioRpcError as err:
        raise error_from_status(err) from None
    finally:
        call.cancel()  # a no-op once the call has ended


async def provider_stats(
    channel: grpc.aio.Channel, *, timeout_s: float | None = None
) -> list[deepgate_pb2.TargetStats]:
    """Every configured provider target's breaker state and numbers, for routing."""
    stub = deepgate_pb2_grpc.DeepgateStub(channel)  # type: ignore[no-untyped-call]
    try:
        reply: deepgate_pb2.ProviderStatsResponse = await stub.ProviderStats(
            deepgate_pb2.ProviderStatsRequest(), timeout=timeout_s
        )
    except grpc.aio.AioRpcError as err:
        raise error_from_status(err) from None
    return list(reply.targets)


def error_from_status(err: grpc.aio.AioRpcError) -> DeepgateError:
    """The ``DeepgateError`` behind a failed call (transport failures included)."""
    metadata = {
        key: value for key, value in err.trailing_metadata() or () if isinstance(value, str)
    }
    rebuilt = from_grpc_code(
        err.code().name, err.details() or "", code=metadata.get("deepgate-code") or None
    )
    retry_after = metadata.get("deepgate-retry-after")
    if retry_after:
        with contextlib.suppress(ValueError):  # a malformed hint must not hide the error
            rebuilt.retry_after = float(retry_after)
    return rebuilt


def error_from_chunk(error: deepgate_pb2.Error) -> DeepgateError:
    """The ``DeepgateError`` a stream ended with after it started."""
    # An in-stream error carries the HTTP status, not the gRPC code.
    return from_http_status(error.http_status, error.message, code=error.code or None)


def chat_request(
    body: dict[str, Any], route: str, request_id: str, *, stream: bool
) -> deepgate_pb2.ChatRequest:
    return deepgate_pb2.ChatRequest(
        envelope=deepgate_pb2.Envelope(request_id=request_id, route=route, stream=stream),
        body_json=orjson.dumps(body),
    )
