"""The APISIX external-plugin wire format (protocol v0.6.1), both directions, by hand.

Frames are 1 type byte, a 3-byte big-endian length and a FlatBuffer whose root table depends on
the type (see ``docs/apisix-ext-plugin-protocol.md``). This module encodes and decodes every table
of the protocol, for both sides: the runner (decodes calls, encodes replies) and our APISIX-side
driver (the reverse).

Why by hand: the only published Python bindings are generated from an older schema, and the
generated readers call a method per byte for ``[ubyte]`` fields. Here the reader is a small,
bounds-checked FlatBuffers table walker over ``bytes`` (every offset is checked, so a hostile or
truncated buffer raises ``ProtocolError`` instead of reading out of range or allocating without
limit), and the writer is a small forward writer (see "writing" below) that costs a few
microseconds per reply where the generic Builder makes a Python call per byte written. The
schema, in slot order:

    TextEntry { name: string; value: string; }
    Err.Resp { code: ubyte }                          (BAD_REQUEST, SERVICE_UNAVAILABLE,
                                                       CONF_TOKEN_NOT_FOUND)
    PrepareConf.Req { conf: [TextEntry]; key: string; }   PrepareConf.Resp { conf_token: uint32; }
    HTTPReqCall.Req { id: uint32; src_ip: [ubyte]; method: ubyte; path: string;
                      args: [TextEntry]; headers: [TextEntry]; conf_token: uint32; }
    HTTPReqCall.Stop { status: uint16; headers: [TextEntry]; body: [ubyte]; }
    HTTPReqCall.Rewrite { path: string; headers: [TextEntry]; args: [TextEntry];
                          resp_headers: [TextEntry]; body: [ubyte]; }
    HTTPReqCall.Resp { id: uint32; action: union { Stop = 1, Rewrite = 2 }; }
    ExtraInfo.Req { info: union { Var = 1, ReqBody = 2, RespBody = 3 }; }   Var { name: string; }
    ExtraInfo.Resp { result: [ubyte]; }
    HTTPRespCall.Req { id: uint32; status: uint16; headers: [TextEntry]; conf_token: uint32; }
    HTTPRespCall.Resp { id: uint32; status: uint16; headers: [TextEntry]; body: [ubyte]; }

A union takes two slots: its type byte, then the table.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# --- framing --------------------------------------------------------------------------------

MAX_PAYLOAD = (1 << 24) - 1  # the 3-byte length field; larger payloads can never be framed


class MsgType(enum.IntEnum):
    RPC_ERROR = 0
    RPC_PREPARE_CONF = 1
    RPC_HTTP_REQ_CALL = 2
    RPC_EXTRA_INFO = 3
    RPC_HTTP_RESP_CALL = 4


class ErrCode(enum.IntEnum):
    BAD_REQUEST = 0
    SERVICE_UNAVAILABLE = 1
    CONF_TOKEN_NOT_FOUND = 2


class Method(enum.IntEnum):
    GET = 0
    HEAD = 1
    POST = 2
    PUT = 3
    DELETE = 4
    MKCOL = 5
    COPY = 6
    MOVE = 7
    OPTIONS = 8
    PROPFIND = 9
    PROPPATCH = 10
    LOCK = 11
    UNLOCK = 12
    PATCH = 13
    TRACE = 14


class ProtocolError(Exception):
    """A frame or buffer that does not follow the protocol."""


class FrameTooLarge(ProtocolError):
    """A payload past the 16 MiB frame limit."""


def frame(msg_type: int, payload: bytes) -> bytes:
    """Prefix ``payload`` with its type byte and 3-byte big-endian length."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise FrameTooLarge(f"payload of {n} bytes exceeds the protocol's {MAX_PAYLOAD}")
    return bytes((msg_type, n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF)) + payload


def parse_header(header: bytes) -> tuple[int, int]:
    """(type, payload length) of a 4-byte frame header."""
    return header[0], header[1] << 16 | header[2] << 8 | header[3]


# --- messages -------------------------------------------------------------------------------

Entries = list[tuple[str, str | None]]
"""Name/value pairs in wire order; a value of ``None`` is an entry without value."""


