"""The request path's Redis client against a real server: replies, errors, deadlines, restarts."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from deepgate.embedded_redis import EmbeddedRedis, free_port
from deepgate.redis_wire import RedisWire


async def test_commands_and_replies(redis_url: str) -> None:
    wire = RedisWire(redis_url, timeout_s=1.0)
    try:
        assert await wire.call("SET", "wire:k", b"v\r\n\x00", "EX", 60) == b"OK"
        assert await wire.call("GET", "wire:k") == b"v\r\n\x00"
        assert await wire.call("GET", "wire:absent") is None
        assert await wire.call("INCRBY", "wire:n", 5) >= 5
        assert await wire.call("EVAL", "return {1, 'a', {2}}", 0) == [1, b"a", [2]]
        with pytest.raises(ResponseError, match="unknown command"):
            await wire.call("NOT-A-COMMAND")
        assert await wire.call("PING") == b"PONG"  # an error reply leaves the connection usable
    finally:
        await wire.close()


async def test_started_commands_run_while_the_caller_works(redis_url: str) -> None:
    wire = RedisWire(redis_url, timeout_s=1.0)
    try:
        await wire.call("DEL", "wire:order")
        first = wire.start("RPUSH", "wire:order", "a")  # an idle connection: sent now
        await asyncio.sleep(0.05)  # the caller does other work; Redis has already run it
        assert redis.Redis.from_url(redis_url).lrange("wire:order", 0, -1) == [b"a"]
        assert await first == 1
        # Many at once: each its own connection, all answered.
        results = await asyncio.gather(*(wire.call("INCR", "wire:many") for _ in range(50)))
        assert len(set(results)) == 50
    finally:
        await wire.close()


async def test_a_reply_past_the_deadline_is_a_timeout(redis_url: str) -> None:
    wire = RedisWire(redis_url, timeout_s=0.1)
    try:
        with pytest.raises(RedisTimeoutError):
            await wire.call("BLPOP", "wire:never", 1)  # blocks past the deadline
        assert await wire.call("PING") == b"PONG"  # a fresh connection serves the next call
    finally:
        await wire.close()


async def test_unreachable_and_restarted_servers() -> None:
    wire = RedisWire(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    with pytest.raises(RedisConnectionError):
        await wire.call("PING")
    server = EmbeddedRedis().start()
    wire = RedisWire(server.url, timeout_s=1.0)
    try:
        assert await wire.call("PING") == b"PONG"
        server.stop()
        server.start()  # same port: the idle connection is dead; one retry on a fresh one
        assert await wire.call("PING") == b"PONG"
    finally:
        await wire.close()
        server.stop()


async def test_database_and_password_from_the_url(redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "wire-user", "on", ">s3cret", "~*", "+@all")
    try:
        base = redis_url.rsplit("/", 1)[0].replace("redis://", "redis://wire-user:s3cret@")
        wire = RedisWire(f"{base}/3", timeout_s=1.0)
        try:
            await wire.call("SET", "wire:db3", "x")
            assert redis.Redis.from_url(f"{redis_url.rsplit('/', 1)[0]}/3").get("wire:db3") == b"x"
            assert admin.get("wire:db3") is None
        finally:
            await wire.close()
        wrong = RedisWire(base.replace("s3cret", "nope") + "/0", timeout_s=1.0)
        with pytest.raises(RedisConnectionError, match="refused AUTH"):
            await wrong.call("PING")
    finally:
        admin.execute_command("ACL", "DELUSER", "wire-user")
