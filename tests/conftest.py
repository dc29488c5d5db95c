"""Fixtures every test folder may use: the real servers deepgate's data layer talks to."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deepgate.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One real Redis-compatible server on 127.0.0.1 for the whole session."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session's Redis, emptied before each test that asks for it."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url
