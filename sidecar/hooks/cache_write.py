"""Cache write-back: keep a provider's answer where the ``deepgate-cache`` plugin will look for it.

The plugin decides in the runner (key, TTL, scope, semantic partition) and hands the plan over in
the sealed chain facts (``facts["cache"]``, ``cache_status: miss``). Once the client has its
answer, this hook writes it, but only a whole, successful one: status 200, the stream ended
cleanly (``ex.complete``), no error, a real answer (``cacheable_answer``). Errors, partial streams
and answers cut by a content filter are never cached.

Personal data: when the safety plugin masked personal data in the prompt (``facts["restore"]``
non-empty) the answer the client got carries the original data back. Such an answer is never
written: the next request with the same masked prompt belongs to someone else. (The plugin also
marks such requests ``bypass``; this check holds even if a route orders its plugins otherwise.)

The exact entry is written before the client's request completes (for a JSON answer; a stream's
last bytes are already sent), so a repeated request finds it. Indexing for the semantic layer
(one embedding and one upsert) runs in the background: it may lag an instant behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from deepgate import response_cache as rc
from deepgate.config import ConfigError
from deepgate.errors import DeepgateError
from sidecar.answer_hooks import AnswerHook, Exchange
from sidecar.inference import Inference

log = logging.getLogger(__name__)

WRITE_TIMEOUT_S = 1.0
INDEX_TIMEOUT_S = 10.0


def should_write(ex: Exchange) -> bool:
    """Whether this exchange's answer may be cached at all."""
    facts = ex.facts
    return (
        facts.get("cache_status") == "miss"
        and bool(facts.get("cache"))
        and not facts.get("restore")
        and ex.complete
        and ex.status == 200
        and ex.error_code is None
        and ex.answer is not None
        and rc.cacheable_answer(ex.answer)
    )


class CacheWrite(AnswerHook):
    def __init__(self, inference: Inference | None) -> None:
        self.inference = inference
        self._indexing: set[asyncio.Task[None]] = set()

    async def on_finish(self, ex: Exchange) -> None:
        if not should_write(ex) or ex.answer is None:
            return
        plan: dict[str, Any] = dict(ex.facts.get("cache", {}))
        try:
            client = rc.redis_client(await rc.resolve(str(plan["redis"])), WRITE_TIMEOUT_S)
            entry = rc.encode_entry(ex.answer, ex.target)
            await client.set(str(plan["key"]), entry, int(plan["ttl"]))
        except (RedisError, OSError, TimeoutError, ConfigError, KeyError) as exc:
            log.warning("a cacheable answer was not cached: %s", type(exc).__name__)
            return
        semantic = plan.get("semantic")
        if isinstance(semantic, dict) and self.inference is not None:
            task = asyncio.create_task(self._index(ex, plan, semantic))
            self._indexing.add(task)
            task.add_done_callback(self._indexing.discard)

    async def _index(self, ex: Exchange, plan: dict[str, Any], semantic: dict[str, Any]) -> None:
        """Make the answer findable by meaning: embed the question, upsert it with the key."""
        from deepgate.vectorstore import Item, VectorStoreError

        assert self.inference is not None
        text = rc.last_user_text(ex.body)
        if not text or rc.text_digest(text) != semantic.get("text_sha256"):
            return  # not the question the plugin compared (a later plugin changed it)
        loop = asyncio.get_running_loop()
        try:
            embedded = await self.inference.embed(
                str(semantic["embedding_model"]), [text], loop.time() + INDEX_TIMEOUT_S
            )
            store = rc.vector_store(await rc.store_dsn(semantic.get("store")))
            vector = embedded.vectors[0]
            await rc.ensure_collection(store, str(semantic["collection"]), len(vector))
            item = Item(
                id=str(plan["key"]),
                vector=vector,
                text="",  # the question stays out of the index; the vector is enough
                metadata={
                    "partition": str(semantic["partition"]),
                    "key": str(plan["key"]),
                    "expires": int(time.time()) + int(plan["ttl"]),
                },
            )
            await store.upsert(str(semantic["collection"]), [item])
        except (DeepgateError, VectorStoreError, OSError, TimeoutError, ConfigError) as exc:
            log.warning("a cached answer was not indexed for semantic hits: %s", type(exc).__name__)

    async def settle(self) -> None:
        """Wait for the semantic indexing in flight (at shutdown, and in tests)."""
        while self._indexing:
            await asyncio.gather(*list(self._indexing), return_exceptions=True)

    async def close(self) -> None:
        await self.settle()
        await rc.close_stores()
        await rc.close_clients()
