"""The gateway role's way to the inference pool: gRPC to one or more pool replicas.

``RemoteInference`` implements the same ``Inference`` contract as the in-process pool, so the
faces cannot tell the difference, and carries the pool's chat model too (``Generate`` and
``GenerateStream``, used by ``sidecar.providers.pool_chat`` as the ``local`` provider). Each
call goes to the replica with the lowest queue depth it last reported (the
``deepgate-queue-depth`` trailer of every Embed/Classify reply; ties take turns). A replica that
cannot be reached is set aside for a few seconds and the call goes on with the next; when none
answers, the caller gets 503.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson

from deepgate.errors import DeepgateError, ServiceUnavailable
from sidecar._proto.deepgate.v1 import deepgate_pb2, deepgate_pb2_grpc
from sidecar.grpc_client import chat_request, error_from_chunk, error_from_status
from sidecar.inference import Embeddings, check_inputs

DOWN_FOR_S = 5.0
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED}


@dataclass
class Replica:
    address: str
    stub: Any
    depth: int = 0
    down_until: float = 0.0


@dataclass
class RemoteInference:
    addresses: list[str]
    embedding: list[str] = field(default_factory=lambda: ["all-MiniLM-L6-v2"])
    classifiers: list[str] = field(default_factory=lambda: ["deepgate-safety"])

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("pool.addresses is empty")
        self._channels = [grpc.aio.insecure_channel(a) for a in self.addresses]
        self.replicas = [
            Replica(a, deepgate_pb2_grpc.DeepgateStub(c))  # type: ignore[no-untyped-call]
            for a, c in zip(self.addresses, self._channels, strict=True)
        ]
        self._turn = itertools.count()

    def embedding_models(self) -> list[str]:
        return list(self.embedding)

    def classifier_models(self) -> list[str]:
        return list(self.classifiers)

    async def queue_depth(self) -> int:
        return sum(r.depth for r in self.replicas)

    def _order(self) -> list[Replica]:
        now = time.monotonic()
        turn = next(self._turn)
        up = [r for r in self.replicas if r.down_until <= now]
        rotated = up[turn % len(up) :] + up[: turn % len(up)] if up else []
        return sorted(rotated, key=lambda r: r.depth)  # stable: equal depths keep the rotation

    async def _call(self, rpc: str, request: Any, timeout_s: float | None) -> Any:
        last: DeepgateError | None = None
        for replica in self._order():
            call = getattr(replica.stub, rpc)(request, timeout=timeout_s)
            try:
                reply = await call
            except grpc.aio.AioRpcError as err:
                last = _set_aside(replica, err)
                continue
            for key, value in await call.trailing_metadata() or ():
                if key == "deepgate-queue-depth" and str(value).isdigit():
                    replica.depth = int(value)
            return reply
        raise last or _none_reachable()

    @staticmethod
    def _timeout(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        return max(0.001, deadline - asyncio.get_running_loop().time())

    async def embed(self, model: str, inputs: list[str], deadline: float | None) -> Embeddings:
        check_inputs(inputs)
        request = deepgate_pb2.EmbedRequest(model=model, inputs=inputs)
        reply = await self._call("Embed", request, self._timeout(deadline))
        vectors = [list(v.values) for v in reply.vectors]
        return Embeddings(reply.model or model, vectors, int(reply.usage.prompt_tokens))

    async def classify(
        self, model: str, texts: list[str], deadline: float | None
    ) -> list[dict[str, float]]:
        check_inputs(texts, "texts")
        request = deepgate_pb2.ClassifyRequest(model=model, texts=texts)
        reply = await self._call("Classify", request, self._timeout(deadline))
        return [dict(r.scores) for r in reply.results]

    async def generate(
        self, body: dict[str, Any], request_id: str, timeout_s: float | None
    ) -> dict[str, Any]:
        """One answer of the pool's chat model (canonical ``chat.completion``)."""
        request = chat_request(body, "", request_id, stream=False)
        reply = await self._call("Generate", request, timeout_s)
        answer: dict[str, Any] = orjson.loads(reply.body_json)
        return answer

    async def generate_stream(
        self, body: dict[str, Any], request_id: str, timeout_s: float | None
    ) -> AsyncIterator[dict[str, Any]]:
        """The pool's chat model, streamed; a replica that cannot be reached before the first
        chunk is set aside and the next one tried, as for the unary calls."""
        request = chat_request(body, "", request_id, stream=True)
        last: DeepgateError | None = None
        for replica in self._order():
            call = replica.stub.GenerateStream(request, timeout=timeout_s)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as err:
                last = _set_aside(replica, err)
                continue
            try:
                message = first
                while message is not grpc.aio.EOF:
                    chunk: deepgate_pb2.ChatChunk = message
                    if chunk.HasField("error"):
                        raise error_from_chunk(chunk.error)
                    decoded: dict[str, Any] = orjson.loads(chunk.chunk_json)
                    yield decoded
                    message = await call.read()
            except grpc.aio.AioRpcError as err:
                raise error_from_status(err) from None
            finally:
                call.cancel()  # a no-op once the call has ended
            return
        raise last or _none_reachable()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def _set_aside(replica: Replica, err: grpc.aio.AioRpcError) -> ServiceUnavailable:
    """A replica that cannot be reached sits out ``DOWN_FOR_S``; any other error is the call's."""
    if err.code() not in _UNREACHABLE:
        raise error_from_status(err) from None
    replica.down_until = time.monotonic() + DOWN_FOR_S
    return ServiceUnavailable("A pool replica is unreachable.", code="pool_unreachable")


def _none_reachable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "No pool replica is reachable; retry shortly.", code="pool_unreachable"
    )
