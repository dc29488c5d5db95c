"""The runner under load: its process, and the clients that drive it at concurrency 1 and 64.

Concurrency 1 is one blocking socket; concurrency 64 is one uvloop thread with a Protocol state
machine per connection (or, as an alternative, one thread per connection). Each returns a
``Point``: calls/s, latency percentiles and CPU per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from scenarios import (
    REPO,
    BenchError,
    Calls,
    Scenario,
    answer_question,
    check_final,
    encode_calls,
    frame_size,
)

from plugins.runner import codec
from plugins.runner.codec import MsgType

# --- the runner process -----------------------------------------------------------------------


class RunnerProcess:
    """``python -m plugins.runner`` as APISIX's ext-plugin.cmd starts it."""

    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.path = str(workdir / "runner.sock")
        self.log_path = workdir / "runner.log"
        self._log = self.log_path.open("wb")
        env = dict(os.environ)
        env["APISIX_LISTEN_ADDRESS"] = f"unix:{self.path}"
        env["APISIX_CONF_EXPIRE_TIME"] = "3600"
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plugins.runner"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.clk_tck = os.sysconf("SC_CLK_TCK")
        self.redis_pid: int | None = None  # the quota store's server, when a scenario needs it

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.path)
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"the runner did not listen on {self.path} within {timeout_s:.0f} s")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the runner exited with status {self.proc.returncode}: {self.tail()}")

    def tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchError("no VmRSS in /proc/<pid>/status")

    def cpu_s(self) -> float:
        """User + system CPU seconds the runner process has used so far (all its threads)."""
        return proc_cpu_s(self.proc.pid, self.clk_tck)

    def redis_cpu_s(self) -> float:
        """The same for the Redis server (0 when there is none)."""
        return 0.0 if self.redis_pid is None else proc_cpu_s(self.redis_pid, self.clk_tck)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def proc_cpu_s(pid: int, clk_tck: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; fields after its ")" are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / clk_tck  # utime, stime (14, 15)


# --- results ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Point:
    scenario: str
    concurrency: int
    calls: int
    wall_s: float
    latencies_ns: list[int]
    runner_cpu_s: float
    client_cpu_s: float
    body_asks: int
    rss_after_kib: int
    questions: int = 0  # ExtraInfo questions answered (the body included)
    redis_cpu_s: float = 0.0
    same_cpu: float | None = (
        None  # concurrency 1: share of samples with client and runner on one CPU
    )

    def pct_ms(self, p: float) -> float:
        """The ``p`` quantile (nearest rank) of the latencies, in milliseconds."""
        lat = sorted(self.latencies_ns)
        rank = min(len(lat) - 1, max(0, math.ceil(p * len(lat)) - 1))
        return lat[rank] / 1e6

    @property
    def rate(self) -> float:
        return self.calls / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        return self.calls / self.runner_cpu_s if self.runner_cpu_s > 0 else float("inf")


def last_cpu(pid: int | str) -> int:
    """The CPU a process last ran on (field 39 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[36])


def client_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --- concurrency 1: one blocking socket ----------------------------------------------------------


class FrameReader:
    """Whole frames from a blocking socket. The runner may send several questions before
    reading an answer (pipelined ExtraInfo); APISIX reads and answers them one at a time, and so
    does this client."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def frame(self) -> bytes:
        buf = self.buf
        while True:
            size = frame_size(buf)
            if size >= 0 and len(buf) >= size:
                if len(buf) == size:
                    self.buf = b""
                    return buf
                self.buf = buf[size:]
                return buf[:size]
            more = self.sock.recv(65536)
            if not more:
                raise BenchError("the runner closed the connection" + (" mid-frame" if buf else ""))
            buf += more


def sync_calls(
    sock: socket.socket,
    scenario: Scenario,
    calls: Calls,
    lat: list[int] | None,
    sample: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Run ``calls`` one after another on ``sock``; return (body asks, questions).

    ``sample`` is called between calls, off the clock, every 256 calls.
    """
    asks = questions = 0
    reader = FrameReader(sock)
    clock = time.perf_counter_ns
    rewrite, want = scenario.rewrite, scenario.questions
    for i, (req, expected, call_id) in enumerate(
        zip(calls.requests, calls.replies, calls.ids, strict=True)
    ):
        body = calls.bodies[i] if calls.bodies else b""
        asked = asked_all = 0
        t0 = clock()
        sock.sendall(req)
        while True:
            frame = reader.frame()
            if frame[0] != MsgType.RPC_EXTRA_INFO:
                break
            answer, is_body = answer_question(frame, scenario, body)
            asked += is_body
            asked_all += 1
            sock.sendall(answer)
        t1 = clock()
        if reader.buf:
            raise BenchError(f"call {call_id}: the runner sent more after its final reply")
        check_final(frame, expected, call_id, rewrite)
        if asked != int(scenario.asks_body) or asked_all != want:
            raise BenchError(
                f"call {call_id}: the body was asked {asked} times, {asked_all} questions in all"
            )
        asks += asked
        questions += asked_all
        if lat is not None:
            lat.append(t1 - t0)
        if sample is not None and not i & 255:
            sample()
    return asks, questions


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def bench_c1(runner: RunnerProcess, scenario: Scenario, warmup: int, n: int) -> Point:
    warm, measured = encode_calls(scenario, warmup), encode_calls(scenario, n)
    with connect(runner.path) as sock:
        sync_calls(sock, scenario, warm, None)
        lat: list[int] = []
        same: list[bool] = []

        def sample() -> None:
            same.append(last_cpu(runner.proc.pid) == last_cpu("self"))

        cpu0, ccpu0, rcpu0 = runner.cpu_s(), client_cpu(), runner.redis_cpu_s()
        t0 = time.perf_counter()
        asks, questions = sync_calls(sock, scenario, measured, lat, sample)
        wall = time.perf_counter() - t0
        cpu1, ccpu1, rcpu1 = runner.cpu_s(), client_cpu(), runner.redis_cpu_s()
    runner.check_alive()
    point = Point(
        scenario.name, 1, n, wall, lat, cpu1 - cpu0, ccpu1 - ccpu0, asks, runner.rss_kib(),
        questions, rcpu1 - rcpu0,
    )  # fmt: skip
    point.same_cpu = sum(same) / len(same)
    return point


# --- concurrency 64, default: one uvloop thread, a Protocol state machine per connection --------


class _Phase:
    """One closed-loop phase over all connections: ``n`` calls, latencies optionally kept."""

    def __init__(self, scenario: Scenario, calls: Calls, keep: bool, done: asyncio.Future[None]):
        self.scenario = scenario
        self.calls = calls
        self.keep = keep
        self.done = done
        self.next = 0
        self.completed = 0
        self.asks = 0
        self.questions = 0
        self.lat: list[int] = []

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class _ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.phase: _Phase | None = None
        self.index = -1
        self.asked = 0
        self.asked_all = 0
        self.t0 = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is not None:
            self.phase.fail(BenchError(f"the runner closed a connection ({exc})"))
        if not self.closed.done():
            self.closed.set_result(None)

    def start(self, phase: _Phase) -> None:
        self.phase = phase
        self._send_next()

    def _send_next(self) -> None:
        phase = self.phase
        assert phase is not None
        assert self.transport is not None
        if phase.next >= len(phase.calls.requests):
            self.phase = None  # this connection has nothing more to do in this phase
            return
        self.index = phase.next
        phase.next += 1
        self.asked = self.asked_all = 0
        self.t0 = time.perf_counter_ns()
        self.transport.write(phase.calls.requests[self.index])

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            size = frame_size(buf)
            if size < 0 or len(buf) < size:
                break
            frame, buf = buf[:size], buf[size:]
            try:
                self._frame(frame)
            except (BenchError, codec.ProtocolError) as exc:
                if self.phase is not None:
                    self.phase.fail(exc)
                return
        self.buf = buf

    def _frame(self, frame: bytes) -> None:
        phase = self.phase
        if phase is None or self.transport is None:
            raise BenchError("a frame arrived on an idle connection")
        if frame[0] == MsgType.RPC_EXTRA_INFO:
            bodies = phase.calls.bodies
            answer, is_body = answer_question(
                frame, phase.scenario, bodies[self.index] if bodies else b""
            )
            self.asked += is_body
            self.asked_all += 1
            self.transport.write(answer)
            return
        t1 = time.perf_counter_ns()
        calls, i, sc = phase.calls, self.index, phase.scenario
        check_final(frame, calls.replies[i], calls.ids[i], sc.rewrite)
        if self.asked != int(sc.asks_body) or self.asked_all != sc.questions:
            raise BenchError(
                f"call {calls.ids[i]}: the body was asked {self.asked} times, "
                f"{self.asked_all} questions in all"
            )
        phase.asks += self.asked
        phase.questions += self.asked_all
        if phase.keep:
            phase.lat.append(t1 - self.t0)
        phase.completed += 1
        if phase.completed == len(calls.requests):
            if not phase.done.done():
                phase.done.set_result(None)
            self.phase = None
            return
        self._send_next()


async def _uvloop_c64(
    runner: RunnerProcess, scenario: Scenario, conns: int, warmup: int, n: int
) -> Point:
    loop = asyncio.get_running_loop()
    protos: list[_ClientProtocol] = []
    for _ in range(conns):
        _, proto = await loop.create_unix_connection(_ClientProtocol, runner.path)
        protos.append(proto)
    warm, measured = encode_calls(scenario, warmup), encode_calls(scenario, n)

    async def phase(calls: Calls, keep: bool) -> _Phase:
        ph = _Phase(scenario, calls, keep, loop.create_future())
        for proto in protos:
            proto.start(ph)
        await asyncio.wait_for(ph.done, 60)
        return ph

    try:
        await phase(warm, keep=False)
        cpu0, ccpu0, rcpu0 = runner.cpu_s(), client_cpu(), runner.redis_cpu_s()
        t0 = time.perf_counter()
        ph = await phase(measured, keep=True)
        wall = time.perf_counter() - t0
        cpu1, ccpu1, rcpu1 = runner.cpu_s(), client_cpu(), runner.redis_cpu_s()
    finally:
        for proto in protos:
            if proto.transport is not None:
                proto.transport.close()
        await asyncio.gather(*(p.closed for p in protos))
    runner.check_alive()
    return Point(
        scenario.name, conns, n, wall, ph.lat, cpu1 - cpu0, ccpu1 - ccpu0, ph.asks,
        runner.rss_kib(), ph.questions, rcpu1 - rcpu0,
    )  # fmt: skip


def bench_c64_uvloop(
    runner: RunnerProcess, scenario: Scenario, conns: int, warmup: int, n: int
) -> Point:
    import uvloop

    return uvloop.run(_uvloop_c64(runner, scenario, conns, warmup, n))


# --- concurrency 64, alternative: one thread per connection, blocking sockets --------------------


def bench_c64_threads(
    runner: RunnerProcess, scenario: Scenario, conns: int, warmup: int, n: int
) -> Point:
    def split(calls: Calls) -> list[Calls]:
        return [
            Calls(
                calls.requests[k::conns],
                calls.replies[k::conns],
                calls.ids[k::conns],
                calls.bodies[k::conns],
            )
            for k in range(conns)
        ]

    warm, measured = split(encode_calls(scenario, warmup)), split(encode_calls(scenario, n))
    socks = [connect(runner.path) for _ in range(conns)]
    lats: list[list[int]] = [[] for _ in range(conns)]
    asks = [(0, 0)] * conns
    errors: list[BaseException] = []
    barrier = threading.Barrier(conns + 1)

    def worker(k: int) -> None:
        try:
            sync_calls(socks[k], scenario, warm[k], None)
            barrier.wait()
            asks[k] = sync_calls(socks[k], scenario, measured[k], lats[k])
        except threading.BrokenBarrierError:
            pass
        except (BenchError, codec.ProtocolError, OSError) as exc:  # reported after the join
            errors.append(exc)
            barrier.abort()
            for s in socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(conns)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()  # every connection warmed up
    cpu0, ccpu0, rcpu0 = runner.cpu_s(), client_cpu(), runner.redis_cpu_s()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1, ccpu1, rcpu1 = runner.cpu_s(), client_cpu(), runner.redis_cpu_s()
    for s in socks:
        s.close()
    if errors:
        raise errors[0]
    runner.check_alive()
    lat = [x for part in lats for x in part]
    return Point(
        scenario.name, conns, n, wall, lat, cpu1 - cpu0, ccpu1 - ccpu0,
        sum(a for a, _ in asks), runner.rss_kib(), sum(q for _, q in asks), rcpu1 - rcpu0,
    )  # fmt: skip
