"""HTTPReqCall round trips against the real plugin runner, over a real Unix socket.

What is measured: the time APISIX's ``ext-plugin-pre-req`` would wait on the runner for one
request, from the moment the HTTPReqCall frame is sent until the final reply is read, including
the ExtraInfo exchange in which the runner asks for the request body. The runner is started as a
subprocess exactly as APISIX's ``ext-plugin.cmd`` starts it (``python -m plugins.runner`` with
``APISIX_LISTEN_ADDRESS`` and ``APISIX_CONF_EXPIRE_TIME``), and the client speaks the protocol as
APISIX does: PrepareConf once on its own connection, then one exchange at a time per connection.

Three scenarios, so that the plugins' cost can be read against the runner's own in one run:

- ``empty``: a conf with an empty plugin list. The runner answers "no action" without asking for
  anything; this is the floor (framing, decoding, the event loop, the socket).
- ``prompt-filter``: deepgate-prompt-filter with a realistic config on a ~2 KB OpenAI chat body
  with clean text. The runner asks for the body once (checked on every call), parses it,
  normalizes, screens and counts tokens, and answers "no action".
- ``full-chain``: the chat-completions route's ``ext-plugin-post-req`` chain as the shipped
  ``apisix-conf/apisix.yaml`` configures it (read from that file), deepgate-policy ->
  deepgate-prompt-filter -> deepgate-safety -> deepgate-router, less what calls the sidecar over
  gRPC: deepgate-cache is dropped, and so are the safety classifier and embedding topics. The
  policy reserves its quotas in a real Redis (``deepgate.embedded_redis``); the bench consumer's
  limits are raised so that no quota runs out during the bench (the only change to the shipped
  configs). The client answers the runner's questions as APISIX would after key-auth
  (``consumer_name`` = the consumer, the body), on the same connection, one frame at a time
  (the runner may send several questions before reading an answer), and checks every final
  reply: a Rewrite carrying the signed ``x-deepgate-route`` header, never a Stop. The PrepareConf
  key names the route (``route#routes#chat-completions#ext-plugin-post-req#1``), as APISIX's does.

Each at concurrency 1 (one connection, a plain blocking-socket client) and 64 (64 connections,
each one exchange at a time, as APISIX's keepalive pool uses them), after a warm-up that is not
counted. Request frames and the answers are encoded before the clock starts so that the load
generator, which shares the machine's two cores with the runner, stays light. For concurrency 64
the default client is a single-threaded uvloop ``asyncio.Protocol`` state machine (no tasks,
no futures per call); ``--client64 threads`` runs 64 threads with blocking sockets instead, for
comparison.

Why: the runner sits in front of every request APISIX routes to it. Its targets are <= 0.5 ms
p50 and <= 2 ms p99 per call, and >= 5,000 calls per second per core. The runner is one process
on one event loop, so "per core" is measured directly: calls divided by the CPU seconds (user +
system, from /proc/<pid>/stat) the runner process used during the measured calls. Its RSS is
read before and after all the calls to show that memory comes back flat.

Exit status is nonzero only on an error (a call answered wrongly, the runner dying), never on a
missed target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import yaml

from deepgate.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from deepgate.route_signature import HEADER as ROUTE_HEADER
from deepgate.route_signature import verify_route
from devgateway.driver import Answer, RunnerConnection
from plugins.runner import codec
from plugins.runner.codec import ExtraInfo, Method, MsgType

REPO = Path(__file__).resolve().parents[2]

TARGET_P50_MS = 0.5
TARGET_P99_MS = 2.0
TARGET_CALLS_PER_CPU_S = 5000.0

PROMPT_FILTER = "deepgate-prompt-filter"
PROMPT_FILTER_CONF = {
    "max_prompt_tokens": 4000,
    "max_body_bytes": 1_000_000,
    "deny_patterns": [
        "(?i)ignore (all )?previous instructions",
        "(?i)disregard (the|your) (system prompt|instructions)",
        {"name": "jailbreak-dan", "pattern": "(?i)\\byou are now DAN\\b"},
        {"name": "prompt-leak", "pattern": "(?i)(print|reveal|repeat) your system prompt"},
    ],
}

CHAT_BODY = {
    "model": "gpt-4o-mini",
    "temperature": 0.2,
    "max_tokens": 512,
    "user": "customer-1842",
    "messages": [
        {
            "role": "system",
            "content": (
                "You are the support assistant of an outdoor equipment shop. Answer questions "
                "about orders, shipping, returns and billing. Be concise and friendly, name the "
                "policy section you rely on when there is one, and ask one clarifying question "
                "when the customer's request is ambiguous. Returns are accepted within 30 days "
                "for unused items (policy 4.2); worn footwear can be returned within 14 days if "
                "it is faulty (policy 4.5). Standard shipping takes 3 to 5 working days, express "
                "shipping 1 to 2 working days (policy 2.1)."
            ),
        },
        {
            "role": "user",
            "content": (
                "Hi, I ordered a pair of hiking boots (order 48213-B) on the 3rd and the "
                "tracking page has said 'label created' for five days now. I paid for express "
                "shipping because I leave for a trip on Saturday. Can you tell me what is going "
                "on, and whether I can still get them in time?"
            ),
        },
        {
            "role": "assistant",
            "content": (
                "I'm sorry for the wait. Order 48213-B was packed on the 4th, but the carrier "
                "has not scanned the parcel yet, which is why tracking still shows 'label "
                "created'. Express shipping should take 1 to 2 working days (policy 2.1), so "
                "this is late. I can ask the warehouse to hand it to the carrier again today, "
                "or send a replacement pair by express courier. Which would you prefer?"
            ),
        },
        {
            "role": "user",
            "content": (
                "Please send the replacement by courier, same size (EU 43) and colour (slate "
                "grey). If the first parcel turns up later, I will send it back unopened. Will "
                "I be refunded the express shipping fee since it did not arrive on time? And "
                "could you confirm the delivery address is still 12 Harbour Lane, Flat 3? "
                "Thanks a lot for the quick help, the trip is a week in the Alps and I really "
                "need boots that are already broken in, so if the replacement cannot arrive by "
                "Friday evening, tell me now and I will buy a pair locally instead."
            ),
        },
    ],
}

HEADERS: list[tuple[str, str | None]] = [
    ("host", "127.0.0.1:9080"),
    ("user-agent", "OpenAI/Python 1.54.4"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, deflate"),
    ("content-type", "application/json"),
    ("authorization", "Bearer sk-bench-0123456789abcdef0123456789abcdef"),
    ("x-stainless-lang", "python"),
    ("x-stainless-retry-count", "0"),
]


# After key-auth (ext-plugin-post-req): deepgate-auth-bridge moved the key into ``apikey`` and
# key-auth's hide_credentials removed it, so no credential header reaches the post-req chain.
POST_REQ_HEADERS = [h for h in HEADERS if h[0] != "authorization"]

# --- the full chain, from the shipped route config ---------------------------------------------

SHIPPED_ROUTES = REPO / "apisix-conf" / "apisix.yaml"
CHAT_ROUTE = "chat-completions"
FULL_CHAIN = ("deepgate-policy", "deepgate-prompt-filter", "deepgate-safety", "deepgate-router")
BENCH_CONSUMER = "demo"  # the shipped consumer; APISIX's consumer_name after key-auth
BENCH_ROUTE_KEY = "bench-route-key-0123456789abcdef"  # DEEPGATE_ROUTE_KEY for the runner
# Limits no bench can reach: the counters, the Lua script and the headers stay the same.
BENCH_QUOTA = {
    "requests_per_minute": 10**9,
    "tokens_per_minute": 10**12,
    "tokens_per_day": 10**13,
    "spend_per_month_usd": 10**6,
}
# The same chat, asking for the shipped router's headline alias (clients name an alias).
FULL_CHAIN_BODY = {**CHAT_BODY, "model": "auto"}

SCENARIOS = ("empty", "prompt-filter", "full-chain")


class BenchError(Exception):
    """The runner answered wrongly, or went away."""


def _bench_policy(value: dict[str, Any]) -> dict[str, Any]:
    """The shipped policy with every quota limit it sets raised past what a bench can use."""
    value = orjson.loads(orjson.dumps(value))  # a deep copy
    rules = [*value.get("consumers", {}).values(), value.get("default") or {}]
    for rule in rules:
        quota = rule.get("quota")
        if quota:
            for name in quota:
                quota[name] = BENCH_QUOTA[name]
    if BENCH_CONSUMER not in value.get("consumers", {}):
        raise BenchError(f"the shipped deepgate-policy has no consumer {BENCH_CONSUMER!r}")
    return value


def _without_sidecar(value: dict[str, Any]) -> dict[str, Any]:
    """The shipped safety config less the detectors that ask the sidecar (classifier, topics)."""
    value = orjson.loads(orjson.dumps(value))
    value.pop("topics", None)
    if isinstance(value.get("injection"), dict):
        value["injection"].pop("classifier", None)
    return value


def full_chain_conf(path: Path = SHIPPED_ROUTES) -> list[tuple[str, str]]:
    """The chat-completions route's post-req chain, as the bench runs it (see the docstring)."""
    routes = yaml.safe_load(path.read_text())["routes"]
    route = next((r for r in routes if r.get("id") == CHAT_ROUTE), None)
    if route is None:
        raise BenchError(f"{path}: no route {CHAT_ROUTE!r}")
    conf: list[tuple[str, str]] = []
    for entry in route["plugins"]["ext-plugin-post-req"]["conf"]:
        name = entry["name"]
        if name not in FULL_CHAIN:
            continue  # deepgate-cache: its semantic lookup is a gRPC call to the sidecar
        value = orjson.loads(entry["value"])
        if name == "deepgate-policy":
            value = _bench_policy(value)
        elif name == "deepgate-safety":
            value = _without_sidecar(value)
        conf.append((name, orjson.dumps(value).decode()))
    if tuple(name for name, _ in conf) != FULL_CHAIN:
        raise BenchError(f"{path}: route {CHAT_ROUTE!r} does not run {' -> '.join(FULL_CHAIN)}")
    return conf


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


