"""The cheapest OpenAI-compatible upstream we can write, so that it never dominates a benchmark.

One uvloop ``asyncio.Protocol``, HTTP/1.1 keep-alive, no framework: ``POST .../chat/completions``
answers a fixed ``chat.completion`` (or, with ``"stream": true`` in the body, a fixed 10-chunk SSE
stream with a usage chunk and ``[DONE]``); anything else answers 404.

Usage: python bench/fake_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
import uvloop

_COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "deepseek-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the benchmark upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
)


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "deepseek-chat",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


_WORDS = [
    "Hello",
    " from",
    " the",
    " benchmark",
    " upstream",
    ",",
    " ten",
    " chunks",
    " in",
    " all.",
]
_STREAM = (
    _chunk({"role": "assistant", "content": ""})
    + b"".join(_chunk({"content": w}) for w in _WORDS)
    + _chunk({}, "stop")
    + b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,'
    b'"model":"deepseek-chat","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":10,'
    b'"total_tokens":22}}\n\n' + b"data: [DONE]\n\n"
)


def _response(status: bytes, ctype: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


_JSON = _response(b"200 OK", b"application/json", _COMPLETION)
_SSE = _response(b"200 OK", b"text/event-stream", _STREAM)
_404 = _response(b"404 Not Found", b"application/json", b'{"error":{"message":"not found"}}')


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport writes

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(
                    head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None]
                )
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            assert self.transport is not None
            if b"/chat/completions" not in head.split(b"\r\n", 1)[0]:
                self.transport.write(_404)
            elif b'"stream":true' in body.replace(b" ", b""):
                self.transport.write(_SSE)
            else:
                self.transport.write(_JSON)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
