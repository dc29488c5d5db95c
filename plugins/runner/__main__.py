"""``python -m plugins.runner`` / ``deepgate-runner``: the process APISIX's ext-plugin.cmd starts.

APISIX passes the socket address in ``APISIX_LISTEN_ADDRESS`` (``unix:/path``) and how long it
caches conf tokens in ``APISIX_CONF_EXPIRE_TIME``. It captures our stdout/stderr into its error
log, respawns us 3 s after we exit, and stops us with SIGTERM (then SIGKILL after 1 s): on SIGTERM
we stop accepting, give calls in flight up to a second, and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from deepgate import aio
from deepgate.logs import setup_logging
from plugins.registry import REGISTRY
from plugins.runner.server import Runner

log = logging.getLogger("plugins.runner")


class StartupError(Exception):
    """The environment APISIX gives the runner is missing or wrong."""


def socket_path(address: str | None) -> str:
    if not address:
        raise StartupError(
            "APISIX_LISTEN_ADDRESS is not set. APISIX sets it when ext-plugin.cmd starts the "
            "runner; to run it by hand, set APISIX_LISTEN_ADDRESS=unix:/tmp/runner.sock."
        )
    if not address.startswith("unix:"):
        raise StartupError(f"APISIX_LISTEN_ADDRESS must start with 'unix:' (got {address!r}).")
    return address[len("unix:") :]


def expire_seconds(raw: str | None) -> float:
    if raw is None or raw == "":
        return 3600.0
    try:
        value = float(raw)
    except ValueError:
        raise StartupError(
            f"APISIX_CONF_EXPIRE_TIME must be a number of seconds (got {raw!r})."
        ) from None
    if value <= 0:
        raise StartupError("APISIX_CONF_EXPIRE_TIME must be positive.")
    return value


async def serve(path: str, expire_s: float) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    runner = Runner(REGISTRY, conf_expire_s=expire_s)
    await runner.start(path)
    await stopping.wait()
    log.info("stopping")
    await runner.stop(grace_s=1.0)
    log.info("stopped")


def main() -> None:
    setup_logging("deepgate-runner")
    try:
        path = socket_path(os.environ.get("APISIX_LISTEN_ADDRESS"))
        expire_s = expire_seconds(os.environ.get("APISIX_CONF_EXPIRE_TIME"))
    except StartupError as exc:
        log.error("%s", exc)
        sys.exit(2)
    aio.run(serve(path, expire_s))


if __name__ == "__main__":
    main()