# --- frames, encoded before the clock starts ----------------------------------------------------

REQ_BODY_QUESTION = codec.frame(
    MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_req(codec.ReqBody())
)
NO_VALUE_ANSWER = codec.frame(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(None))


def var_question(name: str) -> bytes:
    return codec.frame(MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_req(codec.Var(name)))


@dataclass(slots=True)
class Scenario:
    """One chain. ``vars``: the APISIX variables the client answers (others: no value);
    ``questions``: the ExtraInfo questions every call must ask (the body counted);
    ``rewrite``: every call must end in a Rewrite carrying a signed route, else "no action"."""

    name: str
    conf: list[tuple[str, str]]
    body: bytes
    asks_body: bool
    vars: dict[str, str] | None = None
    questions: int = -1  # -1: the body question only, when asks_body
    rewrite: bool = False
    route: str = ""  # the route id in the PrepareConf key
    headers: list[tuple[str, str | None]] | None = None
    token: int = 0
    body_answer: bytes = b""
    var_answers: dict[bytes, bytes] | None = None  # question frame -> answer frame

    def __post_init__(self) -> None:
        self.body_answer = codec.frame(
            MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(self.body)
        )
        if self.questions < 0:
            self.questions = int(self.asks_body)
        self.route = self.route or f"bench-{self.name}"
        self.var_answers = {
            var_question(name): codec.frame(
                MsgType.RPC_EXTRA_INFO, codec.encode_extra_info_resp(value.encode())
            )
            for name, value in (self.vars or {}).items()
        }

    def var_value(self, name: str) -> bytes | None:
        value = (self.vars or {}).get(name)
        return None if value is None else value.encode()


