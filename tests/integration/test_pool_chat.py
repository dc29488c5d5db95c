"""A gateway-role sidecar answers `local` chat with the pool replicas' model, over gRPC.

Two pool replicas each serve a stand-in chat model that names its replica; the gateway reaches
them through the `local` provider it builds from `pool.addresses`, and clients use the official
openai SDK against the gateway's HTTP face. With one replica down the other answers; with both
down the client gets 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from sidecar.app import Sidecar, build_remote_pool
from sidecar.config import SidecarConfig
from sidecar.providers.base import CallOptions

POOL = SidecarConfig.model_validate(
    {"providers": {"local": {"kind": "local"}}, "aliases": {"local": ["local:tiny"]}}
)


class NamedModel:
    """The pool's chat model, as one replica would answer: it says which replica it is."""

    name = "local"

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.calls = 0

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        self.calls += 1
        message = {"role": "assistant", "content": f"replica {self.replica}"}
        return {
            "id": "chatcmpl-pool",
            "object": "chat.completion",
            "created": 0,
            "model": opts.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }

    async def stream(
        self, body: dict[str, Any], opts: CallOptions
    ) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        base = {"id": "chatcmpl-pool", "object": "chat.completion.chunk", "created": 0}
        for piece in ("replica ", self.replica):
            yield {
                **base,
                "model": opts.model,
                "choices": [{"index": 0, "delta": {"content": piece}}],
            }
        yield {
            **base,
            "model": opts.model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def replicas() -> AsyncIterator[list[tuple[Sidecar, NamedModel]]]:
    out = []
    for name in ("a", "b"):
        model = NamedModel(name)
        s = Sidecar(
            POOL, "pool", http_address=None, grpc_address="127.0.0.1:0", providers={"local": model}
        )
        await s.start()
        out.append((s, model))
    yield out
    for s, _ in out:
        await s.stop()


@pytest.fixture
async def gateway(replicas: list[tuple[Sidecar, NamedModel]]) -> AsyncIterator[Sidecar]:
    config = SidecarConfig.model_validate(
        {
            "providers": {"local": {"kind": "local"}},
            "aliases": {"local": ["local:smollm2-135m-instruct"]},
            "pool": {"addresses": [f"127.0.0.1:{s.grpc_port}" for s, _ in replicas]},
        }
    )
    remote, chat = build_remote_pool(config)
    assert chat is not None
    s = Sidecar(
        config,
        "gateway",
        http_address=("127.0.0.1", 0),
        grpc_address=None,
        providers={"local": chat},
        inference=remote,
    )
    await s.start()
    yield s
    await s.stop()
    await remote.close()


def client(gateway: Sidecar) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key="x", max_retries=0
    )


async def test_local_chat_is_answered_by_a_pool_replica(
    gateway: Sidecar, replicas: list[tuple[Sidecar, NamedModel]]
) -> None:
    async with client(gateway) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="local", messages=[{"role": "user", "content": "hi"}]
        )
        answer = raw.parse()
        stream = await sdk.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert answer.choices[0].message.content in ("replica a", "replica b")
    assert answer.usage is not None
    assert answer.usage.total_tokens == 5
    assert raw.headers["x-deepgate-route"] == "local:smollm2-135m-instruct"
    assert text in ("replica a", "replica b")
    assert sum(model.calls for _, model in replicas) == 2


async def test_a_replica_down_the_other_answers_then_503(
    gateway: Sidecar, replicas: list[tuple[Sidecar, NamedModel]]
) -> None:
    await replicas[0][0].stop()
    async with client(gateway) as sdk:
        for _ in range(3):
            answer = await sdk.chat.completions.create(
                model="local", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content == "replica b"
        stream = await sdk.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "replica b"
        await replicas[1][0].stop()
        with pytest.raises(openai.APIStatusError) as err:
            await sdk.chat.completions.create(
                model="local", messages=[{"role": "user", "content": "hi"}]
            )
    assert err.value.status_code == 503
