"""A small asyncio Redis client for the request path: one command, one reply, as cheap as it gets.

The runner makes one Redis round trip on most requests (the quota reservation, a cache lookup).
Through redis-py's asyncio connection that round trip costs ~100 µs of the runner's CPU, twice
what the socket itself costs; this client speaks RESP2 on a non-blocking socket and costs ~40 µs:
the command leaves with one ``send``, and its reply is read with one ``recv`` when the caller is
ready for it (the loop is involved only when it has not arrived yet; TLS connections go through
the loop's transport). It does what those calls need and nothing else: ``redis://``,
``rediss://`` and ``unix://`` URLs as redis-py reads them (user, password, database,
``ssl_cert_reqs``), AUTH and SELECT on connect, one command at a time per connection, a deadline
per call, idle connections kept in a list. Errors are redis-py's exception classes, so callers
catch one family whichever client answered.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Coroutine
from typing import Any, cast

from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Reply = Any
"""bytes (bulk and simple strings), int, None, a list of replies, or a ResponseError in a list."""


class _Incomplete(Exception):
    """The buffer ends inside the reply: wait for more bytes."""


def encode(args: tuple[Any, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, (int, float)):  # a tuple: no union object built per call
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send a {type(arg).__name__} to Redis")
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _error(message: str) -> ResponseError:
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


def parse(buf: bytes | bytearray, pos: int = 0) -> tuple[Reply, int]:
    """The reply that starts at ``pos`` and where the next one starts; ``_Incomplete`` if cut."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = buf[pos + 1 : end]
    pos = end + 2
    if kind == 0x3A:  # ':' integer
        return int(line), pos
    if kind == 0x24:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos : pos + size]), pos + size + 2
    if kind == 0x2A:  # '*' array
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 0x2B:  # '+' simple string
        return bytes(line), pos
    if kind == 0x2D:  # '-' error
        return _error(bytes(line).decode("utf-8", "replace")), pos
    raise RedisConnectionError(f"unexpected reply from Redis (type byte {kind!r})")


