"""plugins.runner.conf_cache: tokens, expiry after last use, sweeping, with a fake clock."""

from __future__ import annotations

import pytest

from plugins import prompt_filter
from plugins.runner.conf_cache import ConfCache, ConfKey, PreparedPlugin

EXPIRE_S = 100.0
TTL = EXPIRE_S + 60.0  # APISIX's expiry plus the runner's margin


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> ConfCache:
    return ConfCache(EXPIRE_S, clock=clock)


def key(n: int = 1) -> ConfKey:
    return ((prompt_filter.NAME, f'{{"max_body_bytes": {n}}}'),)


def plugins(n: int = 1) -> list[PreparedPlugin]:
    return [PreparedPlugin(prompt_filter.SPEC, prompt_filter.Config(max_body_bytes=n))]


def test_margin_is_capped_at_a_minute_and_scales_down_for_short_expiry() -> None:
    assert ConfCache(3600).ttl == 3660
    assert ConfCache(10).ttl == 20


def test_same_key_finds_the_same_token(cache: ConfCache) -> None:
    conf = cache.add(key(), plugins())
    found = cache.find_key(key())
    assert found is conf
    assert found.token == conf.token
    assert cache.get(conf.token) is conf
    assert len(cache) == 1


def test_different_keys_get_different_nonzero_tokens(cache: ConfCache) -> None:
    tokens = {cache.add(key(n), plugins(n)).token for n in range(1, 50)}
    assert len(tokens) == 49
    assert 0 not in tokens
    assert cache.find_key(key(999)) is None


def test_prepared_conf_knows_which_hooks_it_needs(cache: ConfCache) -> None:
    conf = cache.add(key(), plugins())
    assert conf.needs_request is True
    assert conf.needs_response is False
    assert conf.plugins[0].config.max_body_bytes == 1


def test_unknown_token_is_none(cache: ConfCache) -> None:
    assert cache.get(12345) is None
    assert cache.get(0) is None


def test_expires_after_ttl_since_last_use(cache: ConfCache, clock: FakeClock) -> None:
    conf = cache.add(key(), plugins())
    clock.advance(TTL)
    assert cache.get(conf.token) is conf  # exactly at the limit: still there
    clock.advance(TTL + 0.001)
    assert cache.get(conf.token) is None
    assert len(cache) == 0  # an expired get forgets it


def test_apisix_expiry_alone_is_not_enough_to_forget(cache: ConfCache, clock: FakeClock) -> None:
    conf = cache.add(key(), plugins())
    clock.advance(EXPIRE_S + 30)  # APISIX may still hold the token: clocks differ
    assert cache.get(conf.token) is conf


def test_touching_extends_life(cache: ConfCache, clock: FakeClock) -> None:
    conf = cache.add(key(), plugins())
    for _ in range(5):
        clock.advance(TTL - 1)
        assert cache.get(conf.token) is conf
    clock.advance(TTL - 1)
    assert cache.find_key(key()) is conf  # find_key touches too
    clock.advance(TTL - 1)
    assert cache.get(conf.token) is conf
    clock.advance(TTL + 1)
    assert cache.get(conf.token) is None


def test_find_key_of_expired_conf_is_none_and_readding_gives_a_new_token(
    cache: ConfCache, clock: FakeClock
) -> None:
    old = cache.add(key(), plugins())
    clock.advance(TTL + 1)
    assert cache.find_key(key()) is None
    new = cache.add(key(), plugins())
    assert new.token != old.token
    assert cache.get(old.token) is None
    assert cache.get(new.token) is new
    assert cache.find_key(key()) is new  # dropping the old token kept the new key mapping


def test_sweep_removes_stale_entries(cache: ConfCache, clock: FakeClock) -> None:
    stale = [cache.add(key(n), plugins(n)) for n in range(1, 6)]
    clock.advance(TTL / 2)
    fresh = cache.add(key(100), plugins(100))
    assert len(cache) == 6
    clock.advance(TTL / 2 + 1)  # the first five are now stale, `fresh` is not
    newest = cache.add(key(200), plugins(200))  # adding sweeps
    assert len(cache) == 2
    assert all(cache.get(c.token) is None for c in stale)
    assert cache.get(fresh.token) is fresh
    assert cache.get(newest.token) is newest
    assert all(cache.find_key(c.key) is None for c in stale)


def test_sweep_does_not_drop_entries_in_use(cache: ConfCache, clock: FakeClock) -> None:
    used = cache.add(key(1), plugins(1))
    for _ in range(4):
        clock.advance(TTL - 1)
        assert cache.get(used.token) is used
        cache.add(key(int(clock.now)), plugins())
    assert cache.get(used.token) is used


def test_token_never_zero_when_wrapping(cache: ConfCache) -> None:
    cache._next_token = 0xFFFFFFFF  # as after four billion prepares
    last = cache.add(key(1), plugins(1))
    wrapped = cache.add(key(2), plugins(2))
    assert last.token == 0xFFFFFFFF
    assert wrapped.token == 1
    assert cache.get(last.token) is last
    assert cache.get(wrapped.token) is wrapped
