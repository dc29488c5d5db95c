"""Assembling a sidecar from its config: providers, dispatcher, the HTTP and gRPC faces.

One asyncio loop serves both faces. ``Sidecar.start`` binds them; ``Sidecar.stop`` stops
accepting, marks the gRPC health NOT_SERVING, lets requests and streams in flight finish within
the grace period, and closes the providers' connection pools.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Literal

import grpc
from aiohttp import web

from sidecar.answer_hooks import AnswerHooks
from sidecar.config import ProviderConfig, SidecarConfig
from sidecar.dispatch import Dispatcher
from sidecar.grpc_service import DeepgateService, build_grpc_server, stop_grpc_server
from sidecar.health import HealthBoard
from sidecar.http_face import Face, build_app
from sidecar.inference import Inference, LocalInference
from sidecar.metrics import Metrics
from sidecar.pool_client import RemoteInference
from sidecar.providers.base import Provider

log = logging.getLogger(__name__)

Role = Literal["gateway", "pool", "all"]
ROUTE_KEY_ENV = "DEEPGATE_ROUTE_KEY"


def build_provider(name: str, conf: ProviderConfig, connect_s: float) -> Provider | None:
    """The adapter for one configured provider, or ``None`` when its key is not set."""
    key = conf.resolved_key()
    base_url = conf.resolved_base_url()
    if key is None or base_url is None:
        return None
    if conf.kind == "openai_compat":
        from sidecar.providers.openai_compat import OpenAICompatProvider

        return OpenAICompatProvider(
            name, key, base_url, connect_timeout_s=connect_s, key_ref=conf.rotating_key()
        )
    if conf.kind == "anthropic":
        from sidecar.providers.anthropic import AnthropicProvider

        return AnthropicProvider(
            key, base_url, connect_timeout_s=connect_s, key_ref=conf.rotating_key()
        )
    return None  # "local" is served by the inference pool


def build_providers(config: SidecarConfig) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name, conf in config.providers.items():
        if conf.kind == "local":
            continue  # the pool's model: built with the pool (build_local_inference)
        provider = build_provider(name, conf, config.deadlines.connect_s)
        if provider is None:
            log.warning("provider %s is not available: its key (%s) is not set", name, conf.api_key)
        else:
            providers[name] = provider
    return providers


def build_local_inference(config: SidecarConfig, metrics: Metrics) -> LocalInference:
    """The pool's models in this process (roles pool and all); loads weights, so call it once.

    The embedding model and the safety heads over it share one worker thread: the heads' batches
    are embedding batches too, and two threads would only fight over the same cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    from sidecar.pool.batcher import MicroBatcher, Pool, PoolMetrics, pick_device
    from sidecar.pool.embeddings import EmbeddingModel
    from sidecar.pool.safety import SafetyClassifier

    conf = config.pool
    device = pick_device()
    embedder = EmbeddingModel(device, conf.max_batch_size, conf.torch_threads, conf.dtype)
    classifier = SafetyClassifier(embedder)
    executor = ThreadPoolExecutor(conf.workers, thread_name_prefix="pool")
    pool_metrics = PoolMetrics(metrics.registry)
    batchers = {
        model.name: MicroBatcher(
            model,
            max_wait_ms=conf.max_wait_ms,
            max_queue=conf.max_queue,
            executor=executor,
            metrics=pool_metrics,
        )
        for model in (embedder, classifier)
    }
    log.info(
        "pool models loaded",
        extra={"device": device, "dtype": embedder.dtype, "models": sorted(batchers)},
    )
    return LocalInference(
        Pool(batchers), embedder, embedding=[embedder.name], classifiers=[classifier.name]
    )


def build_remote_pool(config: SidecarConfig) -> tuple[RemoteInference, Provider | None]:
    """Role ``gateway`` with ``pool.addresses``: the replicas' models over gRPC.

    Embeddings and classification go to the replicas, and so does chat for the ``local``
    provider when the config has one (its chains then reach the pool's chat model).
    """
    from sidecar.providers.pool_chat import PoolChatProvider

    conf = config.pool
    remote = RemoteInference(
        list(conf.addresses),
        embedding=[conf.embedding_model],
        classifiers=[conf.classifier_model],
    )
    local = [p for p, c in config.providers.items() if c.kind == "local"]
    log.info("pool replicas", extra={"addresses": list(conf.addresses)})
    return remote, PoolChatProvider(remote) if conf.local_chat and local else None