@dataclass(slots=True)
class PrepareConfReq:
    conf: list[tuple[str, str]]
    key: str = ""


@dataclass(slots=True)
class PrepareConfResp:
    conf_token: int


@dataclass(slots=True)
class ErrResp:
    code: ErrCode


@dataclass(slots=True)
class HTTPReqCallReq:
    id: int
    conf_token: int
    method: int = Method.GET
    path: str = "/"
    src_ip: bytes = b""
    args: Entries = field(default_factory=list)
    headers: Entries = field(default_factory=list)


@dataclass(slots=True)
class Stop:
    status: int = 0
    headers: Entries = field(default_factory=list)
    body: bytes = b""


@dataclass(slots=True)
class Rewrite:
    path: str | None = None
    headers: Entries = field(default_factory=list)
    args: Entries = field(default_factory=list)
    resp_headers: Entries = field(default_factory=list)
    body: bytes = b""


@dataclass(slots=True)
class HTTPReqCallResp:
    id: int
    action: Stop | Rewrite | None = None


@dataclass(slots=True, frozen=True)
class Var:
    name: str


@dataclass(slots=True, frozen=True)
class ReqBody:
    pass


@dataclass(slots=True, frozen=True)
class RespBody:
    pass


ExtraInfo = Var | ReqBody | RespBody


@dataclass(slots=True)
class ExtraInfoReq:
    info: ExtraInfo


@dataclass(slots=True)
class ExtraInfoResp:
    result: bytes | None


@dataclass(slots=True)
class HTTPRespCallReq:
    id: int
    conf_token: int
    status: int = 200
    headers: Entries = field(default_factory=list)


@dataclass(slots=True)
class HTTPRespCallResp:
    id: int
    status: int = 0
    headers: Entries = field(default_factory=list)
    body: bytes = b""


# --- reading --------------------------------------------------------------------------------

_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U16x2 = struct.Struct("<HH").unpack_from


