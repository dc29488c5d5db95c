"""Calling a chain of provider targets: deadlines, retries, breakers, fallback.

A request names a model alias; the alias is an ordered chain of targets (``deepseek`` first,
then ``openai``, then ``anthropic`` for ``deepseek-chat``). For each target in turn:

- skip it while its circuit breaker is open;
- call it with the read timeout ``first_token_s`` inside the request's total deadline;
- on 429, 5xx, timeouts and refused connections, try the same target again after an exponential
  backoff with full jitter, waiting at least the provider's ``Retry-After`` — unless that wait is
  longer than ``max_wait_s``, when the next target is the faster answer;
- on errors that say this target cannot serve the request (our key refused, model unknown there)
  go straight to the next target; on errors that say the request itself is wrong (400, 413) stop:
  every target would refuse it.

A stream falls back only until its first chunk arrived: ``open_stream`` returns once a target
produced one, and later failures reach the caller, who ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from deepgate.errors import DeepgateError, GatewayTimeout, NotFound, ServiceUnavailable
from sidecar.config import SidecarConfig, Target
from sidecar.health import HealthBoard
from sidecar.metrics import Metrics
from sidecar.providers.base import CallOptions, Provider, classify

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
R = TypeVar("R")


@dataclass(slots=True)
class Answer:
    body: dict[str, Any]
    target: Target


@dataclass(slots=True)
class OpenStream:
    target: Target
    chunks: AsyncIterator[dict[str, Any]]


class Dispatcher:
    def __init__(
        self,
        config: SidecarConfig,
        providers: dict[str, Provider],
        board: HealthBoard,
        metrics: Metrics,
        *,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.providers = providers
        self.board = board
        self.metrics = metrics
        self._sleep = sleep
        self._jitter = jitter

    # --- planning ---------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(self.config.aliases)

    def plan(self, model: str) -> list[Target]:
        """The targets for a model alias that have a configured provider, in order."""
        if model not in self.config.aliases:
            raise NotFound(
                f"The model {model!r} does not exist on this gateway. Use one of: "
                f"{', '.join(self.models())}.",
                param="model",
                code="model_not_found",
            )
        chain = [t for t in self.config.chain(model) if t.provider in self.providers]
        if not chain:
            named = sorted({t.provider for t in self.config.chain(model)})
            keyed = [p for p in named if self.config.providers[p].kind != "local"]
            hint = "Set the API key of one of: " + ", ".join(
                f"{p} ({p.upper()}_API_KEY)" for p in keyed
            )
            if len(keyed) < len(named):
                hint += ", or run the sidecar with --role all to serve the local model"
            raise ServiceUnavailable(
                f"No provider for {model!r} is configured. {hint}.", code="no_provider"
            )
        return chain

    # --- calling ----------------------------------------------------------------------------

    async def complete(
        self, body: dict[str, Any], chain: list[Target], request_id: str | None = None
    ) -> Answer:
        deadline = time.monotonic() + self.config.deadlines.total_s

        async def attempt(target: Target, provider: Provider, opts: CallOptions) -> Answer:
            started = time.monotonic()
            result = await provider.complete(body, opts)
            self._ok(target, time.monotonic() - started)
            self.metrics.usage(target.provider, target.model, result.get("usage"))
            return Answer(result, target)

        return await self._over_chain(chain, deadline, request_id, attempt)

    async def open_stream(
        self, body: dict[str, Any], chain: list[Target], request_id: str | None = None
    ) -> OpenStream:
        deadline = time.monotonic() + self.config.deadlines.total_s

        async def attempt(target: Target, provider: Provider, opts: CallOptions) -> OpenStream:
            started = time.monotonic()
            chunks = provider.stream(body, opts)
            try:
                first = await asyncio.wait_for(
                    anext(chunks), min(self.config.deadlines.first_token_s, _left(deadline))
                )
            except StopAsyncIteration:
                raise ServiceUnavailable(
                    f"{target.provider} ended the stream before sending anything.",
                    code="provider_stream_broken",
                ) from None
            except BaseException:
                await _close(chunks)
                raise
            ttft = time.monotonic() - started
            self.metrics.first_token(target.provider, target.model, ttft)
            return OpenStream(target, self._rest(target, first, chunks, started, ttft, deadline))

        return await self._over_chain(chain, deadline, request_id, attempt)

    async def _rest(
        self,
        target: Target,
        first: dict[str, Any],
        chunks: AsyncIterator[dict[str, Any]],
        started: float,
        ttft: float,
        deadline: float,
    ) -> AsyncIterator[dict[str, Any]]:
        """The stream after its first chunk: deadline enforced, health and usage recorded."""
        health = self.board[target.label]
        try:
            yield first
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), _left(deadline))
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise GatewayTimeout(
                        "The answer took longer than this gateway's total deadline.",
                    ) from None
                if chunk.get("usage"):
                    self.metrics.usage(target.provider, target.model, chunk["usage"])
                yield chunk
        except DeepgateError as err:
            health.record_failure()
            self.metrics.call_failed(target.provider, target.model, err.code)
            raise
        finally:
            await _close(chunks)
        health.record_success(time.monotonic() - started, ttft)
        self.metrics.call_ok(target.provider, target.model, time.monotonic() - started)

    async def _over_chain(
        self,
        chain: list[Target],
        deadline: float,
        request_id: str | None,
        attempt: Callable[[Target, Provider, CallOptions], Awaitable[R]],
    ) -> R:
        last: DeepgateError | None = None
        for target in chain:
            failure = await self._at_target(target, deadline, request_id, attempt)
            if not isinstance(failure, DeepgateError):
                return failure
            last = failure if failure.code != "circuit_open" or last is None else last
        assert last is not None  # a chain is never empty
        raise last

    async def _at_target(
        self,
        target: Target,
        deadline: float,
        request_id: str | None,
        attempt: Callable[[Target, Provider, CallOptions], Awaitable[R]],
    ) -> R | DeepgateError:
        """Try one target (with retries): its answer, or the error to move on with.

        The breaker hears one outcome per request: a request that fails here after its retries
        is one failure, however many attempts it took.
        """
        retries = self.config.retries
        provider = self.providers[target.provider]
        health = self.board[target.label]
        err: DeepgateError | None = None
        for n in range(retries.attempts):
            if not health.allow():
                return err or ServiceUnavailable(
                    f"{target.label} is failing and cooling down; no other target answered.",
                    code="circuit_open",
                )
            left = _left(deadline)
            if left <= 0:
                raise GatewayTimeout("No provider answered within this gateway's deadline.")
            opts = CallOptions(
                model=target.model,
                timeout_s=min(self.config.deadlines.first_token_s, left),
                request_id=request_id,
            )
            try:
                return await asyncio.wait_for(attempt(target, provider, opts), left)
            except TimeoutError:
                err = GatewayTimeout(
                    f"{target.provider} did not answer in time.", code="provider_timeout"
                )
            except DeepgateError as exc:
                err = exc
            step = classify(err)
            if step == "give_up":
                raise err
            self.metrics.call_failed(target.provider, target.model, err.code)
            log.warning(
                "target failed", extra={"target": target.label, "code": err.code, "attempt": n + 1}
            )
            if step == "fallback" or n + 1 == retries.attempts:
                break
            delay = self._backoff(n, err.retry_after)
            if delay > retries.max_wait_s or delay >= _left(deadline):
                break  # the next target answers sooner than this one may
            await self._sleep(delay)
        assert err is not None
        health.record_failure()
        return err

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        r = self.config.retries
        delay: float = self._jitter() * min(r.backoff_max_s, r.backoff_base_s * 2.0**attempt)
        return max(delay, retry_after or 0.0)

    def _ok(self, target: Target, seconds: float) -> None:
        self.board[target.label].record_success(seconds)
        self.metrics.call_ok(target.provider, target.model, seconds)


def _left(deadline: float) -> float:
    return deadline - time.monotonic()


async def _close(chunks: AsyncIterator[dict[str, Any]]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # closing a broken stream may raise; it is gone either way
            log.debug("closing a provider stream failed", exc_info=True)
