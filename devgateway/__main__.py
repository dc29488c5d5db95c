"""``python -m devgateway``: APISIX's stand-in, serving deepgate's APISIX files locally.

    python -m devgateway --config apisix-conf/config.yaml --routes apisix-conf/apisix.yaml
                         [--listen 127.0.0.1:9080] [--runner-socket PATH]

It spawns the plugin runner from ``ext-plugin.cmd`` (or uses ``ext-plugin.path_for_test``),
waits until it listens, and serves. SIGTERM or Ctrl-C: stop accepting, let requests in flight
finish, stop the runner, exit 0. A development and test tool; production runs real APISIX.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from deepgate import aio
from deepgate.config import ConfigError
from deepgate.logs import setup_logging
from devgateway.conf import load
from devgateway.gateway import Gateway
from devgateway.supervisor import RunnerSupervisor

log = logging.getLogger("devgateway")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="devgateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="apisix-conf/config.yaml")
    parser.add_argument("--routes", default="apisix-conf/apisix.yaml")
    parser.add_argument("--listen", help="HOST:PORT (default: 127.0.0.1 and apisix.node_listen)")
    parser.add_argument("--runner-socket", help="where the spawned runner listens")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    try:
        conf = load(args.config, args.routes)
    except (ConfigError, OSError, ValueError, KeyError, TypeError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    supervisor = None
    if conf.runner_cmd:
        sock = args.runner_socket or str(Path(tempfile.mkdtemp(prefix="dg-")) / "runner.sock")
        supervisor = RunnerSupervisor(conf.runner_cmd, sock, conf.envs)
        await supervisor.start()
    elif conf.runner_socket:
        sock = conf.runner_socket
    else:
        sock = "/nonexistent/runner.sock"  # no ext-plugin configured: ext-plugin routes get 503
    gateway = Gateway(conf, sock)
    await gateway.start()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", gateway.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    host, _, port = (args.listen or f"127.0.0.1:{conf.listen_port}").rpartition(":")
    try:
        await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.listen, exc)
        await runner.cleanup()
        if supervisor is not None:
            await supervisor.stop()
        return 2
    log.info("devgateway serving", extra={"listen": f"{host}:{port}", "routes": len(conf.routes)})
    await stopping.wait()
    log.info("stopping")
    await runner.cleanup()
    await gateway.stop()
    if supervisor is not None:
        await supervisor.stop()
    return 0


def main(argv: list[str] | None = None) -> None:
    setup_logging("devgateway")
    args = parse_args(argv)
    sys.exit(aio.run(serve(args)))


if __name__ == "__main__":
    main()
