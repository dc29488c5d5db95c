"""The pool as its own process (`python -m sidecar --role pool`): SIGTERM drains.

What an autoscaler's scale-down does to a replica: work already queued is finished and answered,
new work is refused (callers move on to another replica), and the process exits 0 within its
grace period. Uses the real embedding model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from sidecar._proto.deepgate.v1 import deepgate_pb2, deepgate_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
providers:
  local: {kind: local}
aliases:
  local: [local:smollm2-135m-instruct]
pool:
  local_chat: false
  max_batch_size: 8
  max_wait_ms: 2
shutdown_grace_s: 60
"""
TEXT = " ".join(["The replica finishes the work it accepted before it stops."] * 12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_text(log: Path) -> str:
    return log.read_text()


async def embed(stub: deepgate_pb2_grpc.DeepgateStub, text: str) -> int:
    reply = await stub.Embed(
        deepgate_pb2.EmbedRequest(model="all-MiniLM-L6-v2", inputs=[text]), timeout=120
    )
    return len(reply.vectors[0].values)


async def wait_serving(
    stub: deepgate_pb2_grpc.DeepgateStub, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the pool exited: {log_text(log)}")
        try:
            await embed(stub, "ready?")
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.5)
    raise AssertionError(f"the pool did not come up: {log_text(log)}")


@pytest.mark.slow
async def test_sigterm_finishes_queued_work_refuses_new_and_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "pool.yaml"
    config.write_text(CONFIG)
    port, log = free_port(), tmp_path / "pool.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, waited on below
            [sys.executable, "-m", "sidecar", "--role", "pool", "--config", str(config),
             "--http", f"127.0.0.1:{free_port()}", "--grpc", f"127.0.0.1:{port}"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = deepgate_pb2_grpc.DeepgateStub(channel)  # type: ignore[no-untyped-call]
            await wait_serving(stub, proc, log)
            queued = [asyncio.ensure_future(embed(stub, f"{i} {TEXT}")) for i in range(96)]
            await asyncio.sleep(0.3)  # the calls have reached the replica's queue
            assert not all(call.done() for call in queued), "the work finished before SIGTERM"
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await embed(stub, "new work after SIGTERM")
            dims = await asyncio.gather(*queued)
        assert dims == [384] * len(queued)  # every queued call was answered, none dropped
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
