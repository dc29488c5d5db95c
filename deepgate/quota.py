"""Quota counters that hold across every runner process and replica: reserve, settle, release.

A request is admitted against a set of counters (requests, tokens or spend, each in a fixed
window: a minute, a UTC day, a UTC month). Before the call the policy plugin *reserves* its
estimate on all of them at once: one Lua script checks every counter and adds to all of them only
when none would pass its limit, so two runners that race for the last tokens cannot both win.
The reservation is recorded under its own id. When the sidecar learns the real usage it
*settles* the reservation (the estimate is replaced by the real token count and cost); a request
that never reached a provider is *released* (tokens and spend handed back; the request itself
still counts). Settling and releasing delete the record first, so doing either twice changes
nothing: reconciliation is idempotent per reservation.

Two stores, one contract:

- ``RedisQuotaStore``: the counters in Redis (or Valkey), shared by every process that points at
  it. Two scripts (reserve; settle, of which release is the zero case), sent to Redis once and
  then called with ``EVALSHA``: one round trip per check-and-reserve. Every key carries the hash
  tag ``{dgq}`` so that the scripts' keys share one slot on a Redis Cluster.
- ``MemoryQuotaStore``: the same counters in this process, for a single-node runner without
  Redis. Nothing outside the process can settle its reservations, so what it reserves is what
  counts.

Spend is counted in micro-USD (integers), so every counter is an integer and the script never
rounds.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson

from deepgate.unique import unique_id

Kind = Literal["requests", "tokens", "spend"]
Window = Literal["minute", "day", "month"]

KEY_PREFIX = "{dgq}"
"""Every quota key starts with this (the braces make it a Redis Cluster hash tag)."""

_WINDOW_MARGIN_S = 60  # counters outlive their window a little, for late reconciliation


class QuotaStoreUnavailable(Exception):
    """The store could not be reached or did not answer in time (callers fail open or closed)."""


@dataclass(frozen=True, slots=True)
class Counter:
    """One limit a request is held to, in the window it falls in."""

    key: str  # the counter's store key (``counter_key``)
    kind: Kind
    limit: int
    amount: int  # what this request adds
    reset_at: float  # unix seconds when the window ends
    rule: str = ""  # the config path that set the limit, for messages

    @property
    def ttl_s(self) -> int:
        return max(1, int(self.reset_at - time.time()) + _WINDOW_MARGIN_S)

    @property
    def expire_at(self) -> int:
        return int(self.reset_at) + _WINDOW_MARGIN_S


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the store answered to a reservation."""

    granted: bool
    values: tuple[int, ...]  # each counter after the reservation, or as it stood when refused
    refused: int | None = None  # index of the first counter the request would overrun


_bounds_memo: dict[tuple[Window, int], tuple[str, float]] = {}