class _Table:
    """A bounds-checked view of one FlatBuffers table inside ``buf``.

    FlatBuffers lets many offsets point at one object, so a small hostile buffer could name the
    same large string thousands of times. ``budget`` (shared by every table of one decode) caps
    the bytes a decode may copy out at a small multiple of the payload's own size.
    """

    __slots__ = ("_budget", "_buf", "_pos", "_vt", "_vtlen")

    def __init__(self, buf: bytes, pos: int, budget: list[int]) -> None:
        n = len(buf)
        if pos < 0 or pos + 4 > n:
            raise ProtocolError("table offset outside the buffer")
        vt = pos - _I32(buf, pos)[0]
        if vt < 0 or vt + 4 > n:
            raise ProtocolError("vtable outside the buffer")
        vtlen = _U16(buf, vt)[0]
        if vtlen < 4 or vtlen & 1 or vt + vtlen > n:
            raise ProtocolError("malformed vtable")
        if pos + _U16(buf, vt + 2)[0] > n:
            raise ProtocolError("table runs past the buffer")
        self._buf = buf
        self._pos = pos
        self._vt = vt
        self._vtlen = vtlen
        self._budget = budget

    def _field(self, slot: int, size: int) -> int:
        """Absolute position of a present field of ``size`` bytes, else 0."""
        o = 4 + 2 * slot
        if o + 2 > self._vtlen:
            return 0
        off: int = _U16(self._buf, self._vt + o)[0]
        if not off:
            return 0
        p = self._pos + off
        if p + size > len(self._buf):
            raise ProtocolError("field runs past the buffer")
        return p

    def u8(self, slot: int) -> int:
        p = self._field(slot, 1)
        return self._buf[p] if p else 0

    def u16(self, slot: int) -> int:
        p = self._field(slot, 2)
        return int(_U16(self._buf, p)[0]) if p else 0

    def u32(self, slot: int) -> int:
        p = self._field(slot, 4)
        return int(_U32(self._buf, p)[0]) if p else 0

    def _target(self, slot: int) -> int:
        """Where the offset in ``slot`` points (a vector, string or table), or -1."""
        p = self._field(slot, 4)
        if not p:
            return -1
        rel: int = _U32(self._buf, p)[0]
        return p + rel

    def _vector(self, slot: int, item_size: int) -> tuple[int, int]:
        """(start, count) of a vector field; (0, -1) when absent."""
        t = self._target(slot)
        if t < 0:
            return 0, -1
        if t + 4 > len(self._buf):
            raise ProtocolError("vector outside the buffer")
        count = _U32(self._buf, t)[0]
        start = t + 4
        if start + count * item_size > len(self._buf):
            raise ProtocolError("vector runs past the buffer")
        return start, count

    def raw(self, slot: int) -> bytes | None:
        start, count = self._vector(slot, 1)
        if count < 0:
            return None
        self._budget[0] -= count
        if self._budget[0] < 0:
            raise ProtocolError("buffer references the same data too many times")
        return self._buf[start : start + count]

    def string(self, slot: int) -> str | None:
        raw = self.raw(slot)
        # nginx passes header bytes through as they came; keep any invalid UTF-8 reversible.
        return None if raw is None else raw.decode("utf-8", "surrogateescape")

    def table(self, slot: int) -> _Table | None:
        t = self._target(slot)
        return None if t < 0 else _Table(self._buf, t, self._budget)

    def entries(self, slot: int) -> Entries:
        """A vector of TextEntry tables, walked inline (the hot path: every call's headers)
        with the same checks as ``_Table`` and ``string``."""
        start, count = self._vector(slot, 4)
        buf = self._buf
        n = len(buf)
        budget = self._budget
        out: Entries = []
        for p in range(start, start + 4 * count, 4):
            pos = p + _U32(buf, p)[0]
            if pos + 4 > n:
                raise ProtocolError("table offset outside the buffer")
            vt = pos - _I32(buf, pos)[0]
            if vt < 0 or vt + 4 > n:
                raise ProtocolError("vtable outside the buffer")
            vtlen, size = _U16x2(buf, vt)
            if vtlen < 4 or vtlen & 1 or vt + vtlen > n or pos + size > n:
                raise ProtocolError("malformed vtable")
            pair: list[str | None] = [None, None]
            for i in (0, 1):
                if 6 + 2 * i > vtlen:
                    break
                off = _U16(buf, vt + 4 + 2 * i)[0]
                if not off:
                    continue
                f = pos + off
                if f + 4 > n:
                    raise ProtocolError("field runs past the buffer")
                t = f + _U32(buf, f)[0]
                if t + 4 > n:
                    raise ProtocolError("vector outside the buffer")
                length = _U32(buf, t)[0]
                if t + 4 + length > n:
                    raise ProtocolError("vector runs past the buffer")
                budget[0] -= length
                if budget[0] < 0:
                    raise ProtocolError("buffer references the same data too many times")
                pair[i] = buf[t + 4 : t + 4 + length].decode("utf-8", "surrogateescape")
            out.append((pair[0] or "", pair[1]))
        return out


def _root(payload: bytes) -> _Table:
    if len(payload) < 8:
        raise ProtocolError("payload too short to hold a table")
    # Legitimate buffers copy out less than their own size; allow sharing, never amplification.
    return _Table(payload, _U32(payload, 0)[0], [2 * len(payload) + 4096])


def decode_prepare_conf_req(payload: bytes) -> PrepareConfReq:
    t = _root(payload)
    conf = [(name, value or "") for name, value in t.entries(0)]
    return PrepareConfReq(conf=conf, key=t.string(1) or "")


def decode_prepare_conf_resp(payload: bytes) -> PrepareConfResp:
    return PrepareConfResp(conf_token=_root(payload).u32(0))


def decode_err_resp(payload: bytes) -> ErrResp:
    code = _root(payload).u8(0)
    try:
        return ErrResp(code=ErrCode(code))
    except ValueError:
        raise ProtocolError(f"unknown error code {code}") from None


def call_conf_token(payload: bytes) -> int:
    """The conf token of an HTTPReqCall, read without decoding the rest of it."""
    return _root(payload).u32(6)