_ids = itertools.count(1)


@dataclass(slots=True)
class Calls:
    """Pre-encoded HTTPReqCall frames and the exact "no action" reply expected for each."""

    requests: list[bytes]
    replies: list[bytes]
    ids: list[int]


def encode_calls(scenario: Scenario, n: int) -> Calls:
    requests, replies, ids = [], [], []
    headers = [*(scenario.headers or HEADERS), ("content-length", str(len(scenario.body)))]
    for _ in range(n):
        call_id = next(_ids) & 0xFFFFFFFF
        req = codec.HTTPReqCallReq(
            id=call_id,
            conf_token=scenario.token,
            method=Method.POST,
            path="/v1/chat/completions",
            src_ip=bytes((127, 0, 0, 1)),
            headers=[*headers, ("x-request-id", f"bench-{call_id:010d}")],
        )
        requests.append(codec.frame(MsgType.RPC_HTTP_REQ_CALL, codec.encode_http_req_call_req(req)))
        reply = codec.encode_http_req_call_resp(codec.HTTPReqCallResp(id=call_id))
        replies.append(codec.frame(MsgType.RPC_HTTP_REQ_CALL, reply))
        ids.append(call_id)
    return Calls(requests, replies, ids)


def check_final(frame: bytes, expected: bytes, call_id: int, rewrite: bool = False) -> None:
    """Fail unless ``frame`` is the "no action" reply to ``call_id`` (bytes compared first), or
    with ``rewrite`` a Rewrite carrying a signed route (checked in full on one call by
    ``prepare_and_check``; here its presence and shape)."""
    if rewrite:
        check_rewrite(frame, call_id)
        return
    if frame == expected:
        return
    msg_type = frame[0]
    if msg_type == MsgType.RPC_ERROR:
        code = codec.decode_err_resp(frame[4:]).code
        raise BenchError(f"call {call_id}: the runner answered RPC_ERROR {code.name}")
    if msg_type != MsgType.RPC_HTTP_REQ_CALL:
        raise BenchError(f"call {call_id}: reply of frame type {msg_type}")
    resp = codec.decode_http_req_call_resp(frame[4:])
    if resp.id != call_id or resp.action is not None:
        raise BenchError(f"call {call_id}: expected no action, got id {resp.id}: {resp.action!r}")


