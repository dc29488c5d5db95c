"""The whole stack (stand-in gateway + plugin runner + sidecar) against the upstream directly.

In one run: the fake upstream reached directly (the baseline), the sidecar's HTTP face, and the
whole stack as `make run` starts it (key-auth, the auth bridge and the prompt filter through the
runner, then the sidecar). Optional `--extra NAME=PORT` adds another gateway already running on
127.0.0.1:PORT with the same OpenAI route and `--extra-key` as its bearer key (LiteLLM: see
bench/README.md) to compare in the same run.

    .venv/bin/python bench/stack/bench_stack.py [--quick] [--upstream-port 18080]
                                                [--extra litellm=4000 --extra-key sk-x]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import http_bench as hb

KEY = "sk-bench-stack-key"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--extra", action="append", default=[], help="NAME=PORT")
    parser.add_argument("--extra-key", default="sk-anything")
    parser.add_argument("--upstream-port", type=int, help="where to start the fake upstream")
    args = parser.parse_args()
    n, warmup, seconds = (200, 50, 3.0) if args.quick else (2000, 300, 10.0)

    upstream = args.upstream_port or hb.free_port()
    hb.start([hb.PY, "bench/fake_upstream.py", str(upstream)])
    gateway = hb.free_port()
    env = {
        "DEEPGATE_PORT": str(gateway),
        "DEEPGATE_DEMO_KEY": KEY,
        "DEEPSEEK_API_KEY": "sk-bench",
        "DEEPSEEK_BASE_URL": f"http://127.0.0.1:{upstream}",
        "DEEPGATE_LOG_LEVEL": "WARNING",
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
    }
    stack = hb.start([hb.PY, "-m", "devgateway.launch"], env, log="/tmp/deepgate-bench-stack.log")
    hb.wait_http(upstream, "/")
    hb.wait_http(9180, "/healthz")
    hb.wait_http(gateway, "/v1/models")
    targets = [
        hb.Target("upstream directly", upstream),
        hb.Target("sidecar", 9180),
        hb.Target("whole stack", gateway, headers={"authorization": f"Bearer {KEY}"}),
    ]
    for spec in args.extra:
        name, _, port = spec.partition("=")
        targets.append(
            hb.Target(name, int(port), headers={"authorization": f"Bearer {args.extra_key}"})
        )
    rss_before = hb.session_rss_kib(stack.pid)
    rows, client = [], ""
    for t in targets:
        row, client = hb.measure(t, n, warmup, seconds, 20)
        rows.append(row)
    print(
        f"deepgate stack benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPUs; {n} requests at concurrency 1 after {warmup} warm-up; "
        f"throughput: {client}, 20 connections, {seconds:.0f} s"
    )
    print(hb.report(rows, rows[0]))
    print(
        f"stack RSS (launcher, sidecar, gateway, runner) {rss_before // 1024} -> "
        f"{hb.session_rss_kib(stack.pid) // 1024} MiB"
    )


if __name__ == "__main__":
    main()