def decode_http_req_call_req(payload: bytes) -> HTTPReqCallReq:
    t = _root(payload)
    return HTTPReqCallReq(
        id=t.u32(0),
        src_ip=t.raw(1) or b"",
        method=t.u8(2),
        path=t.string(3) or "",
        args=t.entries(4),
        headers=t.entries(5),
        conf_token=t.u32(6),
    )


def _decode_stop(t: _Table) -> Stop:
    return Stop(status=t.u16(0), headers=t.entries(1), body=t.raw(2) or b"")


def _decode_rewrite(t: _Table) -> Rewrite:
    return Rewrite(
        path=t.string(0),
        headers=t.entries(1),
        args=t.entries(2),
        resp_headers=t.entries(3),
        body=t.raw(4) or b"",
    )


def decode_http_req_call_resp(payload: bytes) -> HTTPReqCallResp:
    t = _root(payload)
    kind = t.u8(1)
    action: Stop | Rewrite | None = None
    if kind:
        inner = t.table(2)
        if inner is None or kind not in (1, 2):
            raise ProtocolError(f"bad action (type {kind})")
        action = _decode_stop(inner) if kind == 1 else _decode_rewrite(inner)
    return HTTPReqCallResp(id=t.u32(0), action=action)


def decode_extra_info_req(payload: bytes) -> ExtraInfoReq:
    t = _root(payload)
    kind = t.u8(0)
    inner = t.table(1)
    if kind == 1 and inner is not None:
        return ExtraInfoReq(Var(inner.string(0) or ""))
    if kind == 2:
        return ExtraInfoReq(ReqBody())
    if kind == 3:
        return ExtraInfoReq(RespBody())
    raise ProtocolError(f"bad extra-info request (type {kind})")


def decode_extra_info_resp(payload: bytes) -> ExtraInfoResp:
    return ExtraInfoResp(result=_root(payload).raw(0))


def decode_http_resp_call_req(payload: bytes) -> HTTPRespCallReq:
    t = _root(payload)
    return HTTPRespCallReq(id=t.u32(0), status=t.u16(1), headers=t.entries(2), conf_token=t.u32(3))


def decode_http_resp_call_resp(payload: bytes) -> HTTPRespCallResp:
    t = _root(payload)
    return HTTPRespCallResp(
        id=t.u32(0), status=t.u16(1), headers=t.entries(2), body=t.raw(3) or b""
    )


# --- writing --------------------------------------------------------------------------------
#
# A forward writer: each object is appended after the field that points at it, so every uoffset
# is positive, as the format requires. A table is written as its vtable, then the table (whose
# soffset points back at the vtable), then what its fields point at, in slot order; every object
# starts 4-aligned. The entries of one vector share two vtables (with and without a value). A
# scalar equal to its default (0) is left out, as FlatBuffers builders do. Readers, ours and
# APISIX's, only follow offsets, so this layout reads like a Builder's.

_P_U16 = struct.Struct("<H").pack
_P_U32 = struct.Struct("<I").pack
_P_I32 = struct.Struct("<i").pack
_P_ENTRY = struct.Struct("<iIII").pack  # soffset, name offset, value offset, name length
_P_NAME_ONLY = struct.Struct("<iII").pack  # soffset, name offset, name length
_PACK_U32 = struct.Struct("<I").pack_into
_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0", b"\0\0\0\0")
# Entry vtables: (vtable size 8, table size 12, name at 4, value at 8); (6, 8, name at 4) + pad.
_ENTRY_VTABLES = struct.pack("<HHHHHHHxx", 8, 12, 4, 8, 6, 8, 4)

Put = Callable[[bytearray, Any], int]
"""Appends one object to the buffer and returns where it starts."""


def _put_string(buf: bytearray, s: str) -> int:
    # nginx passes header bytes through as they came: surrogateescape gives them back unchanged.
    data = s.encode("utf-8", "surrogateescape")
    pos = len(buf)
    n = len(data)
    buf += _P_U32(n)
    buf += data
    buf += _ZEROS[4 - (n & 3)]  # the terminating NUL, then padding to 4
    return pos


