"""The runner's line to the sidecar: embeddings, classification and provider stats over gRPC.

Plugins that need a model (safety's classifier and topic matching, the semantic cache, RAG) or
live provider numbers (the router) ask the sidecar, never load a model themselves: the runner
stays free of torch. One channel per runner process, opened on first use on the runner's event
loop, to ``DEEPGATE_SIDECAR_GRPC`` (default ``127.0.0.1:9182``, the gRPC port `make run` and the
shipped pod layout give the sidecar). Every call takes the caller's deadline; failures come back
as deepgate errors, so each plugin applies its own ``on_error`` rule.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from deepgate.errors import GatewayTimeout
from sidecar import grpc_client
from sidecar._proto.deepgate.v1 import deepgate_pb2
from sidecar.pool_client import RemoteInference

ADDRESS_ENV = "DEEPGATE_SIDECAR_GRPC"
DEFAULT_ADDRESS = "127.0.0.1:9182"


class SidecarLink:
    """Lazily connected; safe to share between every plugin of the process."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
        self._pool: RemoteInference | None = None

    @property
    def pool(self) -> RemoteInference:
        if self._pool is None:
            self._pool = RemoteInference([self.address])
        return self._pool

    async def embed(
        self, texts: list[str], timeout_s: float, model: str = "all-MiniLM-L6-v2"
    ) -> list[list[float]]:
        """One vector per text, or ``GatewayTimeout`` past ``timeout_s``."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            result = await asyncio.wait_for(self.pool.embed(model, texts, deadline), timeout_s)
        except TimeoutError:
            raise GatewayTimeout("The inference pool did not answer in time.") from None
        return result.vectors

    async def classify(
        self, texts: list[str], timeout_s: float, model: str = "deepgate-safety"
    ) -> list[dict[str, float]]:
        """Per-label scores for each text, or ``GatewayTimeout`` past ``timeout_s``."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            return await asyncio.wait_for(self.pool.classify(model, texts, deadline), timeout_s)
        except TimeoutError:
            raise GatewayTimeout("The inference pool did not answer in time.") from None

    async def provider_stats(self, timeout_s: float) -> list[deepgate_pb2.TargetStats]:
        channel: Any = self.pool._channels[0]
        return await grpc_client.provider_stats(channel, timeout_s=timeout_s)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


LINK = SidecarLink()
"""The process's link (plugins import this one)."""
