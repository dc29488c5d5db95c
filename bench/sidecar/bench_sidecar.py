"""The sidecar's HTTP face against the upstream directly, in one run.

Starts the cheapest OpenAI-compatible upstream (bench/fake_upstream.py) and `python -m sidecar
--role gateway` with it as DeepSeek, then measures both with the same requests: latency at
concurrency 1 (non-streamed), time to first and last byte of a 10-chunk stream, and throughput
at 20 connections, non-streamed and streamed. The sidecar's cost is the difference.

    .venv/bin/python bench/sidecar/bench_sidecar.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import http_bench as hb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, warmup, seconds = (200, 50, 3.0) if args.quick else (2000, 300, 10.0)

    upstream, http, grpc = hb.free_port(), hb.free_port(), hb.free_port()
    hb.start([hb.PY, "bench/fake_upstream.py", str(upstream)])
    env = {
        "DEEPSEEK_API_KEY": "sk-bench",
        "DEEPSEEK_BASE_URL": f"http://127.0.0.1:{upstream}",
        "DEEPGATE_LOG_LEVEL": "WARNING",
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
    }
    sidecar = hb.start(
        [hb.PY, "-m", "sidecar", "--role", "gateway", "--http", f"127.0.0.1:{http}",
         "--grpc", f"127.0.0.1:{grpc}"],
        env, log="/tmp/deepgate-bench-sidecar.log",
    )  # fmt: skip
    hb.wait_http(upstream, "/")
    hb.wait_http(http, "/healthz")
    rss_before = hb.rss_kib(sidecar.pid)
    cpu_before = _cpu(sidecar.pid)
    rows, client = [], ""
    for t in (hb.Target("upstream directly", upstream), hb.Target("sidecar", http)):
        row, client = hb.measure(t, n, warmup, seconds, 20)
        rows.append(row)
    cpu = _cpu(sidecar.pid) - cpu_before
    print(
        f"deepgate sidecar benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPUs; {n} requests at concurrency 1 after {warmup} warm-up; "
        f"throughput: {client}, 20 connections, {seconds:.0f} s"
    )
    print(hb.report(rows, rows[0]))
    print(
        f"sidecar RSS {rss_before} -> {hb.rss_kib(sidecar.pid)} KiB; "
        f"sidecar CPU over the sidecar runs {cpu:.1f} s"
    )


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
