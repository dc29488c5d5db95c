"""``python -m sidecar`` / ``deepgate-sidecar``: the provider gateway (and, later, the pool).

    python -m sidecar [--config FILE] [--role gateway|pool|all]
                      [--http HOST:PORT] [--grpc HOST:PORT]

Provider keys and base URLs come from the usual variables (``DEEPSEEK_API_KEY``,
``OPENAI_BASE_URL``, ...); ``DEEPGATE_ROUTE_KEY`` turns on route signatures. SIGTERM stops
accepting and lets requests and streams in flight finish within ``shutdown_grace_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from deepgate import aio
from deepgate.config import ConfigError
from deepgate.logs import setup_logging

log = logging.getLogger("sidecar")


def address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deepgate-sidecar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="sidecar config YAML (default: the shipped one)")
    parser.add_argument("--role", choices=("gateway", "pool", "all"), default="all")
    parser.add_argument("--http", type=address, default=address("127.0.0.1:8000"))
    parser.add_argument("--grpc", type=address, default=address("127.0.0.1:50051"))
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config, then exit (0 = valid)"
    )
    return parser.parse_args(argv)


def check_config(path: str | None) -> int:
    from sidecar.config import DEFAULT_CONFIG, load_config

    try:
        load_config(path)
    except ConfigError as exc:
        sys.stdout.write(f"{exc}\n")
        return 1
    sys.stdout.write(f"{path or DEFAULT_CONFIG}: valid\n")
    return 0


async def serve(args: argparse.Namespace) -> int:
    from sidecar.app import (
        Sidecar,
        build_answer_hooks,
        build_local_chat,
        build_local_inference,
        build_providers,
        build_remote_pool,
        route_key_from_env,
    )
    from sidecar.config import load_config
    from sidecar.inference import Inference
    from sidecar.metrics import Metrics

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    providers = build_providers(config) if args.role in ("gateway", "all") else {}
    metrics = Metrics()
    inference: Inference | None = None
    if args.role in ("pool", "all"):
        try:
            inference = await asyncio.to_thread(build_local_inference, config, metrics)
            local = [p for p, c in config.providers.items() if c.kind == "local"]
            if config.pool.local_chat and local:
                providers[local[0]] = await asyncio.to_thread(build_local_chat, config)
        except (RuntimeError, OSError, ImportError) as exc:
            log.error("cannot start the inference pool: %s", exc)
            return 2
    elif config.pool.addresses:
        inference, local_chat = build_remote_pool(config)
        if local_chat is not None:
            providers[local_chat.name] = local_chat
    sidecar = Sidecar(
        config,
        args.role,
        http_address=args.http,
        grpc_address=f"{args.grpc[0]}:{args.grpc[1]}",
        providers=providers,
        route_key=route_key_from_env(),
        inference=inference,
        metrics=metrics,
        hooks=build_answer_hooks(config, inference, metrics),
    )
    try:
        await sidecar.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await sidecar.stop()
        return 2
    await stopping.wait()
    log.info("stopping: finishing requests in flight for up to %ss", config.shutdown_grace_s)
    await sidecar.stop()
    return 0


def main(argv: list[str] | None = None) -> None:
    setup_logging("deepgate-sidecar")
    args = parse_args(argv)
    if args.check_config:
        sys.exit(check_config(args.config))
    sys.exit(aio.run(serve(args)))


if __name__ == "__main__":
    main()