class _SocketConnection:
    """A plain (TCP or Unix) connection on a non-blocking socket, one command at a time.

    The command goes out with one ``send``; its reply is read with ``recv`` at once when the
    caller asks for it, which is usually after other work, when the reply is already there:
    no trip through the event loop. Only a reply not there yet waits for the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.buf = bytearray()
        self.unsent = b""
        self.deadline = 0.0
        self.timeout_s = 0.0
        self.lost = False

    def send(self, payload: bytes, timeout_s: float) -> None:
        if self.lost:
            raise RedisConnectionError("the connection to Redis is closed")
        self.timeout_s = timeout_s
        self.deadline = self.loop.time() + timeout_s
        try:
            sent = self.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.close()
            raise RedisConnectionError(f"Redis closed the connection ({exc})") from None
        self.unsent = payload[sent:] if sent < len(payload) else b""

    async def reply(self) -> Reply:
        try:
            if self.unsent:  # the socket's buffer was full: the rest goes when it has room
                unsent, self.unsent = self.unsent, b""
                async with asyncio.timeout_at(self.deadline):
                    await self.loop.sock_sendall(self.sock, unsent)
            while True:
                if self.buf:
                    try:
                        reply, used = parse(self.buf)
                    except _Incomplete:
                        pass
                    else:
                        del self.buf[:used]
                        return reply
                try:
                    data = self.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    async with asyncio.timeout_at(self.deadline):
                        data = await self.loop.sock_recv(self.sock, 65536)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                self.buf += data
        except TimeoutError:
            raise RedisTimeoutError(f"Redis did not answer within {self.timeout_s:g} s") from None
        except OSError as exc:
            raise RedisConnectionError(f"Redis closed the connection ({exc})") from None
        except ValueError as exc:
            raise RedisConnectionError(f"unreadable reply from Redis: {exc}") from None

    def close(self) -> None:
        self.lost = True
        self.sock.close()


class _TlsConnection(asyncio.Protocol):
    """A TLS connection (``rediss://``) through the loop's transport, one command at a time:
    its reply is parsed as the bytes arrive."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # kept: asking for it costs a system call (3.11)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Reply] | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.buf = bytearray()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            reply, used = parse(self.buf)
        except _Incomplete:
            return
        except (RedisConnectionError, ValueError) as exc:
            self._fail(RedisConnectionError(f"unreadable reply from Redis: {exc}"))
            self.close()
            return
        del self.buf[:used]
        self.waiter = None
        if self.deadline is not None:
            self.deadline.cancel()
        waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(RedisConnectionError("Redis closed the connection"))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if self.deadline is not None:
            self.deadline.cancel()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _expire(self, timeout_s: float) -> None:
        self._fail(RedisTimeoutError(f"Redis did not answer within {timeout_s:g} s"))
        self.close()  # the reply would come late, into the next command's wait

    def send(self, payload: bytes, timeout_s: float) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("the connection to Redis is closed")
        self.waiter = self.loop.create_future()
        self.deadline = self.loop.call_later(timeout_s, self._expire, timeout_s)
        self.transport.write(payload)

    async def reply(self) -> Reply:
        assert self.waiter is not None
        return await self.waiter  # failed at the deadline by _expire

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


_Connection = _SocketConnection | _TlsConnection


class RedisWire:
    """Commands to one Redis, each on a connection of its own while it runs.

    ``start`` writes the command at once when a connection is idle and returns the reply to
    await, so a caller can overlap the round trip with other work; ``call`` is both in one.
    ``timeout_s`` bounds connecting and the wait for every reply; a command that runs past it
    raises redis-py's ``TimeoutError`` and its connection is dropped (its reply would come late).
    What ``start`` returns must be awaited: that is what hands the connection back.
    """

    def __init__(self, url: str, timeout_s: float, max_idle: int = 64) -> None:
        self._params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._timeout_s = timeout_s
        self._max_idle = max_idle
        self._idle: list[_Connection] = []

    async def call(self, *args: Any) -> Reply:
        """Send one command; its reply (an error reply raises ``ResponseError``)."""
        return await self.start(*args)

    def start(self, *args: Any) -> Coroutine[Any, Any, Reply]:
        """Send one command now if a connection is idle (else once one is connected); await the
        result for its reply."""
        payload = encode(args)
        while self._idle:
            conn = self._idle.pop()
            if conn.lost:
                continue
            try:
                conn.send(payload, self._timeout_s)
            except RedisConnectionError:
                continue
            return self._sent_on_idle(conn, payload)
        return self._on_fresh(payload)

    async def _sent_on_idle(self, conn: _Connection, payload: bytes) -> Reply:
        try:
            return await self._reply(conn)
        except RedisConnectionError:
            # The server had closed this idle connection (restart, idle timeout): once more on
            # a fresh one before calling Redis unreachable.
            return await self._on_fresh(payload)

    async def _on_fresh(self, payload: bytes) -> Reply:
        conn = await self._connect()
        conn.send(payload, self._timeout_s)
        return await self._reply(conn)

    async def _reply(self, conn: _Connection) -> Reply:
        try:
            reply = await conn.reply()
        except BaseException:
            conn.close()  # failed or cancelled mid-reply: the connection's state is unknown
            raise
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _connect(self) -> _Connection:
        p = self._params
        loop = asyncio.get_running_loop()
        conn: _Connection
        try:
            async with asyncio.timeout(self._timeout_s):
                if "ssl_cert_reqs" in p or _is_tls(p):
                    host, port = p.get("host", "localhost"), int(p.get("port", 6379))
                    _, conn = await loop.create_connection(
                        _TlsConnection, host, port, ssl=_tls_context(p)
                    )
                else:
                    conn = _SocketConnection(loop, await _open_socket(loop, p))
                await self._handshake(conn, p)
        except TimeoutError:
            raise RedisTimeoutError(
                f"could not connect to Redis within {self._timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise RedisConnectionError(f"could not connect to Redis: {exc}") from None
        return conn

    async def _handshake(self, conn: _Connection, p: dict[str, Any]) -> None:
        steps: list[tuple[Any, ...]] = []
        if p.get("password") is not None:
            user = p.get("username")
            steps.append(("AUTH", user, p["password"]) if user else ("AUTH", p["password"]))
        if p.get("db"):
            steps.append(("SELECT", int(p["db"])))
        for step in steps:
            conn.send(encode(step), self._timeout_s)
            reply = await conn.reply()
            if isinstance(reply, ResponseError):
                conn.close()
                raise RedisConnectionError(f"Redis refused {step[0]}: {reply}")

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


async def _open_socket(loop: asyncio.AbstractEventLoop, p: dict[str, Any]) -> socket.socket:
    """A connected non-blocking socket to the URL's Unix path or host and port."""
    if "path" in p:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = p["path"]
    else:
        host, port = p.get("host", "localhost"), int(p.get("port", 6379))
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {host!r}")
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _is_tls(params: dict[str, Any]) -> bool:
    cls = params.get("connection_class")
    return cls is not None and cls.__name__ == "SSLConnection"


def _tls_context(params: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if str(params.get("ssl_cert_reqs", "required")).lower() in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
