"""Prepared plugin confs, addressed by the token APISIX stores for a route.

APISIX prepares a route's plugin list once and then sends only the token with each call. It keeps
the token ``APISIX_CONF_EXPIRE_TIME`` seconds; we keep the conf that long plus a margin after its
last use, so a token APISIX still holds is never forgotten here, and a conf no route uses any more
does not stay in memory for ever. The same list of (name, JSON) pairs gets the same token while it
is cached, so re-preparing a route does not grow the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from plugins.base import PluginSpec
from plugins.runner.codec import ExtraInfo, ReqBody, Var

ConfKey = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class PreparedPlugin:
    spec: PluginSpec
    config: Any


@dataclass(slots=True)
class PreparedConf:
    token: int
    key: ConfKey
    plugins: list[PreparedPlugin]
    last_used: float = 0.0
    route_id: str | None = None  # from PrepareConf's key; None when the key names no route
    needs_request: bool = field(init=False)
    needs_response: bool = field(init=False)
    # What the runner asks as soon as a call comes in: what the chain's plugins always read
    # (their specs' wants_vars and wants_body) less what it knows already (the route), when that
    # is two questions or more (one costs the same asked when it is needed).
    prefetch: tuple[ExtraInfo, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.needs_request = any(p.spec.on_request for p in self.plugins)
        self.needs_response = any(p.spec.on_response for p in self.plugins)
        handlers = [p.spec for p in self.plugins if p.spec.on_request]
        wanted = dict.fromkeys(name for spec in handlers for name in spec.wants_vars)
        known = () if self.route_id is None else ("route_id",)
        asks: list[ExtraInfo] = [Var(name) for name in wanted if name not in known]
        if any(spec.wants_body for spec in handlers):
            asks.append(ReqBody())
        self.prefetch = tuple(asks) if len(asks) >= 2 and self.needs_request else ()


class ConfCache:
    """Token -> prepared conf, with expiry after last use."""

    def __init__(self, expire_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        # The margin covers clock skew between APISIX's cache and ours.
        self.ttl = expire_s + min(60.0, expire_s)
        self._clock = clock
        self._by_token: dict[int, PreparedConf] = {}
        self._by_key: dict[ConfKey, PreparedConf] = {}
        self._next_token = 1
        self._next_sweep = clock() + self.ttl

    def __len__(self) -> int:
        return len(self._by_token)

    def find_key(self, key: ConfKey) -> PreparedConf | None:
        """The live conf already prepared for exactly this list, touched."""
        conf = self._by_key.get(key)
        if conf is None or self._expired(conf):
            return None
        conf.last_used = self._clock()
        return conf

    def add(
        self, key: ConfKey, plugins: list[PreparedPlugin], route_id: str | None = None
    ) -> PreparedConf:
        self._sweep()
        token = self._next_token
        while token in self._by_token:  # only after 2**32 prepares: never reuse a live one
            token = token % 0xFFFFFFFF + 1
        # Tokens are uint32 on the wire; skip 0 (it reads as "no token") when wrapping.
        self._next_token = token % 0xFFFFFFFF + 1
        conf = PreparedConf(
            token=token, key=key, plugins=plugins, last_used=self._clock(), route_id=route_id
        )
        self._by_token[token] = conf
        self._by_key[key] = conf
        return conf

    def get(self, token: int) -> PreparedConf | None:
        """The conf for ``token``, touched; ``None`` when unknown or expired."""
        conf = self._by_token.get(token)
        if conf is None:
            return None
        if self._expired(conf):
            self._drop(conf)
            return None
        conf.last_used = self._clock()
        return conf

    def _expired(self, conf: PreparedConf) -> bool:
        return self._clock() - conf.last_used > self.ttl

    def _drop(self, conf: PreparedConf) -> None:
        self._by_token.pop(conf.token, None)
        if self._by_key.get(conf.key) is conf:
            del self._by_key[conf.key]

    def _sweep(self) -> None:
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.ttl
        for conf in [c for c in self._by_token.values() if self._expired(c)]:
            self._drop(conf)
