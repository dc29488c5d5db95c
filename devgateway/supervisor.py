"""The plugin runner's life, as APISIX's privileged agent runs it.

APISIX starts ``ext-plugin.cmd`` with ``APISIX_LISTEN_ADDRESS=unix:<socket>`` and
``APISIX_CONF_EXPIRE_TIME=3600`` in an environment nginx has stripped down to the variables listed
under ``nginx_config.envs`` (plus PATH, APISIX_PROFILE, APISIX_DEPLOYMENT_ETCD_HOST and TZ, which
APISIX's nginx.conf always keeps); an ``envs`` entry ``NAME=value`` sets the value, as nginx's
``env`` does. When the runner exits APISIX logs it, flushes its conf tokens, and respawns it 3 s
later; on shutdown it sends SIGTERM, then SIGKILL after 1 s.

Differences, on purpose: the runner's output goes straight to our stderr (APISIX copies it into
its error log), it runs in its own process group (in our session) so a terminal's Ctrl-C reaches
only us and we stop it in order, and start-up waits until its socket accepts connections (APISIX
serves at once and answers 503 until then), failing fast if it exits first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable

log = logging.getLogger("devgateway.runner")

RESPAWN_DELAY_S = 3.0
KILL_AFTER_S = 1.0
CONF_EXPIRE_TIME = "3600"
_POLL_S = 0.05


class RunnerStartError(Exception):
    """The runner could not be started, or exited before it listened."""


def runner_env(names: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment nginx would leave the runner: only the listed names (``NAME=value`` sets)."""
    source = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for entry in names:
        name, eq, value = entry.partition("=")
        if eq:
            env[name] = value
        elif name in source:
            env[name] = source[name]
    return env


class RunnerSupervisor:
    def __init__(
        self,
        cmd: list[str],
        socket_path: str,
        env_names: list[str],
        on_exit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.cmd = cmd
        self.socket_path = socket_path
        self.env_names = env_names
        self.on_exit = on_exit
        # subprocess, not asyncio's: uvloop cannot start a child in a process group of its own.
        self.proc: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def env(self) -> dict[str, str]:
        env = runner_env(self.env_names)
        env["APISIX_LISTEN_ADDRESS"] = f"unix:{self.socket_path}"
        env["APISIX_CONF_EXPIRE_TIME"] = CONF_EXPIRE_TIME
        return env

    async def start(self, ready_s: float = 30.0) -> None:
        """Spawn the runner and wait until its socket accepts; ``RunnerStartError`` if not."""
        self._spawn()
        await self.wait_ready(ready_s)
        self._task = asyncio.create_task(self._watch())

    def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        try:
            # Its own process group, in our session: a terminal's Ctrl-C reaches only us.
            self.proc = subprocess.Popen(self.cmd, env=self.env(), process_group=0)  # noqa: S603
        except OSError as exc:
            raise RunnerStartError(
                f"cannot start the plugin runner {self.cmd[0]!r} (ext-plugin.cmd): {exc.strerror}"
                " (is it on the PATH listed in nginx_config.envs?)"
            ) from None
        log.info("runner started", extra={"pid": self.proc.pid, "cmd": self.cmd[0]})

    async def wait_ready(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            code = self.proc.poll() if self.proc is not None else None
            if code is not None:
                raise RunnerStartError(
                    f"the plugin runner exited (code {code}) before listening on "
                    f"{self.socket_path}; see its output above"
                )
            try:
                _, writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError:
                await asyncio.sleep(_POLL_S)
                continue
            writer.close()
            return
        await self._terminate()
        raise RunnerStartError(
            f"the plugin runner did not listen on {self.socket_path} in {seconds} s"
        )

    async def _exited(self, timeout_s: float | None = None) -> int | None:
        """The runner's exit code once it exits (``None``: still running after ``timeout_s``)."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while (code := self.proc.poll()) is None:
            if deadline is not None and loop.time() >= deadline:
                return None
            await asyncio.sleep(_POLL_S)
        return code

    async def _watch(self) -> None:
        while not self._stopping:
            code = await self._exited()
            if self._stopping:
                return
            log.warning("runner exited (code %s); respawning in %.0f s", code, RESPAWN_DELAY_S)
            if self.on_exit is not None:
                await self.on_exit()
            await asyncio.sleep(RESPAWN_DELAY_S)
            while not self._stopping:
                try:
                    self._spawn()
                    break
                except RunnerStartError as exc:
                    log.error("%s; trying again in %.0f s", exc, RESPAWN_DELAY_S)
                    await asyncio.sleep(RESPAWN_DELAY_S)

    async def _terminate(self) -> None:
        """SIGTERM, then SIGKILL to its whole process group after 1 s."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        if await self._exited(KILL_AFTER_S) is None:
            log.warning("runner ignored SIGTERM for %.0f s; killing it", KILL_AFTER_S)
            # Still alive, so its process group is still ours: the runner and what it started.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await self._exited()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._terminate()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