def check_rewrite(frame: bytes, call_id: int) -> codec.Rewrite:
    msg_type = frame[0]
    if msg_type == MsgType.RPC_ERROR:
        code = codec.decode_err_resp(frame[4:]).code
        raise BenchError(f"call {call_id}: the runner answered RPC_ERROR {code.name}")
    if msg_type != MsgType.RPC_HTTP_REQ_CALL:
        raise BenchError(f"call {call_id}: reply of frame type {msg_type}")
    resp = codec.decode_http_req_call_resp(frame[4:])
    action = resp.action
    if resp.id != call_id or not isinstance(action, codec.Rewrite):
        detail = (
            f"Stop {action.status}: {action.body[:300]!r}"
            if isinstance(action, codec.Stop)
            else repr(action)
        )
        raise BenchError(f"call {call_id}: expected a Rewrite, got id {resp.id}: {detail}")
    for name, value in action.headers:
        if name == ROUTE_HEADER and value and ";sig=" in value:
            return action
    raise BenchError(f"call {call_id}: the Rewrite carries no signed {ROUTE_HEADER}")


def answer_question(frame: bytes, scenario: Scenario) -> tuple[bytes, bool]:
    """(the answer frame, whether the body was asked) for an ExtraInfo question."""
    if frame == REQ_BODY_QUESTION:
        return scenario.body_answer, True
    answers = scenario.var_answers
    if answers:
        found = answers.get(frame)
        if found is not None:
            return found, False
    info = codec.decode_extra_info_req(frame[4:]).info
    if isinstance(info, codec.ReqBody):
        return scenario.body_answer, True
    if isinstance(info, codec.Var):
        return NO_VALUE_ANSWER, False
    raise BenchError(f"the runner asked for {info!r} in a request call")


def frame_size(buf: bytes) -> int:
    """Total size of the frame at the start of ``buf``, or -1 while its header is incomplete."""
    if len(buf) < 4:
        return -1
    return 4 + (buf[1] << 16 | buf[2] << 8 | buf[3])


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
        asked = asked_all = 0
        t0 = clock()
        sock.sendall(req)
        while True:
            frame = reader.frame()
            if frame[0] != MsgType.RPC_EXTRA_INFO:
                break
            answer, is_body = answer_question(frame, scenario)
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
            answer, is_body = answer_question(frame, phase.scenario)
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
            Calls(calls.requests[k::conns], calls.replies[k::conns], calls.ids[k::conns])
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


# --- setup through the driver, and the report ---------------------------------------------------


def recording_answer(scenario: Scenario, asked: list[ExtraInfo]) -> Answer:
    """The driver's answer callback: the body for ReqBody, the scenario's variables (else no
    value) for Var; records each question."""

    async def answer(info: ExtraInfo) -> bytes | None:
        asked.append(info)
        if isinstance(info, codec.ReqBody):
            return scenario.body
        return scenario.var_value(info.name) if isinstance(info, codec.Var) else None

    return answer


