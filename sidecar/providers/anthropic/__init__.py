"""The Anthropic provider adapter: one ``AsyncAnthropic`` client behind the ``Provider`` contract.

The translation lives in four modules, one per direction: ``request`` (canonical request to
Messages parameters), ``response`` (a ``Message`` to a ``chat.completion``), ``stream`` (raw stream
events to chunks) and ``errors`` (SDK exceptions to deepgate's). This module only holds the client
and the call sites.

The SDK's own retries are off: the dispatcher retries, falls back, and owns the deadline. The
HTTP connection pool is one ``httpx2.AsyncClient`` for the adapter's lifetime (injectable, so tests
and a process sharing one pool can pass theirs; an injected pool is the caller's to close).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2

from deepgate.errors import DeepgateError, UpstreamError
from deepgate.secrets import SecretRef
from sidecar.providers.anthropic.errors import map_error
from sidecar.providers.anthropic.request import to_messages_params
from sidecar.providers.anthropic.response import from_message
from sidecar.providers.anthropic.stream import StreamTranslator
from sidecar.providers.base import PROVIDER_STREAM_BROKEN, CallOptions

__all__ = ["AnthropicProvider"]

log = logging.getLogger(__name__)


class AnthropicProvider:
    name = "anthropic"

    def __init__(
        self,
        api_key: str,
        base_url: str,
        *,
        connect_timeout_s: float = 5.0,
        http_client: httpx2.AsyncClient | None = None,
        default_max_tokens: int = 4096,
        key_ref: SecretRef | None = None,
    ) -> None:
        self._key_ref = key_ref  # re-read per call (cached for the secret TTL): rotation
        self._connect_timeout_s = connect_timeout_s
        self._default_max_tokens = default_max_tokens
        self._owns_http = http_client is None
        http = http_client or anthropic.DefaultAsyncHttpxClient(
            timeout=httpx2.Timeout(600.0, connect=connect_timeout_s)
        )
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, max_retries=0, http_client=http
        )

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        params = to_messages_params(body, opts.model, default_max_tokens=self._default_max_tokens)
        if self._key_ref is not None:
            self._client.api_key = await self._key_ref.get()
        try:
            msg = await self._client.messages.create(**params, timeout=self._timeout(opts))
        except anthropic.AnthropicError as exc:
            raise self._failed(exc, opts) from None
        return from_message(msg)

    async def stream(
        self, body: dict[str, Any], opts: CallOptions
    ) -> AsyncIterator[dict[str, Any]]:
        params = to_messages_params(body, opts.model, default_max_tokens=self._default_max_tokens)
        translator = StreamTranslator(opts.model)
        if self._key_ref is not None:
            self._client.api_key = await self._key_ref.get()
        try:
            events = await self._client.messages.create(
                **params, stream=True, timeout=self._timeout(opts)
            )
        except anthropic.AnthropicError as exc:
            raise self._failed(exc, opts) from None
        try:
            async for event in events:
                for chunk in translator.feed(event):
                    yield chunk
                if translator.finished:
                    break  # message_stop: nothing follows that matters, release the connection
        except (anthropic.AnthropicError, httpx2.HTTPError) as exc:
            raise self._failed(exc, opts) from None
        finally:
            await events.close()
        if not translator.finished:
            raise UpstreamError(
                "anthropic ended the stream before the answer was complete. Retry the request.",
                code=PROVIDER_STREAM_BROKEN,
            )

    async def aclose(self) -> None:
        if self._owns_http:
            await self._client.close()

    def _timeout(self, opts: CallOptions) -> httpx2.Timeout:
        return httpx2.Timeout(opts.timeout_s, connect=self._connect_timeout_s)

    @staticmethod
    def _failed(
        exc: anthropic.AnthropicError | httpx2.HTTPError, opts: CallOptions
    ) -> DeepgateError:
        err = map_error(exc)
        # Status and Anthropic's request id identify the failure for support; no body, no key.
        log.info(
            "anthropic call failed: %s status=%s provider_request_id=%s request_id=%s",
            type(exc).__name__,
            getattr(exc, "status_code", None),
            getattr(exc, "request_id", None),
            opts.request_id,
        )
        return err
