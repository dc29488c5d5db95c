"""RESP encoding and reply parsing of the request path's Redis client."""

from __future__ import annotations

import pytest
from redis.exceptions import NoScriptError, ResponseError

from deepgate.redis_wire import _Incomplete, encode, parse


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode(("GET", "k")) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert encode(("SET", b"\x00\r\n", 7, 1.5)) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\n\x00\r\n\r\n$1\r\n7\r\n$3\r\n1.5\r\n"
    )
    assert encode(("EVALSHA", "é")) == b"*2\r\n$7\r\nEVALSHA\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError, match="cannot send a list"):
        encode(("GET", ["k"]))


REPLIES = [
    (b"+OK\r\n", b"OK"),
    (b":-42\r\n", -42),
    (b"$5\r\nhe\r\no\r\n", b"he\r\no"),  # a bulk string may hold CRLF
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*3\r\n:1\r\n:0\r\n*2\r\n$1\r\na\r\n:7\r\n", [1, 0, [b"a", 7]]),
]


@pytest.mark.parametrize(("wire", "value"), REPLIES)
def test_replies_parse_and_every_cut_is_incomplete(wire: bytes, value: object) -> None:
    assert parse(wire + b":9\r\n") == (value, len(wire))  # the next reply is left alone
    for cut in range(len(wire)):
        with pytest.raises(_Incomplete):
            parse(wire[:cut])


def test_error_replies_become_redis_py_errors() -> None:
    err, used = parse(b"-NOSCRIPT No matching script.\r\n")
    assert isinstance(err, NoScriptError)
    assert used == 31
    err, _ = parse(b"-ERR wrong number of arguments\r\n")
    assert type(err) is ResponseError
    assert str(err) == "ERR wrong number of arguments"
