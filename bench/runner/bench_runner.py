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
import contextlib
import datetime
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import orjson
import yaml
from load import Point, RunnerProcess, bench_c1, bench_c64_threads, bench_c64_uvloop
from scenarios import (
    BENCH_CONSUMER,
    BENCH_ROUTE_KEY,
    CHAT_BODY,
    CHAT_ROUTE,
    FULL_CHAIN_BODY,
    HEADERS,
    POST_REQ_HEADERS,
    PROMPT_FILTER,
    PROMPT_FILTER_CONF,
    SCENARIOS,
    TARGET_CALLS_PER_CPU_S,
    TARGET_P50_MS,
    TARGET_P99_MS,
    BenchError,
    Scenario,
    check_rewrite,
    full_chain_conf,
)

from deepgate.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from deepgate.route_signature import HEADER as ROUTE_HEADER
from deepgate.route_signature import verify_route
from devgateway.driver import Answer, RunnerConnection
from plugins.runner import codec
from plugins.runner.codec import ExtraInfo, Method, MsgType

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
    parser.add_argument(
        "--redis-unix",
        action="store_true",
        help="the runner reaches the quota store's Redis over its Unix socket (default TCP)",
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
            # TCP unless --redis-unix: Redis on this machine over its Unix socket
            extra_env["DEEPGATE_REDIS_URL"] = redis.unix_url if args.redis_unix else redis.url
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
