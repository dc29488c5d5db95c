"""Ids and nonces from a per-process random prefix and a counter."""

from __future__ import annotations

import os
import re

from deepgate import unique


def test_ids_look_like_uuid4_hex_and_never_repeat() -> None:
    ids = [unique.unique_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_nonces_are_12_bytes_with_the_process_prefix_and_never_repeat() -> None:
    nonces = [unique.nonce() for _ in range(10_000)]
    assert {len(n) for n in nonces} == {12}
    assert len({n[:8] for n in nonces}) == 1
    assert len(set(nonces)) == len(nonces)


def test_a_wrapping_counter_draws_a_new_prefix() -> None:
    seq = unique._Sequence()
    first = seq.prefix
    seq.counter = iter([unique._COUNTER_LIMIT, 0])  # type: ignore[assignment]
    prefix, _, n = seq.next()
    assert (prefix != first, n) == (True, 0)


def test_a_forked_child_draws_its_own_prefix() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, unique.nonce()[:8])
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 8) != unique.nonce()[:8]