def _put_bytes(buf: bytearray, data: bytes) -> int:
    pos = len(buf)
    n = len(data)
    buf += _P_U32(n)
    buf += data
    buf += _ZEROS[-n & 3]
    return pos


def _put_entries(buf: bytearray, pairs: Entries) -> int:
    """A vector of TextEntry tables."""
    vtables = len(buf)
    buf += _ENTRY_VTABLES
    vec = len(buf)
    buf += _P_U32(len(pairs))
    buf += bytes(4 * len(pairs))
    slot = vec + 4
    for name, value in pairs:
        t = len(buf)
        _PACK_U32(buf, slot, t - slot)
        slot += 4
        nb = name.encode("utf-8", "surrogateescape")
        nn = len(nb)
        if value is None:
            buf += _P_NAME_ONLY(t - vtables - 8, 4, nn)
            buf += nb
            buf += _ZEROS[4 - (nn & 3)]
            continue
        # The name string starts right after the table (t + 12), the value right after the name.
        name_size = 8 + nn - (nn & 3)
        buf += _P_ENTRY(t - vtables, 8, 4 + name_size, nn)
        buf += nb
        buf += _ZEROS[4 - (nn & 3)]
        vb = value.encode("utf-8", "surrogateescape")
        vn = len(vb)
        buf += _P_U32(vn)
        buf += vb
        buf += _ZEROS[4 - (vn & 3)]
    return vec


def _put_table(
    buf: bytearray,
    nslots: int,
    refs: list[tuple[int, Put, Any]],
    scalars: tuple[tuple[int, int, int], ...] = (),
) -> int:
    """A table. ``refs``: (slot, writer, value) of the fields that point at an object;
    ``scalars``: (slot, size in bytes, value), largest first; zeros are left out."""
    offsets = [0] * nslots
    at = 4 + 4 * len(refs)
    for i, (slot, _, _) in enumerate(refs):
        offsets[slot] = 4 + 4 * i
    inline = bytearray()
    for slot, size, value in scalars:
        if value:
            offsets[slot] = at
            at += size
            inline += value.to_bytes(size, "little")
    size = (at + 3) & ~3
    inline += _ZEROS[size - at]
    vtable = struct.pack(f"<{nslots + 2}H", 4 + 2 * nslots, size, *offsets)
    vt = len(buf)
    buf += vtable
    buf += _ZEROS[-len(vtable) & 3]
    t = len(buf)
    buf += _P_I32(t - vt)
    buf += bytes(4 * len(refs))
    buf += inline
    for i, (_, put, value) in enumerate(refs):
        field_at = t + 4 + 4 * i
        _PACK_U32(buf, field_at, put(buf, value) - field_at)
    return t


def _finish(put: Put, value: Any) -> bytes:
    buf = bytearray(4)  # the root offset, filled in last
    _PACK_U32(buf, 0, put(buf, value))
    return bytes(buf)


def encode_err_resp(code: ErrCode) -> bytes:
    return _finish(lambda buf, _: _put_table(buf, 1, [], ((0, 1, int(code)),)), None)


def encode_prepare_conf_req(msg: PrepareConfReq) -> bytes:
    refs: list[tuple[int, Put, Any]] = [(0, _put_entries, msg.conf), (1, _put_string, msg.key)]
    return _finish(lambda buf, _: _put_table(buf, 2, refs), None)


def encode_prepare_conf_resp(conf_token: int) -> bytes:
    return _finish(lambda buf, _: _put_table(buf, 1, [], ((0, 4, conf_token),)), None)


def encode_http_req_call_req(msg: HTTPReqCallReq) -> bytes:
    refs: list[tuple[int, Put, Any]] = [
        (1, _put_bytes, msg.src_ip),
        (3, _put_string, msg.path),
        (4, _put_entries, msg.args),
        (5, _put_entries, msg.headers),
    ]
    scalars = ((0, 4, msg.id), (6, 4, msg.conf_token), (2, 1, int(msg.method)))
    return _finish(lambda buf, _: _put_table(buf, 7, refs, scalars), None)


