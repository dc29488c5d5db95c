"""The ``local`` provider of a gateway-role sidecar: the pool replicas' chat model over gRPC.

In production the chat model runs on the GPU pool (its own Deployment), not beside APISIX. A
sidecar in role ``gateway`` with ``pool.addresses`` serves the ``local`` targets of its chains
through this adapter: ``Generate`` / ``GenerateStream`` on the replica with the lowest reported
queue depth, the next one when a replica is down (``sidecar.pool_client.RemoteInference``). The
answers are the pool's own canonical dicts, so the faces and the dispatcher see the same contract
as with the in-process ``LocalProvider``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sidecar.pool_client import RemoteInference
from sidecar.providers.base import CallOptions


class PoolChatProvider:
    name = "local"

    def __init__(self, remote: RemoteInference, *, owns_remote: bool = False) -> None:
        self.remote = remote
        self._owns_remote = owns_remote

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        return await self.remote.generate(body, opts.request_id or "", opts.timeout_s)

    def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]:
        return self.remote.generate_stream(body, opts.request_id or "", opts.timeout_s)

    async def aclose(self) -> None:
        if self._owns_remote:
            await self.remote.close()