async def prepare_and_check(runner: RunnerProcess, scenarios: list[Scenario]) -> None:
    """PrepareConf on its own connection (as APISIX), then one call each through the driver."""
    for sc in scenarios:
        conn = await RunnerConnection.open(runner.path)
        try:
            phase = "ext-plugin-post-req" if sc.rewrite else "ext-plugin-pre-req"
            sc.token = await conn.prepare(sc.conf, f"route#routes#{sc.route}#{phase}#1")
        finally:
            await conn.close()
        asked: list[ExtraInfo] = []
        conn = await RunnerConnection.open(runner.path)
        try:
            resp = await conn.req_call(
                codec.HTTPReqCallReq(
                    id=0,
                    conf_token=sc.token,
                    method=Method.POST,
                    path="/v1/chat/completions",
                    src_ip=bytes((127, 0, 0, 1)),
                    headers=[*(sc.headers or HEADERS), ("content-length", str(len(sc.body)))],
                ),
                recording_answer(sc, asked),
            )
        finally:
            await conn.close()
        bodies = sum(isinstance(q, codec.ReqBody) for q in asked)
        if len(asked) != sc.questions or bodies != int(sc.asks_body):
            raise BenchError(f"{sc.name}: driver check asked {asked!r}")
        if not sc.rewrite:
            if resp.action is not None:
                raise BenchError(f"{sc.name}: driver check got action {resp.action!r}")
            continue
        rewrite = check_rewrite(
            codec.frame(MsgType.RPC_HTTP_REQ_CALL, codec.encode_http_req_call_resp(resp)), 0
        )
        headers = dict(rewrite.headers)
        # The router set the request id the signature is bound to (the call sent none).
        request_id = headers.get("x-request-id") or ""
        try:
            targets = verify_route(BENCH_ROUTE_KEY.encode(), request_id, headers.get(ROUTE_HEADER))
        except Exception as exc:  # noqa: BLE001 - any refusal is a wrong answer
            raise BenchError(f"{sc.name}: the route signature does not verify: {exc}") from None
        if rewrite.body:
            raise BenchError(f"{sc.name}: the clean prompt's body was rewritten")
        print(f"{sc.name}: driver check: Rewrite, signed route {','.join(targets)}")


