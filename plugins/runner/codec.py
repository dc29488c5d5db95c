"""The APISIX external-plugin wire format (protocol v0.6.1), both directions, by hand.

Frames are 1 type byte, a 3-byte big-endian length and a FlatBuffer whose root table depends on
the type (see ``docs/apisix-ext-plugin-protocol.md``). This module encodes and decodes every table
of the protocol, for both sides: the runner (decodes calls, encodes replies) and our APISIX-side
driver (the reverse).

Why by hand: the only published Python bindings are generated from an older schema, and the
generated readers call a method per byte for ``[ubyte]`` fields. Here the reader is a small,
bounds-checked FlatBuffers table walker over ``bytes`` (every offset is checked, so a hostile or
truncated buffer raises ``ProtocolError`` instead of reading out of range or allocating without
limit), and the writer uses the official ``flatbuffers`` Builder. The schema, in slot order:

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
from dataclasses import dataclass, field

import flatbuffers

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

    def tables(self, slot: int) -> list[_Table]:
        start, count = self._vector(slot, 4)
        buf = self._buf
        budget = self._budget
        return [
            _Table(buf, p + _U32(buf, p)[0], budget) for p in range(start, start + 4 * count, 4)
        ]

    def entries(self, slot: int) -> Entries:
        return [(t.string(0) or "", t.string(1)) for t in self.tables(slot)]


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


def _string(b: flatbuffers.Builder, s: str) -> int:
    return int(b.CreateString(s, "utf-8", "surrogateescape"))


def _offsets(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return int(b.EndVector())


def _entries(b: flatbuffers.Builder, pairs: Entries) -> int:
    offs = []
    for name, value in pairs:
        n = _string(b, name)
        v = _string(b, value) if value is not None else 0
        b.StartObject(2)
        b.PrependUOffsetTRelativeSlot(0, n, 0)
        if value is not None:
            b.PrependUOffsetTRelativeSlot(1, v, 0)
        offs.append(b.EndObject())
    return _offsets(b, offs)


def _finish(b: flatbuffers.Builder, root: int) -> bytes:
    b.Finish(root)
    return bytes(b.Output())


def encode_err_resp(code: ErrCode) -> bytes:
    b = flatbuffers.Builder(16)
    b.StartObject(1)
    b.PrependUint8Slot(0, int(code), 0)
    return _finish(b, b.EndObject())


def encode_prepare_conf_req(msg: PrepareConfReq) -> bytes:
    b = flatbuffers.Builder(256)
    conf = _entries(b, [(n, v) for n, v in msg.conf])
    key = _string(b, msg.key)
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(0, conf, 0)
    b.PrependUOffsetTRelativeSlot(1, key, 0)
    return _finish(b, b.EndObject())


def encode_prepare_conf_resp(conf_token: int) -> bytes:
    b = flatbuffers.Builder(16)
    b.StartObject(1)
    b.PrependUint32Slot(0, conf_token, 0)
    return _finish(b, b.EndObject())


def encode_http_req_call_req(msg: HTTPReqCallReq) -> bytes:
    b = flatbuffers.Builder(512)
    ip = b.CreateByteVector(msg.src_ip)
    path = _string(b, msg.path)
    args = _entries(b, msg.args)
    headers = _entries(b, msg.headers)
    b.StartObject(7)
    b.PrependUint32Slot(0, msg.id, 0)
    b.PrependUOffsetTRelativeSlot(1, ip, 0)
    b.PrependUint8Slot(2, int(msg.method), 0)
    b.PrependUOffsetTRelativeSlot(3, path, 0)
    b.PrependUOffsetTRelativeSlot(4, args, 0)
    b.PrependUOffsetTRelativeSlot(5, headers, 0)
    b.PrependUint32Slot(6, msg.conf_token, 0)
    return _finish(b, b.EndObject())


def _stop(b: flatbuffers.Builder, stop: Stop) -> int:
    headers = _entries(b, stop.headers) if stop.headers else 0
    body = b.CreateByteVector(stop.body) if stop.body else 0
    b.StartObject(3)
    b.PrependUint16Slot(0, stop.status, 0)
    if headers:
        b.PrependUOffsetTRelativeSlot(1, headers, 0)
    if body:
        b.PrependUOffsetTRelativeSlot(2, body, 0)
    return int(b.EndObject())


def _rewrite(b: flatbuffers.Builder, rw: Rewrite) -> int:
    path = _string(b, rw.path) if rw.path is not None else 0
    headers = _entries(b, rw.headers) if rw.headers else 0
    args = _entries(b, rw.args) if rw.args else 0
    resp_headers = _entries(b, rw.resp_headers) if rw.resp_headers else 0
    body = b.CreateByteVector(rw.body) if rw.body else 0
    b.StartObject(5)
    for slot, off in enumerate((path, headers, args, resp_headers, body)):
        if off:
            b.PrependUOffsetTRelativeSlot(slot, off, 0)
    return int(b.EndObject())


def encode_http_req_call_resp(msg: HTTPReqCallResp) -> bytes:
    action = msg.action
    size = 64 + (len(action.body) if action is not None else 0)
    b = flatbuffers.Builder(size)
    kind, inner = 0, 0
    if isinstance(action, Stop):
        kind, inner = 1, _stop(b, action)
    elif isinstance(action, Rewrite):
        kind, inner = 2, _rewrite(b, action)
    b.StartObject(3)
    b.PrependUint32Slot(0, msg.id, 0)
    if kind:
        b.PrependUint8Slot(1, kind, 0)
        b.PrependUOffsetTRelativeSlot(2, inner, 0)
    return _finish(b, b.EndObject())


def encode_extra_info_req(info: ExtraInfo) -> bytes:
    b = flatbuffers.Builder(64)
    if isinstance(info, Var):
        name = _string(b, info.name)
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(0, name, 0)
        kind = 1
    else:
        b.StartObject(0)
        kind = 2 if isinstance(info, ReqBody) else 3
    inner = b.EndObject()
    b.StartObject(2)
    b.PrependUint8Slot(0, kind, 0)
    b.PrependUOffsetTRelativeSlot(1, inner, 0)
    return _finish(b, b.EndObject())


def encode_extra_info_resp(result: bytes | None) -> bytes:
    b = flatbuffers.Builder(32 + len(result or b""))
    data = b.CreateByteVector(result) if result is not None else 0
    b.StartObject(1)
    if result is not None:
        b.PrependUOffsetTRelativeSlot(0, data, 0)
    return _finish(b, b.EndObject())


def encode_http_resp_call_req(msg: HTTPRespCallReq) -> bytes:
    b = flatbuffers.Builder(256)
    headers = _entries(b, msg.headers)
    b.StartObject(4)
    b.PrependUint32Slot(0, msg.id, 0)
    b.PrependUint16Slot(1, msg.status, 0)
    b.PrependUOffsetTRelativeSlot(2, headers, 0)
    b.PrependUint32Slot(3, msg.conf_token, 0)
    return _finish(b, b.EndObject())


def encode_http_resp_call_resp(msg: HTTPRespCallResp) -> bytes:
    b = flatbuffers.Builder(64 + len(msg.body))
    headers = _entries(b, msg.headers) if msg.headers else 0
    body = b.CreateByteVector(msg.body) if msg.body else 0
    b.StartObject(4)
    b.PrependUint32Slot(0, msg.id, 0)
    b.PrependUint16Slot(1, msg.status, 0)
    if headers:
        b.PrependUOffsetTRelativeSlot(2, headers, 0)
    if body:
        b.PrependUOffsetTRelativeSlot(3, body, 0)
    return _finish(b, b.EndObject())


def _no_action_template() -> tuple[bytearray, int]:
    """A framed HTTPReqCall reply with no action, and where its id sits in it.

    The reply APISIX gets most often differs between calls only in the id, so it is built once
    and the id patched in (the id field is written even when it is 0, which readers accept).
    """
    b = flatbuffers.Builder(32)
    b.StartObject(3)
    b.PrependUint32Slot(0, 0xA6A6A6A6, 0)
    payload = _finish(b, b.EndObject())
    framed = bytearray(frame(MsgType.RPC_HTTP_REQ_CALL, payload))
    return framed, framed.index(b"\xa6\xa6\xa6\xa6")


_NO_ACTION, _NO_ACTION_ID_AT = _no_action_template()
_PACK_U32 = struct.Struct("<I").pack_into


def no_action_frame(call_id: int) -> bytes:
    """The framed "go on unchanged" reply to call ``call_id``."""
    out = bytearray(_NO_ACTION)
    _PACK_U32(out, _NO_ACTION_ID_AT, call_id)
    return bytes(out)
