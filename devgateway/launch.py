"""``make run``: the whole deepgate stack on one machine, stopped as one.

Starts a Redis-compatible server on a free loopback port (quotas, the exact cache, the usage
stream; unless ``DEEPGATE_REDIS_URL`` names one already), the usage ledger's writer
(``deepgate ledger``), then the sidecar (role ``all``) where ``apisix-conf/apisix.yaml`` expects
its upstream (127.0.0.1:9180), then the APISIX stand-in on
127.0.0.1:$DEEPGATE_PORT (9080), which spawns the plugin runner from ``ext-plugin.cmd`` as APISIX
would. It waits until both answer, prints the URL
and the demo consumer's key (generated unless ``DEEPGATE_DEMO_KEY`` is set), and on Ctrl-C or
SIGTERM stops everything it started. If either process dies, it stops the other and exits 1.

The runner and the sidecar share a route key (``DEEPGATE_ROUTE_KEY``, generated when unset) so the
router's signed decisions and the plugin chain's sealed facts verify; local data (the RAG and
vector store, the usage ledger) goes under ``run/`` unless ``DEEPGATE_DATA_DIR`` says otherwise.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from deepgate.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
SIDECAR_HTTP = "127.0.0.1:9180"  # the upstream node in apisix-conf/apisix.yaml
SIDECAR_GRPC = "127.0.0.1:9182"
PROVIDER_KEYS = ("DEEPSEEK_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")


class Stack:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.on_stop: list[Callable[[], None]] = []  # after the processes: the local Redis
        self.stopping = False

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env)  # noqa: S603
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for _, proc in reversed(self.procs):  # the gateway first, then the sidecar
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stop in self.on_stop:
            stop()

    def dead(self) -> str | None:
        return next((name for name, proc in self.procs if proc.poll() is not None), None)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - our own loopback URL
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (401 without a key) means it is serving
    except (OSError, ValueError):
        return False


def wait_for(stack: Stack, name: str, url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not answers(url):
        gone = stack.dead()
        if gone or time.monotonic() > deadline:
            raise SystemExit(f"deepgate: the {gone or name} did not start; see the log above")
        time.sleep(0.2)


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> None:
    port = os.environ.get("DEEPGATE_PORT", "9080")
    env = dict(os.environ)
    env["DEEPGATE_DEMO_KEY"] = env.get(
        "DEEPGATE_DEMO_KEY"
    ) or "sk-deepgate-" + secrets.token_urlsafe(18)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["DEEPGATE_SIDECAR_GRPC"] = SIDECAR_GRPC
    # the router signs each route decision with it; the sidecar refuses unsigned requests
    env["DEEPGATE_ROUTE_KEY"] = env.get("DEEPGATE_ROUTE_KEY") or secrets.token_urlsafe(32)
    env.setdefault("DEEPGATE_DATA_DIR", str(ROOT / "run"))
    Path(env["DEEPGATE_DATA_DIR"]).mkdir(parents=True, exist_ok=True)

    stack = Stack()
    redis: EmbeddedRedis | None = None
    if not env.get("DEEPGATE_REDIS_URL"):
        redis = EmbeddedRedis().start()
        # every process of this stack runs here: the Unix socket is the cheaper way in
        env["DEEPGATE_REDIS_URL"] = redis.unix_url
        stack.on_stop.append(redis.stop)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stack.stop()
        raise SystemExit(0)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        # the usage ledger's one writer (run/ledger.db): `deepgate usage` reads what it wrote
        stack.start("ledger writer", ["-m", "sidecar.ledger_writer", "--drain-s", "10"], env)
        stack.start(
            "sidecar",
            ["-m", "sidecar", "--role", "all", "--http", SIDECAR_HTTP, "--grpc", SIDECAR_GRPC],
            env,
        )
        wait_for(stack, "sidecar", f"http://{SIDECAR_HTTP}/healthz", 120)
        stack.start(
            "gateway",
            [
                "-m",
                "devgateway",
                "--config",
                "apisix-conf/config.yaml",
                "--routes",
                "apisix-conf/apisix.yaml",
                "--listen",
                f"127.0.0.1:{port}",
            ],
            env,
        )
        wait_for(stack, "gateway", f"http://127.0.0.1:{port}/v1/models", 120)
        banner(port, env["DEEPGATE_DEMO_KEY"])
        while (gone := stack.dead()) is None:
            time.sleep(0.5)
        say(f"deepgate: the {gone} stopped; stopping the rest")
        stack.stop()
        raise SystemExit(1)
    except BaseException:
        stack.stop()
        raise


def banner(port: str, key: str) -> None:
    providers = [k for k in PROVIDER_KEYS if os.environ.get(k)]
    say("")
    say(f"deepgate is up on http://127.0.0.1:{port}")
    say(f"  demo consumer key: {key}")
    say(f"  OpenAI SDK:    OpenAI(base_url='http://127.0.0.1:{port}/v1', api_key='{key}')")
    say(f"  Anthropic SDK: Anthropic(base_url='http://127.0.0.1:{port}', api_key='{key}')")
    if providers:
        say(f"  providers: {', '.join(k.removesuffix('_API_KEY').lower() for k in providers)}")
    else:
        say("  no provider key set: chat is answered by the local model; set DEEPSEEK_API_KEY,")
        say("  OPENAI_API_KEY or ANTHROPIC_API_KEY (and *_BASE_URL) for the providers")
    say("  Ctrl-C stops everything.")
    say("")


if __name__ == "__main__":
    main()
