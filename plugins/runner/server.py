"""The runner: serves APISIX's external-plugin calls on a Unix socket.

APISIX opens connections from a keepalive pool and makes one exchange at a time on each, so
concurrency is the number of connections: every connection gets its own task and is served in
order, and a plugin waiting on I/O for one request never holds up another connection.

Each exchange is one of:
- PrepareConf: validate the plugin list and configs once, answer a token;
- HTTPReqCall: run the chain's request handlers in conf order, asking APISIX for the body and
  variables only when a handler wants them (ExtraInfo frames on the same connection), and answer
  one merged Stop, Rewrite or no action;
- HTTPRespCall: run the response hooks, asking for the upstream body only when one wants it.

Anything that does not follow the protocol is answered with RPC_ERROR ``BAD_REQUEST`` while the
connection is still in step, and otherwise the connection is closed. Nothing a peer sends can
stop the runner.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Awaitable
from typing import cast

import orjson
from pydantic import ValidationError

from deepgate.config import describe_validation_error
from deepgate.errors import PayloadTooLarge
from deepgate.logs import request_id as log_request_id
from plugins.base import PluginSpec, RequestContext, ResponseContext, error_stop
from plugins.runner import codec
from plugins.runner.chain import run_request_chain, run_response_hooks
from plugins.runner.codec import ErrCode, ExtraInfo, MsgType, ProtocolError
from plugins.runner.conf_cache import ConfCache, ConfKey, PreparedConf, PreparedPlugin
from plugins.usage import record_for
from sidecar.hooks.usage import UsagePublisher

log = logging.getLogger(__name__)

# APISIX answers ExtraInfo at once and sends whole frames; a peer that stalls mid-frame or
# mid-exchange for this long is gone (APISIX's own send timeout is 60 s). The watchdog looks
# every WATCHDOG_EVERY_S.
FRAME_TIMEOUT_S = 60.0
WATCHDOG_EVERY_S = 5.0
# Frames received but not yet taken; past this the connection stops reading until they are.
MAX_QUEUED_FRAMES = 64
# How long the only call in flight polls for APISIX's answer instead of sleeping (seconds);
# DEEPGATE_RUNNER_POLL_US=0 turns polling off.
POLL_ENV = "DEEPGATE_RUNNER_POLL_US"
DEFAULT_POLL_US = 300


def poll_seconds(raw: str | None) -> float:
    """``DEEPGATE_RUNNER_POLL_US`` in seconds; the default (logged) when it is not a number."""
    if raw is None or raw.strip() == "":
        return DEFAULT_POLL_US / 1_000_000
    try:
        return max(0, int(raw)) / 1_000_000
    except ValueError:
        log.warning(
            "%s=%r is not a whole number of microseconds; polling %d µs",
            POLL_ENV,
            raw,
            DEFAULT_POLL_US,
        )
        return DEFAULT_POLL_US / 1_000_000


POLL_S = poll_seconds(os.environ.get(POLL_ENV))

_ERR_FRAMES = {
    code: codec.frame(MsgType.RPC_ERROR, codec.encode_err_resp(code)) for code in ErrCode
}
_REQ_BODY_FRAME = codec.frame(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_req(codec.ReqBody()))
_RESP_BODY_FRAME = codec.frame(
    MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_req(codec.RespBody())
)


class PrepareError(Exception):
    """A conf list that cannot be prepared; the message names the plugin and the problem."""


class _Reply(Exception):
    """Answer the current exchange with RPC_ERROR ``code`` and keep the connection."""

    def __init__(self, code: ErrCode) -> None:
        self.code = code


class Runner:
    """The protocol server. ``registry`` maps plugin names to their specs."""

    def __init__(self, registry: dict[str, PluginSpec], conf_expire_s: float = 3600.0) -> None:
        self.registry = registry
        self.confs = ConfCache(conf_expire_s)
        # Usage records of the requests the chain answers itself (none without Redis).
        self.usage = UsagePublisher.for_env()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._var_frames: dict[str, bytes] = {}
        self._path: str | None = None
        self._open: set[_Connection] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, path: str) -> None:
        """Listen on the Unix socket ``path``, replacing a stale socket file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        # A deep backlog: APISIX workers may open many connections in one burst.
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _Connection(self), path=path, backlog=1024
        )
        self._path = path
        self._watchdog = loop.call_later(WATCHDOG_EVERY_S, self._close_stalled)
        # nginx workers run as another user: they must be able to connect.
        os.chmod(path, 0o766)  # noqa: S103 - the protocol requires a world-connectable socket
        log.info("runner listening", extra={"socket": path, "plugins": sorted(self.registry)})

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting, let calls in flight finish within ``grace_s``, close the rest."""
        if self._server is not None:
            self._server.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.warning("stopping with %d calls still in flight", self._busy)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=0.5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 0.5)
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        if self.usage is not None:
            await self.usage.close()

    # --- one connection ---------------------------------------------------------------------

    async def _serve(self, conn: _Connection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._open.add(conn)
        try:
            await conn.run()
        except (ConnectionError, TimeoutError):
            pass  # the peer went away or stalled: nothing to answer
        except asyncio.CancelledError:
            pass  # shutting down
        except Exception:
            log.exception("connection closed after an unexpected error")
        finally:
            self._connections.discard(task)
            self._open.discard(conn)
            conn.close()

    def _close_stalled(self) -> None:
        """Close connections stuck mid-frame or mid-exchange for ``FRAME_TIMEOUT_S``: one timer
        for the runner instead of one per read."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self._open):
            if conn.stalled_since is not None and now - conn.stalled_since > FRAME_TIMEOUT_S:
                log.warning("closing a connection stalled for %.0f s", now - conn.stalled_since)
                conn.close()
        self._watchdog = loop.call_later(WATCHDOG_EVERY_S, self._close_stalled)

    def _begin(self) -> None:
        self._busy += 1
        self._idle.clear()

    def _end(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    def var_frame(self, name: str) -> bytes:
        frame = self._var_frames.get(name)
        if frame is None:
            frame = codec.frame(
                MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_req(codec.Var(name))
            )
            if len(self._var_frames) < 1024:
                self._var_frames[name] = frame
        return frame

    # --- PrepareConf ------------------------------------------------------------------------

    def prepare(self, conf: list[tuple[str, str]], route_id: str | None = None) -> PreparedConf:
        # The route is part of the identity: plugins learn their route without asking APISIX.
        key: ConfKey = (("#route", route_id or ""), *conf)
        found = self.confs.find_key(key)
        if found is not None:
            return found
        plugins = []
        for name, raw in conf:
            spec = self.registry.get(name)
            if spec is None:
                known = ", ".join(sorted(self.registry))
                raise PrepareError(f"unknown plugin {name!r}; this runner serves: {known}")
            try:
                value = orjson.loads(raw or "{}")
                config = spec.config.model_validate(value)
            except orjson.JSONDecodeError as exc:
                raise PrepareError(
                    f"plugin {name!r}: its config is not valid JSON ({exc})"
                ) from None
            except ValidationError as exc:
                raise PrepareError(
                    f"plugin {name!r}: invalid config: {describe_validation_error(exc)}"
                ) from None
            plugins.append(PreparedPlugin(spec=spec, config=config))
        return self.confs.add(key, plugins, route_id)


class _Connection(asyncio.Protocol):
    """One APISIX connection: frames in, frames out, one exchange at a time.

    Bytes are cut into frames as they arrive (``data_received``); the connection's task takes
    them in order. No stream reader and no timer per read: the runner's watchdog closes a
    connection that stays mid-frame or mid-exchange for ``FRAME_TIMEOUT_S``.
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.loop = asyncio.get_running_loop()  # kept: asking for it costs a system call (3.11)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: BaseException | None = None
        self.in_exchange = False
        self.stalled_since: float | None = None  # loop time it began waiting mid-exchange
        self.paused = False
        self.can_write: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.loop.create_task(self.runner._serve(self))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        frames = self.frames
        if not buf and len(data) >= 4 and len(data) == 4 + (data[1] << 16 | data[2] << 8 | data[3]):
            frames.append((data[0], data[4:]))  # the usual case: exactly one whole frame
        else:
            buf += data
            while len(buf) >= 4:
                size = buf[1] << 16 | buf[2] << 8 | buf[3]
                if len(buf) < 4 + size:
                    break
                frames.append((buf[0], bytes(buf[4 : 4 + size])))
                del buf[: 4 + size]
            if buf and self.stalled_since is None:
                self.stalled_since = self.loop.time()  # a frame begun, not ended
        if frames:
            if len(frames) > MAX_QUEUED_FRAMES and not self.paused:
                self.paused = True  # a peer that sends without reading the answers
                self.transport.pause_reading()  # type: ignore[union-attr]
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("APISIX closed the connection")
        self._wake()
        if self.can_write is not None and not self.can_write.done():
            self.can_write.set_result(None)

    def pause_writing(self) -> None:
        self.can_write = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.can_write is not None and not self.can_write.done():
            self.can_write.set_result(None)
        self.can_write = None

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- frames -------------------------------------------------------------------------------

    async def read_frame(self) -> tuple[int, bytes]:
        """The next whole frame, in arrival order."""
        if not self.frames and self.in_exchange and POLL_S and self.runner._busy == 1:
            await self._poll(POLL_S)
        while not self.frames:
            if self.lost is not None:
                raise ConnectionError(str(self.lost))
            if self.in_exchange and self.stalled_since is None:
                self.stalled_since = self.loop.time()
            self.waiter = self.loop.create_future()
            await self.waiter
        if self.paused and len(self.frames) <= MAX_QUEUED_FRAMES // 2:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if not self.buf:
            self.stalled_since = None
        return self.frames.popleft()

    async def _poll(self, limit_s: float) -> None:
        """Wait for APISIX's answer without sleeping, for at most ``limit_s``.

        Mid-exchange APISIX answers at once, in less time than it takes to wake a process
        that went to sleep waiting for it (~50 µs on a small VM), so while this is the only call
        in flight the connection polls (each turn of the loop also serves its other work). With
        other calls in flight it never polls: they use the time.
        """
        loop = self.loop
        end = loop.time() + limit_s
        # polling on purpose: each turn of the loop looks at the socket without sleeping
        while not self.frames and self.lost is None and loop.time() < end:  # noqa: ASYNC110
            await asyncio.sleep(0)

    def write(self, data: bytes) -> None:
        if self.lost is not None:
            raise ConnectionError(str(self.lost))
        self.transport.write(data)  # type: ignore[union-attr]

    async def run(self) -> None:
        runner = self.runner
        while True:
            msg_type, payload = await self.read_frame()
            self.in_exchange = True
            runner._begin()
            try:
                reply = await self.exchange(msg_type, payload)
            except _Reply as r:
                reply = _ERR_FRAMES[r.code]
            except ProtocolError as exc:
                log.warning("bad frame (type %d, %d bytes): %s", msg_type, len(payload), exc)
                reply = _ERR_FRAMES[ErrCode.BAD_REQUEST]
            finally:
                runner._end()
                self.in_exchange = False
                if not self.buf:
                    self.stalled_since = None
            self.write(reply)
            if self.can_write is not None:
                await self.can_write  # APISIX reads slower than we answer: wait for room

    async def ask(self, frame: bytes) -> bytes | None:
        """Send an ExtraInfo question and wait for APISIX's answer on this connection."""
        self.write(frame)
        return await self._answer()

    def ask_now(self, infos: tuple[ExtraInfo, ...]) -> Awaitable[list[bytes | None]]:
        """Several questions in one write, sent now; await the result for the answers. APISIX
        answers each, in order, on this connection (its ExtraInfo loop reads one frame,
        answers it, reads the next)."""
        self.write(b"".join(self._question(info) for info in infos))
        return self._answers(len(infos))

    async def _answers(self, n: int) -> list[bytes | None]:
        return [await self._answer() for _ in range(n)]

    async def ask_info(self, info: ExtraInfo) -> bytes | None:
        return await self.ask(self._question(info))

    def _question(self, info: ExtraInfo) -> bytes:
        if isinstance(info, codec.Var):
            return self.runner.var_frame(info.name)
        return _REQ_BODY_FRAME if isinstance(info, codec.ReqBody) else _RESP_BODY_FRAME

    async def _answer(self) -> bytes | None:
        msg_type, payload = await self.read_frame()
        if msg_type != MsgType.RPC_EXTRA_INFO:
            raise ConnectionError(f"expected an extra-info answer, got frame type {msg_type}")
        try:
            return codec.decode_extra_info_resp(payload).result
        except ProtocolError as exc:
            raise ConnectionError(f"unreadable extra-info answer: {exc}") from None

    async def exchange(self, msg_type: int, payload: bytes) -> bytes:
        if msg_type == MsgType.RPC_HTTP_REQ_CALL:
            return await self.http_req_call(payload)
        if msg_type == MsgType.RPC_PREPARE_CONF:
            return self.prepare_conf(codec.decode_prepare_conf_req(payload))
        if msg_type == MsgType.RPC_HTTP_RESP_CALL:
            return await self.http_resp_call(codec.decode_http_resp_call_req(payload))
        raise ProtocolError(f"unexpected frame type {msg_type}")

    def prepare_conf(self, req: codec.PrepareConfReq) -> bytes:
        started = time.perf_counter()
        try:
            conf = self.runner.prepare(req.conf, route_of(req.key))
        except PrepareError as exc:
            log.error("PrepareConf refused for %s: %s", req.key or "(no key)", exc)
            raise _Reply(ErrCode.BAD_REQUEST) from None
        log.info(
            "conf prepared",
            extra={
                "key": req.key,
                "token": conf.token,
                "plugins": [name for name, _ in req.conf],
                "ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )
        return codec.frame(MsgType.RPC_PREPARE_CONF, codec.encode_prepare_conf_resp(conf.token))

    async def http_req_call(self, payload: bytes) -> bytes:
        conf = self.runner.confs.get(codec.call_conf_token(payload))
        if conf is None:
            raise _Reply(ErrCode.CONF_TOKEN_NOT_FOUND)
        # What the chain always reads is asked before the call is even decoded: APISIX answers
        # while the runner decodes it and sets the chain up.
        answers = self.ask_now(conf.prefetch) if conf.prefetch else None
        try:
            req = codec.decode_http_req_call_req(payload)
        except ProtocolError:
            if answers is not None:
                await answers  # the connection stays in step for the error reply
            raise
        action: codec.Stop | codec.Rewrite | None = None
        if conf.needs_request:
            ctx = RequestContext(req, self.ask_info)
            if conf.route_id is not None:
                ctx.know_var("route_id", conf.route_id)
            if answers is not None:
                ctx.answered(conf.prefetch, await answers)
            started = time.perf_counter()
            scope = log_request_id.set(ctx.request_id)  # every log line of the chain carries it
            try:
                action = await run_request_chain(ctx, conf)
            finally:
                log_request_id.reset(scope)
            if isinstance(action, codec.Stop) and self.runner.usage is not None:
                self.runner.usage.submit(record_for(ctx, action, started))
        if action is None:
            return codec.no_action_frame(req.id)
        resp = codec.HTTPReqCallResp(id=req.id, action=action)
        try:
            return codec.frame(MsgType.RPC_HTTP_REQ_CALL, codec.encode_http_req_call_resp(resp))
        except codec.FrameTooLarge:
            too_big = PayloadTooLarge(
                "The rewritten request is larger than the 16 MiB the gateway can carry; "
                "send a smaller request."
            )
            resp.action = error_stop(too_big, RequestContext(req, self.ask_info).dialect)
            return codec.frame(MsgType.RPC_HTTP_REQ_CALL, codec.encode_http_req_call_resp(resp))

    async def http_resp_call(self, req: codec.HTTPRespCallReq) -> bytes:
        conf = self.runner.confs.get(req.conf_token)
        if conf is None:
            raise _Reply(ErrCode.CONF_TOKEN_NOT_FOUND)
        ctx = ResponseContext(req, self.ask_info)
        if conf.needs_response:
            await run_response_hooks(ctx, conf)
        resp = codec.HTTPRespCallResp(
            id=req.id, status=ctx.new_status, headers=ctx.new_headers, body=ctx.new_body
        )
        return codec.frame(MsgType.RPC_HTTP_RESP_CALL, codec.encode_http_resp_call_resp(resp))


def route_of(key: str) -> str | None:
    """The route id in a PrepareConf key (``route#routes#<id>#<phase>#<modifiedIndex>``)."""
    parts = key.split("#")
    if len(parts) >= 3 and parts[0] == "route" and parts[2]:
        return parts[2]
    return None
