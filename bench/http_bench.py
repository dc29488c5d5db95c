"""Shared harness of the HTTP benchmarks: processes, a light client, wrk, and the report.

Every benchmark measures its target and the fake upstream directly in the same run, so the
figure that matters is the difference (added latency) or the ratio (throughput), not the
absolute number on a shared 2-core machine. Latency is a closed loop at concurrency 1 over a
keep-alive connection (http.client, no framework); throughput is wrk at 20 connections when
wrk is installed (lighter than any Python client), else a threaded http.client loop.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROCS: list[subprocess.Popen[bytes]] = []

CHAT = json.dumps(
    {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
    }
).encode()
STREAM = json.dumps(
    {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "stream": True,
    }
).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    args: list[str], env: dict[str, str] | None = None, log: str | None = None
) -> subprocess.Popen[bytes]:
    out = open(log or os.devnull, "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    PROCS.append(proc)
    return proc


@atexit.register
def stop_all() -> None:
    for proc in PROCS:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
    for proc in PROCS:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def wait_http(port: int, path: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing answered on 127.0.0.1:{port}{path} in {seconds} s")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def session_rss_kib(sid: int) -> int:
    """RSS of every process in session ``sid`` (a launcher and all it started)."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    total += rss_kib(int(entry))
    return total


@dataclass
class Target:
    name: str
    port: int
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = field(default_factory=dict)
    expect: bytes = b"benchmark upstream"


def _post(conn: http.client.HTTPConnection, t: Target, body: bytes) -> http.client.HTTPResponse:
    conn.request("POST", t.path, body, {"content-type": "application/json", **t.headers})
    return conn.getresponse()


def latency(t: Target, n: int, warmup: int) -> list[float]:
    """Seconds per non-streamed request, closed loop at concurrency 1."""
    conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=30)
    out = []
    for i in range(warmup + n):
        started = time.perf_counter()
        resp = _post(conn, t, CHAT)
        data = resp.read()
        elapsed = time.perf_counter() - started
        if resp.status != 200 or t.expect not in data:
            raise SystemExit(f"{t.name}: wrong answer {resp.status} {data[:200]!r}")
        if i >= warmup:
            out.append(elapsed)
    conn.close()
    return out


def stream_times(t: Target, n: int, warmup: int) -> tuple[list[float], list[float]]:
    """(time to first byte, time to last byte) of streamed requests at concurrency 1."""
    conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=30)
    first, last = [], []
    for i in range(warmup + n):
        started = time.perf_counter()
        resp = _post(conn, t, STREAM)
        head = resp.read1(65536)
        t_first = time.perf_counter() - started
        data = head + resp.read()
        t_last = time.perf_counter() - started
        if resp.status != 200 or b"[DONE]" not in data:
            raise SystemExit(f"{t.name}: wrong stream {resp.status} {data[:200]!r}")
        if i >= warmup:
            first.append(t_first)
            last.append(t_last)
    conn.close()
    return first, last


def throughput(t: Target, body: bytes, conns: int, seconds: float) -> tuple[float, str]:
    """Requests per second at ``conns`` connections, and which client measured it."""
    if shutil.which("wrk"):
        script = Path(tempfile.mkdtemp()) / "post.lua"
        headers = {"content-type": "application/json", **t.headers}
        lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
        lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
        script.write_text("\n".join(lines) + "\n")
        out = subprocess.run(
            ["wrk", "-t2", f"-c{conns}", f"-d{int(seconds)}s", "-s", str(script),
             f"http://127.0.0.1:{t.port}{t.path}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        errors = [ln for ln in out.splitlines() if "Non-2xx" in ln or "Socket errors" in ln]
        if errors:
            raise SystemExit(f"{t.name}: wrk saw errors: {errors}")
        rps = next(ln for ln in out.splitlines() if ln.startswith("Requests/sec:"))
        return float(rps.split()[1]), "wrk"
    count = [0]
    stop = time.monotonic() + seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=30)
        while time.monotonic() < stop:
            _post(conn, t, body).read()
            count[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(conns)]
    started = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return count[0] / (time.monotonic() - started), "python threads"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


@dataclass
class Row:
    name: str
    p50: float
    p99: float
    worst: float
    ttfb: float
    ttlb: float
    rps: float
    stream_rps: float


def measure(t: Target, n: int, warmup: int, seconds: float, conns: int) -> tuple[Row, str]:
    lat = latency(t, n, warmup)
    first, last = stream_times(t, max(200, n // 4), warmup // 4)
    rps, client = throughput(t, CHAT, conns, seconds)
    srps, _ = throughput(t, STREAM, conns, seconds)
    row = Row(
        t.name, pct(lat, 0.5), pct(lat, 0.99), max(lat) * 1000,
        statistics.median(first) * 1000, statistics.median(last) * 1000, rps, srps,
    )  # fmt: skip
    return row, client


def report(rows: list[Row], baseline: Row) -> str:
    lines = [
        f"{'target':<22}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'+p50 ms':>9}{'+p99 ms':>9}"
        f"{'TTFB ms':>9}{'TTLB ms':>9}{'req/s':>9}{'stream/s':>10}{'vs direct':>11}"
    ]
    for r in rows:
        lines.append(
            f"{r.name:<22}{r.p50:8.3f}{r.p99:8.3f}{r.worst:8.2f}{r.p50 - baseline.p50:9.3f}"
            f"{r.p99 - baseline.p99:9.3f}{r.ttfb:9.3f}{r.ttlb:9.3f}{r.rps:9,.0f}"
            f"{r.stream_rps:10,.0f}{r.rps / baseline.rps:10.1%}"
        )
    return "\n".join(lines)