def build_local_chat(config: SidecarConfig) -> Provider:
    """The ``local`` provider on the pool's chat model; loads weights, so call it once."""
    from sidecar.pool.batcher import pick_device
    from sidecar.pool.local_llm import LocalChatModel
    from sidecar.providers.local import LocalProvider

    model = LocalChatModel(pick_device(), config.pool.torch_threads)
    log.info("local chat model loaded", extra={"device": model.device})
    return LocalProvider(model)


def build_answer_hooks(
    config: SidecarConfig, inference: Inference | None, metrics: Metrics | None = None
) -> AnswerHooks:
    """The steps every answer takes on its way out, in order (see sidecar/answer_hooks.py)."""
    from sidecar.hooks.cache_write import CacheWrite
    from sidecar.hooks.output_safety import OutputSafety
    from sidecar.hooks.quota import QuotaReconciler
    from sidecar.hooks.restore import Restore
    from sidecar.hooks.usage import UsagePublisher

    # CacheWrite stores what the client got: it stays after output safety and restore.
    # Output safety sees the masked answer; Restore then puts the user's own data back.
    # UsagePublisher is last: the ledger's record sees every other hook's outcome.
    return AnswerHooks(
        [
            OutputSafety(metrics),
            Restore(),
            CacheWrite(inference),
            *QuotaReconciler.from_env(),
            *UsagePublisher.from_env(metrics=metrics),
        ]
    )


def route_key_from_env() -> bytes | None:
    key = os.environ.get(ROUTE_KEY_ENV)
    if not key:
        log.warning(
            "running without route signatures: %s is not set, so requests are routed by their "
            "model alias and anyone who reaches this sidecar directly can use it",
            ROUTE_KEY_ENV,
        )
        return None
    return key.encode()


@dataclass
class Sidecar:
    config: SidecarConfig
    role: Role
    http_address: tuple[str, int] | None
    grpc_address: str | None
    providers: dict[str, Provider] = field(default_factory=dict)
    route_key: bytes | None = None
    inference: Inference | None = None  # the pool's models, local or remote
    metrics: Metrics = field(default_factory=Metrics)
    hooks: AnswerHooks = field(default_factory=AnswerHooks)  # see build_answer_hooks
    http_port: int = 0
    grpc_port: int = 0

    def __post_init__(self) -> None:
        self.board = HealthBoard(self.config.breaker)
        self.dispatcher = Dispatcher(self.config, self.providers, self.board, self.metrics)
        self._http: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._service: DeepgateService | None = None

    async def start(self) -> None:
        if self.grpc_address is not None:
            self._service = DeepgateService(
                self.dispatcher, self.board, self.config, self.inference
            )
            server, self.grpc_port = await build_grpc_server(
                self._service, self.grpc_address, self.role
            )
            await server.start()
            self._grpc = server
        if self.http_address is not None:
            face = Face(
                self.config,
                self.dispatcher,
                self.metrics,
                self.route_key,
                self.inference,
                self.hooks,
            )
            self._http = web.AppRunner(
                build_app(face), access_log=None, shutdown_timeout=self.config.shutdown_grace_s
            )
            await self._http.setup()
            host, port = self.http_address
            site = web.TCPSite(self._http, host, port)
            await site.start()
            sockets = getattr(site._server, "sockets", None)
            if sockets:
                self.http_port = sockets[0].getsockname()[1]
        log.info(
            "sidecar serving",
            extra={
                "role": self.role,
                "http_port": self.http_port,
                "grpc_port": self.grpc_port,
                "providers": sorted(self.providers),
                "route_signatures": self.route_key is not None,
            },
        )

    async def stop(self) -> None:
        grace = self.config.shutdown_grace_s
        stops: list[Awaitable[object]] = []
        if self._grpc is not None and self._service is not None:
            stops.append(stop_grpc_server(self._grpc, self._service, grace))
        if self._http is not None:
            stops.append(self._http.cleanup())
        await asyncio.gather(*stops, return_exceptions=True)
        if isinstance(self.inference, LocalInference):
            await self.inference.pool.drain(grace)
        close = getattr(self.inference, "close", None)
        if close is not None:
            await close()
        for provider in self.providers.values():
            await provider.aclose()
        await self.hooks.close()