def window_bounds(window: Window, now: float) -> tuple[str, float]:
    """The window's label (part of the key) and the unix time it ends, both in UTC.

    Remembered per minute: dates are computed once a minute, not on every request.
    """
    memo = (window, int(now // 60))
    found = _bounds_memo.get(memo)
    if found is None:
        if len(_bounds_memo) > 64:
            _bounds_memo.clear()
        found = _bounds_memo[memo] = _window_bounds(window, now)
    return found


def _window_bounds(window: Window, now: float) -> tuple[str, float]:
    if window == "minute":
        index = int(now // 60)
        return str(index), float((index + 1) * 60)
    day = datetime.fromtimestamp(now, UTC)
    if window == "day":
        start = calendar.timegm((day.year, day.month, day.day, 0, 0, 0))
        return day.strftime("%Y%m%d"), float(start + 86400)
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return day.strftime("%Y%m"), float(calendar.timegm((year, month, 1, 0, 0, 0)))


def counter_key(scope: str, kind: Kind, window: Window, label: str) -> str:
    return f"{KEY_PREFIX}:c:{scope}:{kind}:{window}:{label}"


def reservation_key(reservation_id: str) -> str:
    return f"{KEY_PREFIX}:r:{reservation_id}"


def new_reservation_id() -> str:
    """Unique per draw, and never the client's own request id, which it could repeat. It travels
    only inside the sealed facts and in Redis keys, so it need not be secret."""
    return unique_id()


def _record(counters: Sequence[Counter]) -> dict[str, list[list[Any]]]:
    """What settling needs: which counters took how many tokens and how much spend."""
    return {
        "t": [[c.key, c.amount] for c in counters if c.kind == "tokens"],
        "s": [[c.key, c.amount] for c in counters if c.kind == "spend"],
    }


class QuotaStore(Protocol):
    def reserve(
        self, reservation_id: str, counters: Sequence[Counter], hold_s: int
    ) -> Awaitable[Outcome]:
        """Add every counter's amount if none would pass its limit; else add nothing. The
        request to the store leaves at once: await the result when the outcome is needed."""
        ...

    async def settle(self, reservation_id: str, tokens: int, spend: int) -> bool:
        """Replace the reserved tokens and spend by the real ones; False when already done."""
        ...

    async def release(self, reservation_id: str) -> bool:
        """Hand back the reserved tokens and spend (the request still counts)."""
        ...

    async def close(self) -> None: ...


# --- Redis ------------------------------------------------------------------------------------

# KEYS[1]: the reservation record; KEYS[2..]: the counters. ARGV[1]: the record's lifetime (s);
# ARGV[2]: per counter [limit, amount, expiry (unix s), kind ("r" | "t" | "s")], as one JSON
# array (few arguments: packing them is most of the client's cost). Returns {granted (0|1),
# index of the first refused counter (0 = none), each counter's value...}.
RESERVE_LUA = """
local specs = cjson.decode(ARGV[2])
local n = #KEYS - 1
local values = {}
local refused = 0
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
  values[i] = current
  if refused == 0 and current + specs[i][2] > specs[i][1] then
    refused = i
  end
end
if refused > 0 then
  local out = {0, refused}
  for i = 1, n do out[i + 2] = values[i] end
  return out
end
local out = {1, 0}
local record = {t = {}, s = {}}
for i = 1, n do
  local key, spec = KEYS[i + 1], specs[i]
  local after = redis.call('INCRBY', key, spec[2])
  out[i + 2] = after
  if after == spec[2] then
    redis.call('EXPIREAT', key, spec[3])  -- new in this window: it ends with the window
  end
  if spec[4] ~= 'r' then
    table.insert(record[spec[4]], {key, spec[2]})
  end
end
redis.call('SET', KEYS[1], cjson.encode(record), 'EX', ARGV[1])
return out
"""

# KEYS[1]: the reservation record. ARGV[1]: real tokens, ARGV[2]: real spend (micro-USD).
# Deleting the record first makes a second settle (or a release after a settle) a no-op.
# Counters whose window has already expired are left alone (re-creating them would leak a key).
SETTLE_LUA = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
redis.call('DEL', KEYS[1])
local record = cjson.decode(raw)
local function apply(items, real)
  for _, item in ipairs(items) do
    local delta = real - tonumber(item[2])
    if delta ~= 0 and redis.call('EXISTS', item[1]) == 1 then
      local value = redis.call('INCRBY', item[1], delta)
      if value < 0 then redis.call('SET', item[1], 0, 'KEEPTTL') end
    end
  end
end
apply(record['t'], tonumber(ARGV[1]))
apply(record['s'], tonumber(ARGV[2]))
return 1
"""


class RedisQuotaStore:
    """Counters in Redis; one instance per process and URL.

    Commands go through ``deepgate.redis_wire`` (a RESP client that costs the runner less than
    half of redis-py's per round trip), one connection per call in flight. ``reserve`` sends its
    script before it returns, so the policy can go on while Redis works. Every call is
    ``EVALSHA``; a server that lacks the script (restarted, flushed) gets it once with
    ``SCRIPT LOAD``.
    """

    def __init__(self, url: str, timeout_s: float = 0.1, max_idle: int = 64) -> None:
        from deepgate.redis_wire import RedisWire

        self._wire = RedisWire(url, timeout_s, max_idle=max_idle)
        self._shas: dict[str, bytes] = {}

    def _script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        """Send the script now (``EVALSHA`` once it is loaded); await the result for its reply."""
        sha = self._shas.get(source)
        sent = None if sha is None else self._wire.start("EVALSHA", sha, len(keys), *keys, *args)
        return self._reply(source, keys, args, sent)

    async def _reply(
        self,
        source: str,
        keys: Sequence[str],
        args: Sequence[Any],
        sent: Awaitable[Any] | None,
    ) -> Any:
        from redis.exceptions import NoScriptError, RedisError

        wire = self._wire
        try:
            if sent is not None:
                try:
                    return await sent
                except NoScriptError:
                    pass
            sha = await wire.call("SCRIPT", "LOAD", source)
            self._shas[source] = sha
            return await wire.call("EVALSHA", sha, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            raise QuotaStoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def reserve(
        self, reservation_id: str, counters: Sequence[Counter], hold_s: int
    ) -> Awaitable[Outcome]:
        keys = [reservation_key(reservation_id), *(c.key for c in counters)]
        specs = orjson.dumps([(c.limit, c.amount, c.expire_at, c.kind[0]) for c in counters])
        return self._outcome(self._script(RESERVE_LUA, keys, (hold_s, specs)))

    @staticmethod
    async def _outcome(reply: Awaitable[Any]) -> Outcome:
        out = await reply
        granted, refused = int(out[0]), int(out[1])
        values = tuple(int(v) for v in out[2:])
        return Outcome(bool(granted), values, refused - 1 if refused else None)

    async def settle(self, reservation_id: str, tokens: int, spend: int) -> bool:
        keys = [reservation_key(reservation_id)]
        done = await self._script(SETTLE_LUA, keys, (max(0, tokens), max(0, spend)))
        return bool(int(done))

    async def release(self, reservation_id: str) -> bool:
        return await self.settle(reservation_id, 0, 0)

    async def close(self) -> None:
        await self._wire.close()


# --- in process -------------------------------------------------------------------------------


class MemoryQuotaStore:
    """The same counters in this process (one event loop: every method runs without a pause)."""

    def __init__(self) -> None:
        self._counters: dict[str, tuple[int, float]] = {}  # key -> (value, expires at)
        self._records: dict[str, tuple[dict[str, list[list[Any]]], float]] = {}

    def _get(self, key: str, now: float) -> int:
        found = self._counters.get(key)
        if found is None or found[1] <= now:
            return 0
        return found[0]

    def _sweep(self, now: float) -> None:
        for key in [k for k, (_, exp) in self._counters.items() if exp <= now]:
            del self._counters[key]
        for rid in [r for r, (_, exp) in self._records.items() if exp <= now]:
            del self._records[rid]

    async def reserve(
        self, reservation_id: str, counters: Sequence[Counter], hold_s: int
    ) -> Outcome:
        now = time.time()
        if len(self._counters) > 10_000:
            self._sweep(now)
        values = [self._get(c.key, now) for c in counters]
        for i, (c, value) in enumerate(zip(counters, values, strict=True)):
            if value + c.amount > c.limit:
                return Outcome(False, tuple(values), i)
        after = []
        for c, value in zip(counters, values, strict=True):
            found = self._counters.get(c.key)
            expires = found[1] if found is not None and found[1] > now else now + c.ttl_s
            self._counters[c.key] = (value + c.amount, expires)
            after.append(value + c.amount)
        self._records[reservation_id] = (_record(counters), now + hold_s)
        return Outcome(True, tuple(after))

    async def settle(self, reservation_id: str, tokens: int, spend: int) -> bool:
        found = self._records.pop(reservation_id, None)
        if found is None:
            return False
        now = time.time()
        record = found[0]
        for items, real in ((record["t"], tokens), (record["s"], spend)):
            for key, reserved in items:
                current = self._counters.get(key)
                if current is not None and current[1] > now:
                    self._counters[key] = (max(0, current[0] + real - reserved), current[1])
        return True

    async def release(self, reservation_id: str) -> bool:
        return await self.settle(reservation_id, 0, 0)

    async def close(self) -> None:
        self._counters.clear()
        self._records.clear()
