"""Which route serves a request: APISIX's default router (``radixtree_host_uri``), by hand.

APISIX sorts candidates in a fixed way and a local stand-in must sort them the same, or a request
reaches one route here and another in production. The order, from lua-resty-radixtree and
APISIX's host router:

1. Routes with hosts come before routes without: the request's ``$host`` (lower-case, no port)
   is looked up among exact hosts first, then among ``*.suffix`` wildcards, longest suffix first.
   Within the best host that has a matching route, and failing that among host-less routes:
2. an exact ``uri`` beats any prefix (``/v1/*``); prefixes are tried longest first;
3. among routes on the same path, higher ``priority`` first, then the order in the file;
4. ``methods`` filters a candidate out (the next one is tried), so a method no route allows is a
   404, as in APISIX.
"""

from __future__ import annotations

from collections.abc import Iterable

from devgateway.conf import Route


def _uri_rank(pattern: str, path: str) -> int | None:
    """How specific a uri pattern's match is (higher first), or ``None`` for no match."""
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return len(prefix) if path.startswith(prefix) else None
    return 1 << 30 if path == pattern else None  # the exact-path hash is looked at first


def _host_rank(pattern: str, host: str) -> int | None:
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return len(suffix) if host.endswith(suffix) and len(host) > len(suffix) else None
    return 1 << 30 if host == pattern else None


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        self._with_hosts = [r for r in self.routes if r.hosts]
        self._without_hosts = [r for r in self.routes if not r.hosts]

    @staticmethod
    def _by_uri(routes: Iterable[Route], method: str, path: str) -> Route | None:
        candidates = []
        for route in routes:
            ranks = [r for r in (_uri_rank(u, path) for u in route.uris) if r is not None]
            if ranks and (not route.methods or method in route.methods):
                candidates.append((-max(ranks), -route.priority, route.index, route))
        return min(candidates, key=lambda c: c[:3])[3] if candidates else None

    def match(self, method: str, path: str, host: str) -> Route | None:
        groups: dict[int, list[Route]] = {}
        for route in self._with_hosts:
            ranks = [r for r in (_host_rank(h, host) for h in route.hosts) if r is not None]
            if ranks:
                groups.setdefault(max(ranks), []).append(route)
        for rank in sorted(groups, reverse=True):
            found = self._by_uri(groups[rank], method, path)
            if found is not None:
                return found
        return self._by_uri(self._without_hosts, method, path)