def redis_us(p: Point) -> str:
    return f"{p.redis_cpu_s / p.calls * 1e6:.1f}" if p.redis_cpu_s else "-"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def report(points: list[Point], rss_before: int, rss_after: int, client64: str) -> None:
    cols = (
        f"{'scenario':<14} {'conc':>4} {'calls':>6} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'runner CPU':>10} {'calls/CPU-s':>11} {'client us/call':>14} "
        f"{'body asked':>10} {'vars asked':>10} {'redis us/call':>13} {'RSS MiB':>7} "
        f"{'same CPU':>8}"
    )
    print(cols)
    print("-" * len(cols))
    for p in points:
        busy = p.runner_cpu_s / p.wall_s * 100
        print(
            f"{p.scenario:<14} {p.concurrency:>4} {p.calls:>6} {p.rate:>8,.0f} "
            f"{p.pct_ms(0.50):>7.3f} {p.pct_ms(0.99):>7.3f} {p.pct_ms(1.0):>7.3f} "
            f"{busy:>9.0f}% {p.per_cpu_s:>11,.0f} {p.client_cpu_s / p.calls * 1e6:>14.1f} "
            f"{p.body_asks:>10} {p.questions - p.body_asks:>10} "
            f"{redis_us(p):>13} {p.rss_after_kib / 1024:>7.1f} "
            f"{'-' if p.same_cpu is None else f'{p.same_cpu:.0%}':>8}"
        )
    print()
    print(
        f"targets: p50 <= {TARGET_P50_MS} ms, p99 <= {TARGET_P99_MS} ms per call; "
        f">= {TARGET_CALLS_PER_CPU_S:,.0f} calls per CPU-second of the runner"
    )
    for p in points:
        p50, p99 = p.pct_ms(0.50), p.pct_ms(0.99)
        line = (
            f"  {p.scenario:<14} c{p.concurrency:<3} p50 {verdict(p50 <= TARGET_P50_MS):<4} "
            f"p99 {verdict(p99 <= TARGET_P99_MS):<4} "
            f"calls/CPU-s {verdict(p.per_cpu_s >= TARGET_CALLS_PER_CPU_S)}"
        )
        if p.concurrency > 1:
            line += (
                f"  (queueing: {p.concurrency} in flight / {p.rate:,.0f} calls/s = "
                f"{p.concurrency / p.rate * 1000:.2f} ms expected wait)"
            )
        print(line)
    print()
    total = sum(p.calls for p in points)
    print(
        f"runner RSS: {rss_before / 1024:.1f} MiB after PrepareConf, before any call; "
        f"{rss_after / 1024:.1f} MiB after all calls ({rss_after - rss_before:+,} KiB; "
        f"{total:,} measured calls plus warm-ups)"
    )
    print(
        "runner CPU = user+system time of the runner process / wall time of the measured calls; "
        f"client (load generator) for concurrency 64: {client64}; same CPU = share of samples "
        "(every 256 calls) in which the runner last ran on the client's CPU (nothing is pinned); "
        "redis us/call = CPU of the quota store's Redis server per call"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--calls", type=int, default=None, help="measured calls per point (default 10,000)"
    )
    parser.add_argument("--quick", action="store_true", help="a few hundred calls: smoke test")
    parser.add_argument(
        "--client64",
        choices=("uvloop", "threads"),
        default="uvloop",
        help="load generator for concurrency 64 (default uvloop)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default all)",
    )
    parser.add_argument(
        "--conc",
        action="append",
        type=int,
        choices=(1, 64),
        help="run only this concurrency (repeatable; default 1 and 64)",
    )
    args = parser.parse_args(argv)
    calls = args.calls or (300 if args.quick else 10_000)
    warmup = 100 if args.quick else 2_000
    if calls < 1:
        parser.error("--calls must be positive")

    body, chain_body = orjson.dumps(CHAT_BODY), orjson.dumps(FULL_CHAIN_BODY)
    try:
        chain = full_chain_conf()
    except (BenchError, OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        print(f"error: the shipped chat route's chain: {exc!r}", file=sys.stderr)
        return 1
    scenarios = [
        Scenario("empty", [], body, asks_body=False),
        Scenario(
            "prompt-filter",
            [(PROMPT_FILTER, orjson.dumps(PROMPT_FILTER_CONF).decode())],
            body,
            asks_body=True,
        ),
        Scenario(
            "full-chain",
            chain,
            chain_body,
            asks_body=True,
            vars={"consumer_name": BENCH_CONSUMER},
            questions=2,  # consumer_name and the body; route_id comes from PrepareConf's key
            rewrite=True,
            route=CHAT_ROUTE,
            headers=POST_REQ_HEADERS,
        ),
    ]
    assert tuple(sc.name for sc in scenarios) == SCENARIOS
    if args.scenario:
        scenarios = [sc for sc in scenarios if sc.name in args.scenario]
    concurrencies = sorted(set(args.conc or (1, 64)))
    needs_redis = any(sc.name == "full-chain" for sc in scenarios)
    c64: Callable[[RunnerProcess, Scenario, int, int, int], Point] = (
        bench_c64_uvloop if args.client64 == "uvloop" else bench_c64_threads
    )
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"deepgate runner benchmark, {started}; python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; {calls:,} measured calls per point after {warmup:,} warm-up; "
        f"body {len(body):,} bytes (full-chain: {len(chain_body):,}, model 'auto')"
    )
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-runner-"))
        extra_env = {
            "DEEPGATE_ROUTE_KEY": BENCH_ROUTE_KEY,
            # The router's background ProviderStats refresh finds no sidecar here (a closed
            # port), whatever else runs on this machine: routes keep the configured order.
            "DEEPGATE_SIDECAR_GRPC": "127.0.0.1:9",
        }
        redis: EmbeddedRedis | None = None
        if needs_redis:
            try:
                redis = stack.enter_context(EmbeddedRedis())
            except EmbeddedRedisError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            extra_env["DEEPGATE_REDIS_URL"] = redis.url
        runner = RunnerProcess(Path(tmp), extra_env)
        if redis is not None and redis._proc is not None:
            runner.redis_pid = redis._proc.pid
        try:
            runner.wait_ready()
            import uvloop

            uvloop.run(prepare_and_check(runner, scenarios))
            rss_before = runner.rss_kib()
            points: list[Point] = []
            # Interleaved so that the scenarios see the same machine state at each concurrency.
            for conc in concurrencies:
                for sc in scenarios:
                    if conc == 1:
                        points.append(bench_c1(runner, sc, warmup, calls))
                    else:
                        points.append(c64(runner, sc, conc, warmup, calls))
            rss_after = runner.rss_kib()
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            print(f"runner log (last 2,000 characters):\n{runner.tail()}", file=sys.stderr)
            runner.stop()
            return 1
        status = runner.stop()
        if status != 0:
            print(
                f"error: the runner exited with status {status}: {runner.tail()}", file=sys.stderr
            )
            return 1
    report(points, rss_before, rss_after, args.client64)
    return 0


if __name__ == "__main__":
    sys.exit(main())
