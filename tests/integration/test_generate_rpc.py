"""gRPC Generate / GenerateStream: the pool's own chat model, whatever the body's model says."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest

from sidecar._proto.deepgate.v1 import deepgate_pb2, deepgate_pb2_grpc
from sidecar.app import Sidecar
from sidecar.config import SidecarConfig
from sidecar.providers.base import CallOptions

CONFIG = SidecarConfig.model_validate(
    {
        "providers": {"local": {"kind": "local"}, "openai": {"kind": "openai_compat"}},
        "aliases": {"local": ["local:tiny"], "gpt": ["openai:gpt"]},
    }
)
BODY = orjson.dumps({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]})


class Echo:
    """A double of our Provider contract for the local model: answers with the target model."""

    name = "local"

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        message = {"role": "assistant", "content": f"from {opts.model}"}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    async def stream(
        self, body: dict[str, Any], opts: CallOptions
    ) -> AsyncIterator[dict[str, Any]]:
        for piece in ("from ", opts.model):
            yield {"choices": [{"index": 0, "delta": {"content": piece}}]}

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def pool() -> AsyncIterator[Sidecar]:
    s = Sidecar(
        CONFIG, "pool", http_address=None, grpc_address="127.0.0.1:0", providers={"local": Echo()}
    )
    await s.start()
    yield s
    await s.stop()


async def test_generate_uses_the_local_model(pool: Sidecar) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{pool.grpc_port}") as channel:
        stub = deepgate_pb2_grpc.DeepgateStub(channel)
        reply = await stub.Generate(deepgate_pb2.ChatRequest(body_json=BODY))
        chunks = [c async for c in stub.GenerateStream(deepgate_pb2.ChatRequest(body_json=BODY))]
    assert reply.target == "local:tiny"
    assert orjson.loads(reply.body_json)["choices"][0]["message"]["content"] == "from tiny"
    text = "".join(orjson.loads(c.chunk_json)["choices"][0]["delta"]["content"] for c in chunks)
    assert text == "from tiny"


async def test_without_a_local_model_generate_is_unimplemented() -> None:
    s = Sidecar(CONFIG, "gateway", http_address=None, grpc_address="127.0.0.1:0")
    await s.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as channel:
            stub = deepgate_pb2_grpc.DeepgateStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(deepgate_pb2.ChatRequest(body_json=BODY))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await s.stop()
