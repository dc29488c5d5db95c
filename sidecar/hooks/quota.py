"""Quota reconciliation: replace the policy plugin's reservation with what the call really used.

Before the call the policy plugin reserved an estimate (prompt tokens + the answer's whole
budget, priced at the alias's dearest target) and put the reservation's id in the sealed facts.
When the exchange ends, this hook reads the same usage record the ledger gets and:

- answered with usage: settles the reservation at the real tokens and the real cost of the
  target that answered;
- failed before any provider answered (an error status, no usage): releases it: tokens and
  spend go back, the request itself still counts;
- cut off mid-stream without a usage report: keeps the estimate (the provider has billed
  something; the reservation's record simply expires).

Settling is idempotent per reservation (the store deletes the record first), so a retried hook
or a second sidecar seeing the same request cannot count it twice. Reservations made with
``store: memory`` live in a runner's memory and cannot be reached from here; they are skipped.
The store is the Redis at ``DEEPGATE_REDIS_URL``, which must be the one the policy uses.
"""

from __future__ import annotations

import logging
import math
import os

from deepgate.catalog import Catalog, load_catalog
from deepgate.quota import QuotaStore, QuotaStoreUnavailable, RedisQuotaStore
from sidecar.answer_hooks import AnswerHook, Exchange, usage_record

log = logging.getLogger(__name__)

REDIS_ENV = "DEEPGATE_REDIS_URL"


class QuotaReconciler(AnswerHook):
    def __init__(self, store: QuotaStore, catalog: Catalog) -> None:
        self.store = store
        self.catalog = catalog

    @classmethod
    def from_env(cls, catalog: Catalog | None = None) -> list[AnswerHook]:
        """The hook when ``DEEPGATE_REDIS_URL`` names the quota store; none otherwise."""
        url = os.environ.get(REDIS_ENV)
        if not url:
            log.info("quota reconciliation is off: %s is not set", REDIS_ENV)
            return []
        # Settling is off the request path: a longer timeout than the policy's reservation.
        return [cls(RedisQuotaStore(url, timeout_s=2.0), catalog or load_catalog())]

    async def on_finish(self, ex: Exchange) -> None:
        reservation = ex.facts.get("reservation")
        if not reservation or reservation.get("store") != "redis":
            return
        rid = str(reservation.get("id") or "")
        if not rid:
            return
        record = usage_record(ex, self.catalog)
        used = record.prompt_tokens + record.completion_tokens
        try:
            if used > 0:
                spend = math.ceil(record.cost_usd * 1_000_000)
                done = await self.store.settle(rid, used, spend)
                outcome = "settled"
            elif record.status >= 400 or ex.target is None:
                done = await self.store.release(rid)
                outcome = "released"
            else:
                return  # answered without a usage report: the estimate stands
        except QuotaStoreUnavailable as exc:
            log.warning(
                "could not reconcile a quota reservation (%s); it stands at its estimate", exc
            )
            return
        log.debug(
            "quota reservation %s",
            outcome if done else "already reconciled",
            extra={"tokens": used, "reserved": reservation.get("tokens")},
        )

    async def close(self) -> None:
        await self.store.close()
