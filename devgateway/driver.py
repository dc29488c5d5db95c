"""APISIX's side of the external-plugin protocol, byte for byte.

This plays what APISIX's ``ext-plugin`` Lua code does: frames on a Unix socket, PrepareConf on
its own connection, HTTPReqCall / HTTPRespCall answering the runner's ExtraInfo questions until
the final reply, and on ``CONF_TOKEN_NOT_FOUND`` a new PrepareConf and a retry on a new
connection with a new id (3 tries in all). Tests and benchmarks drive the runner with it, and
the development gateway uses it as its client core.

Connections are pooled like APISIX's keepalive pool: one exchange at a time on a connection, and
a pooled connection the runner has closed (it exited, or restarted) is dropped rather than used,
as nginx drops a keepalive connection whose peer went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from plugins.runner import codec
from plugins.runner.codec import ErrCode, ExtraInfo, MsgType

R = TypeVar("R")

Answer = Callable[[ExtraInfo], Awaitable[bytes | None]]
"""How the driver answers the runner's ExtraInfo questions (a variable, a body)."""


class RunnerError(Exception):
    """The runner answered RPC_ERROR, or something APISIX would treat as a failure."""

    def __init__(self, message: str, code: ErrCode | None = None) -> None:
        super().__init__(message)
        self.code = code


async def no_answers(info: ExtraInfo) -> bytes | None:
    return None


class RunnerConnection:
    """One connection to the runner; one exchange at a time, as APISIX uses it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str, connect_s: float = 1.0) -> RunnerConnection:
        """Connect with APISIX's 1 s connect timeout."""
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), connect_s)
        return cls(reader, writer)

    @property
    def usable(self) -> bool:
        """Still open at both ends (a runner that went away has sent EOF)."""
        return not self.writer.is_closing() and not self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def send(self, msg_type: int, payload: bytes) -> None:
        self.writer.write(codec.frame(msg_type, payload))
        await self.writer.drain()

    async def read(self) -> tuple[int, bytes]:
        header = await self.reader.readexactly(4)
        msg_type, size = codec.parse_header(header)
        return msg_type, await self.reader.readexactly(size) if size else b""

    async def _final(self, expected: int, answer: Answer) -> bytes:
        """Answer ExtraInfo frames until the first frame of another type, and return it."""
        while True:
            msg_type, payload = await self.read()
            if msg_type == MsgType.RPC_EXTRA_INFO:
                info = codec.decode_extra_info_req(payload).info
                result = await answer(info)
                await self.send(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(result))
                continue
            if msg_type == MsgType.RPC_ERROR:
                code = codec.decode_err_resp(payload).code
                raise RunnerError(f"runner answered {code.name}", code)
            if msg_type != expected:
                raise RunnerError(f"runner answered frame type {msg_type}, expected {expected}")
            return payload

    async def prepare(self, conf: list[tuple[str, str]], key: str = "") -> int:
        await self.send(
            MsgType.RPC_PREPARE_CONF, codec.encode_prepare_conf_req(codec.PrepareConfReq(conf, key))
        )
        payload = await self._final(MsgType.RPC_PREPARE_CONF, no_answers)
        return codec.decode_prepare_conf_resp(payload).conf_token

    async def req_call(
        self, req: codec.HTTPReqCallReq, answer: Answer = no_answers
    ) -> codec.HTTPReqCallResp:
        await self.send(MsgType.RPC_HTTP_REQ_CALL, codec.encode_http_req_call_req(req))
        payload = await self._final(MsgType.RPC_HTTP_REQ_CALL, answer)
        return codec.decode_http_req_call_resp(payload)

    async def resp_call(
        self, req: codec.HTTPRespCallReq, answer: Answer = no_answers
    ) -> codec.HTTPRespCallResp:
        await self.send(MsgType.RPC_HTTP_RESP_CALL, codec.encode_http_resp_call_req(req))
        payload = await self._final(MsgType.RPC_HTTP_RESP_CALL, answer)
        return codec.decode_http_resp_call_resp(payload)


@dataclass(frozen=True, slots=True)
class PluginChain:
    """One route's ext-plugin conf: the plugin list APISIX prepares, and its cache key."""

    key: str
    conf: tuple[tuple[str, str], ...]


class ExtPluginDriver:
    """APISIX's ext-plugin client: token cache, keepalive pool, token-miss retry."""

    TRIES = 3
    ID_BITS = 22  # APISIX: the worker id in the high bits, a counter wrapping at 2^22 below

    def __init__(self, path: str, pool_size: int = 32, timeout_s: float = 60.0) -> None:
        self.path = path
        self.pool_size = pool_size
        self.timeout = timeout_s
        self._idle: list[RunnerConnection] = []
        self._tokens: dict[PluginChain, int] = {}
        self._ids = itertools.count()

    async def _acquire(self) -> RunnerConnection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            await conn.close()
        return await RunnerConnection.open(self.path)

    async def _release(self, conn: RunnerConnection, ok: bool) -> None:
        if ok and len(self._idle) < self.pool_size:
            self._idle.append(conn)
        else:
            await conn.close()

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()

    def forget_tokens(self) -> None:
        self._tokens.clear()

    async def runner_exited(self) -> None:
        """What APISIX does on its runner-exit event: flush the token cache and the pool."""
        self.forget_tokens()
        await self.close()

    async def _token(self, chain: PluginChain) -> int:
        token = self._tokens.get(chain)
        if token is None:
            # PrepareConf travels on a connection of its own, as APISIX does it.
            conn = await RunnerConnection.open(self.path)
            try:
                token = await asyncio.wait_for(
                    conn.prepare(list(chain.conf), chain.key), self.timeout
                )
            finally:
                await conn.close()
            self._tokens[chain] = token
        return token

    async def _with_retry(
        self,
        chain: PluginChain,
        req: codec.HTTPReqCallReq | codec.HTTPRespCallReq,
        exchange: Callable[[RunnerConnection], Awaitable[R]],
    ) -> R:
        """Run one exchange with a fresh id, re-preparing and retrying on a token miss."""
        for attempt in range(self.TRIES):
            req.conf_token = await self._token(chain)
            req.id = next(self._ids) % (1 << self.ID_BITS)
            conn = await self._acquire()
            ok = False
            try:
                resp = await asyncio.wait_for(exchange(conn), self.timeout)
                ok = True
                return resp
            except RunnerError as exc:
                if exc.code != ErrCode.CONF_TOKEN_NOT_FOUND or attempt == self.TRIES - 1:
                    raise
                self.forget_tokens()  # APISIX flushes its whole token cache and prepares again
            finally:
                await self._release(conn, ok)
        raise RunnerError("conf token not found after every retry", ErrCode.CONF_TOKEN_NOT_FOUND)

    async def req_call(
        self, chain: PluginChain, req: codec.HTTPReqCallReq, answer: Answer = no_answers
    ) -> codec.HTTPReqCallResp:
        """Run a route's request-phase chain; ``req.id`` and ``conf_token`` are set here."""
        return await self._with_retry(chain, req, lambda conn: conn.req_call(req, answer))

    async def resp_call(
        self, chain: PluginChain, req: codec.HTTPRespCallReq, answer: Answer = no_answers
    ) -> codec.HTTPRespCallResp:
        """Run a route's post-resp chain; ``req.id`` and ``conf_token`` are set here."""
        return await self._with_retry(chain, req, lambda conn: conn.resp_call(req, answer))
