"""The plugin runner's life, as APISIX's privileged agent runs it.

APISIX starts ``ext-plugin.cmd`` with ``APISIX_LISTEN_ADDRESS`` and ``APISIX_CONF_EXPIRE_TIME``
and only the variables listed under ``nginx_config.envs`` (nginx hides the rest), logs its
output, respawns it 3 s after it exits, and stops it with SIGTERM, then SIGKILL after 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

log = logging.getLogger(__name__)

RESPAWN_DELAY_S = 3.0
KILL_AFTER_S = 1.0


class RunnerSupervisor:
    def __init__(self, cmd: list[str], socket_path: str, envs: list[str]) -> None:
        self.cmd = cmd
        self.socket_path = socket_path
        self.envs = envs
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def _env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in (*self.envs, "TZ") if k in os.environ}
        env["APISIX_LISTEN_ADDRESS"] = f"unix:{self.socket_path}"
        env["APISIX_CONF_EXPIRE_TIME"] = "3600"
        return env

    async def start(self, ready_s: float = 30.0) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._watch())
        await self.wait_ready(ready_s)

    async def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        # Its own process group (a terminal's Ctrl-C reaches us, and we stop it), same session.
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, env=self._env(), preexec_fn=os.setpgrp
        )
        log.info("runner started", extra={"pid": self.proc.pid, "cmd": self.cmd[0]})

    async def wait_ready(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            try:
                _, writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return
        raise RuntimeError(f"the plugin runner did not listen on {self.socket_path} in {seconds} s")

    async def _watch(self) -> None:
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            log.warning("runner exited (code %s); respawning in %.0f s", code, RESPAWN_DELAY_S)
            await asyncio.sleep(RESPAWN_DELAY_S)
            if not self._stopping:
                await self._spawn()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), KILL_AFTER_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
