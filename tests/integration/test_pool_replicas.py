"""The gateway role sends pool work to replicas, balances on queue depth, survives one down."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from deepgate.errors import ServiceUnavailable
from sidecar.app import Sidecar
from sidecar.config import SidecarConfig
from sidecar.inference import Embeddings
from sidecar.pool_client import RemoteInference

CONFIG = SidecarConfig.model_validate(
    {"providers": {"openai": {"kind": "openai_compat"}}, "aliases": {"gpt": ["openai:gpt"]}}
)


class Replica:
    """A pool replica's inference double: names itself in its vectors; reports a set depth."""

    def __init__(self, tag: float, depth: int) -> None:
        self.tag = tag
        self.depth = depth
        self.calls = 0

    def embedding_models(self) -> list[str]:
        return ["all-MiniLM-L6-v2"]

    def classifier_models(self) -> list[str]:
        return ["deepgate-safety"]

    async def embed(self, model: str, inputs: list[str], deadline: float | None) -> Embeddings:
        self.calls += 1
        return Embeddings(model, [[self.tag, 0.0] for _ in inputs], len(inputs))

    async def classify(
        self, model: str, texts: list[str], deadline: float | None
    ) -> list[dict[str, float]]:
        self.calls += 1
        return [{"prompt_injection": self.tag} for _ in texts]

    async def queue_depth(self) -> int:
        return self.depth


@pytest.fixture
async def replicas() -> AsyncIterator[list[tuple[Sidecar, Replica]]]:
    out = []
    for tag, depth in ((1.0, 10), (2.0, 0)):
        double = Replica(tag, depth)
        s = Sidecar(CONFIG, "pool", http_address=None, grpc_address="127.0.0.1:0", inference=double)
        await s.start()
        out.append((s, double))
    yield out
    for s, _ in out:
        await s.stop()


async def test_balances_on_reported_queue_depth(replicas: list[tuple[Sidecar, Replica]]) -> None:
    remote = RemoteInference([f"127.0.0.1:{s.grpc_port}" for s, _ in replicas])
    try:
        for _ in range(6):
            await remote.embed("all-MiniLM-L6-v2", ["x"], None)
        busy, idle = replicas[0][1], replicas[1][1]
        assert busy.calls == 1  # tried once, then its depth of 10 sends the rest elsewhere
        assert idle.calls == 5
        assert await remote.classify("deepgate-safety", ["t"], None) == [{"prompt_injection": 2.0}]
    finally:
        await remote.close()


async def test_a_replica_down_the_other_serves_then_none(
    replicas: list[tuple[Sidecar, Replica]],
) -> None:
    remote = RemoteInference([f"127.0.0.1:{s.grpc_port}" for s, _ in replicas])
    try:
        await replicas[1][0].stop()
        for _ in range(3):
            out = await remote.embed("all-MiniLM-L6-v2", ["x"], None)
            assert out.vectors == [[1.0, 0.0]]
        await replicas[0][0].stop()
        with pytest.raises(ServiceUnavailable) as err:
            await remote.embed("all-MiniLM-L6-v2", ["x"], None)
        assert err.value.code == "pool_unreachable"
    finally:
        await remote.close()


async def test_gateway_embeddings_through_the_sdk(replicas: list[tuple[Sidecar, Replica]]) -> None:
    remote = RemoteInference([f"127.0.0.1:{s.grpc_port}" for s, _ in replicas])
    gateway = Sidecar(
        CONFIG, "gateway", http_address=("127.0.0.1", 0), grpc_address=None, inference=remote
    )
    await gateway.start()
    try:
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key="x", max_retries=0
        ) as client:
            out = await client.embeddings.create(
                model="all-MiniLM-L6-v2", input=["a", "b"], encoding_format="float"
            )
        vectors = [d.embedding for d in out.data]
        assert vectors in ([[1.0, 0.0]] * 2, [[2.0, 0.0]] * 2)
        assert out.usage.prompt_tokens == 2
    finally:
        await gateway.stop()
