"""Unique ids and nonces without a system call per draw.

A request makes three draws on the runner's hot path (its request id, its quota reservation id,
the nonce that seals its facts); ``uuid4`` and ``os.urandom`` each cost a ``getrandom`` call.
Here each process draws 64 random bits once (again after a fork, and whenever its counter would
wrap) and counts: values never repeat within a process, and two processes share a prefix with
probability ~n²/2⁶⁵. That is the "fixed field + invocation counter" construction NIST SP 800-38D
gives for AES-GCM nonces, so ``nonce`` is safe for keys that many runner processes share.
"""

from __future__ import annotations

import itertools
import os
import threading

_COUNTER_LIMIT = 1 << 32  # the invocation field of a 12-byte nonce


class _Sequence:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reseed()

    def _reseed(self) -> None:
        self.prefix = os.urandom(8)
        self.prefix_hex = self.prefix.hex()
        self.counter = itertools.count()

    def next(self) -> tuple[bytes, str, int]:
        n = next(self.counter)  # itertools.count is atomic under the GIL
        if n >= _COUNTER_LIMIT:
            with self._lock:
                self._reseed()
                n = next(self.counter)
        return self.prefix, self.prefix_hex, n


_SEQ = _Sequence()
os.register_at_fork(after_in_child=_SEQ._reseed)


def unique_id() -> str:
    """32 lower-case hex characters (the shape of ``uuid4().hex``), unique per draw."""
    _, prefix_hex, n = _SEQ.next()
    return f"{prefix_hex}{n:016x}"


def nonce() -> bytes:
    """12 bytes that never repeat: for AES-GCM under a key many processes share."""
    prefix, _, n = _SEQ.next()
    return prefix + n.to_bytes(4, "big")
