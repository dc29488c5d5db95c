"""``python -m devgateway``: APISIX's stand-in, serving deepgate's APISIX files locally.

    python -m devgateway --config apisix-conf/config.yaml --routes apisix-conf/apisix.yaml
                         [--listen 127.0.0.1:9080] [--runner-socket PATH]

It loads both files (refusing what it does not imitate, exit 2), spawns the plugin runner from
``ext-plugin.cmd`` (or uses ``ext-plugin.path_for_test``), waits until it listens, and serves on
one uvloop event loop. SIGTERM or Ctrl-C: stop accepting, let requests and streams in flight
finish (up to 10 s), stop the runner (SIGTERM, then SIGKILL after 1 s), exit 0. A development and
test tool; production runs real APISIX on the same files.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
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
from devgateway.supervisor import RunnerStartError, RunnerSupervisor

log = logging.getLogger("devgateway")

SHUTDOWN_GRACE_S = 10.0
_SOCKET_PATH_MAX = 107  # sun_path on Linux, less the terminating NUL


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="devgateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="apisix-conf/config.yaml", help="APISIX config.yaml")
    parser.add_argument("--routes", default="apisix-conf/apisix.yaml", help="APISIX apisix.yaml")
    parser.add_argument(
        "--listen",
        help="HOST:PORT to serve on (default 127.0.0.1 and apisix.node_listen; port 0 "
        "picks a free one, logged at start)",
    )
    parser.add_argument("--runner-socket", help="where the spawned runner listens")
    return parser.parse_args(argv)


def _listen(value: str | None, default_port: int) -> tuple[str, int]:
    host, _, port = (value or f"127.0.0.1:{default_port}").rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"--listen {value!r}: give HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(args: argparse.Namespace) -> int:
    try:
        conf = load(args.config, args.routes)
        host, port = _listen(args.listen, conf.listen_port)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    for warning in conf.warnings:
        log.warning("%s", warning)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    socket_dir: str | None = None
    supervisor: RunnerSupervisor | None = None
    if conf.runner_cmd:
        sock = args.runner_socket or conf.runner_socket
        if sock is None:
            socket_dir = tempfile.mkdtemp(prefix="devgateway-")
            sock = str(Path(socket_dir) / "runner.sock")
    else:
        sock = args.runner_socket or conf.runner_socket or "/nonexistent/devgateway-runner.sock"
    if len(sock.encode()) > _SOCKET_PATH_MAX:
        log.error("cannot start: the runner socket path is too long for a Unix socket: %s", sock)
        return 2
    gateway = Gateway(conf, sock)
    if conf.runner_cmd:
        supervisor = RunnerSupervisor(
            conf.runner_cmd, sock, conf.runner_env_names(), on_exit=gateway.driver.runner_exited
        )

    runner = web.AppRunner(gateway.app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    code = 0
    try:
        if supervisor is not None:
            await supervisor.start()
        await gateway.start()
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0] if runner.addresses else (host, port)
        log.info(
            "devgateway serving",
            extra={"listen": f"{bound[0]}:{bound[1]}", "routes": len(conf.routes), "runner": sock},
        )
        await stopping.wait()
        log.info("stopping: finishing requests in flight")
    except RunnerStartError as exc:
        log.error("cannot start: %s", exc)
        code = 2
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc.strerror)
        code = 2
    finally:
        if runner.server is not None:
            await runner.cleanup()  # stop accepting, wait for requests in flight, close
        await gateway.stop()
        if supervisor is not None:
            await supervisor.stop()
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
    log.info("stopped")
    return code


def main(argv: list[str] | None = None) -> None:
    setup_logging("devgateway")
    args = parse_args(argv)
    sys.exit(aio.run(serve(args)))


if __name__ == "__main__":
    main()