def _put_stop(buf: bytearray, stop: Stop) -> int:
    refs: list[tuple[int, Put, Any]] = []
    if stop.headers:
        refs.append((1, _put_entries, stop.headers))
    if stop.body:
        refs.append((2, _put_bytes, stop.body))
    return _put_table(buf, 3, refs, ((0, 2, stop.status),))


def _put_rewrite(buf: bytearray, rw: Rewrite) -> int:
    refs: list[tuple[int, Put, Any]] = []
    if rw.path is not None:
        refs.append((0, _put_string, rw.path))
    if rw.headers:
        refs.append((1, _put_entries, rw.headers))
    if rw.args:
        refs.append((2, _put_entries, rw.args))
    if rw.resp_headers:
        refs.append((3, _put_entries, rw.resp_headers))
    if rw.body:
        refs.append((4, _put_bytes, rw.body))
    return _put_table(buf, 5, refs)


def _put_http_req_call_resp(buf: bytearray, msg: HTTPReqCallResp) -> int:
    action = msg.action
    if action is None:
        return _put_table(buf, 3, [], ((0, 4, msg.id),))
    put: Put
    if isinstance(action, Stop):
        kind, put = 1, _put_stop
    else:
        kind, put = 2, _put_rewrite
    return _put_table(buf, 3, [(2, put, action)], ((0, 4, msg.id), (1, 1, kind)))


def encode_http_req_call_resp(msg: HTTPReqCallResp) -> bytes:
    return _finish(_put_http_req_call_resp, msg)


def _put_var(buf: bytearray, name: str) -> int:
    return _put_table(buf, 1, [(0, _put_string, name)])


def _put_empty_table(buf: bytearray, _: Any) -> int:
    return _put_table(buf, 0, [])


def encode_extra_info_req(info: ExtraInfo) -> bytes:
    inner: Put
    if isinstance(info, Var):
        kind, inner, value = 1, _put_var, info.name
    else:
        kind, inner, value = (2 if isinstance(info, ReqBody) else 3), _put_empty_table, None
    return _finish(lambda buf, _: _put_table(buf, 2, [(1, inner, value)], ((0, 1, kind),)), None)


def encode_extra_info_resp(result: bytes | None) -> bytes:
    refs: list[tuple[int, Put, Any]] = [] if result is None else [(0, _put_bytes, result)]
    return _finish(lambda buf, _: _put_table(buf, 1, refs), None)


def encode_http_resp_call_req(msg: HTTPRespCallReq) -> bytes:
    refs: list[tuple[int, Put, Any]] = [(2, _put_entries, msg.headers)]
    scalars = ((0, 4, msg.id), (3, 4, msg.conf_token), (1, 2, msg.status))
    return _finish(lambda buf, _: _put_table(buf, 4, refs, scalars), None)


def encode_http_resp_call_resp(msg: HTTPRespCallResp) -> bytes:
    refs: list[tuple[int, Put, Any]] = []
    if msg.headers:
        refs.append((2, _put_entries, msg.headers))
    if msg.body:
        refs.append((3, _put_bytes, msg.body))
    scalars = ((0, 4, msg.id), (1, 2, msg.status))
    return _finish(lambda buf, _: _put_table(buf, 4, refs, scalars), None)


def _no_action_template() -> tuple[bytearray, int]:
    """A framed HTTPReqCall reply with no action, and where its id sits in it.

    The reply APISIX gets most often differs between calls only in the id, so it is built once
    and the id patched in (the id field is written even when it is 0, which readers accept).
    """
    payload = encode_http_req_call_resp(HTTPReqCallResp(id=0xA6A6A6A6))
    framed = bytearray(frame(MsgType.RPC_HTTP_REQ_CALL, payload))
    return framed, framed.index(b"\xa6\xa6\xa6\xa6")


_NO_ACTION, _NO_ACTION_ID_AT = _no_action_template()


def no_action_frame(call_id: int) -> bytes:
    """The framed "go on unchanged" reply to call ``call_id``."""
    out = bytearray(_NO_ACTION)
    _PACK_U32(out, _NO_ACTION_ID_AT, call_id)
    return bytes(out)
