"""The APISIX external-plugin wire format (protocol v0.6.1), both directions, by hand.

Frames are 1 type byte, a 3-byte big-endian length and a FlatBuffer whose root table depends on
the type (see ``docs/apisix-ext-plugin-protocol.md``). This module encodes and decodes every table
of the protocol, for both sides: the runner (decodes calls, encodes replies) and our APISIX-side
driver (the reverse).

Why by hand: the only published Python bindings are generated from an older schema, and the
generated readers call a method per byte for ``[ubyte]`` fields. Here the tables are read and
written by ``tables``: a bounds-checked walker over ``bytes`` (a hostile or truncated buffer
raises ``ProtocolError``) and a forward writer that costs a few microseconds per reply. The
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
from dataclasses import dataclass, field
from typing import Any

from plugins.runner.tables import (
    PACK_U32,
    Put,
    Table,
    finish,
    put_bytes,
    put_entries,
    put_string,
    put_table,
    root,
)

# Entries and ProtocolError are part of the message API: re-exported
from plugins.runner.tables import Entries as Entries
from plugins.runner.tables import ProtocolError as ProtocolError

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


# --- reading ------------------------------------------------------------------------------


def decode_prepare_conf_req(payload: bytes) -> PrepareConfReq:
    t = root(payload)
    conf = [(name, value or "") for name, value in t.entries(0)]
    return PrepareConfReq(conf=conf, key=t.string(1) or "")


def decode_prepare_conf_resp(payload: bytes) -> PrepareConfResp:
    return PrepareConfResp(conf_token=root(payload).u32(0))


def decode_err_resp(payload: bytes) -> ErrResp:
    code = root(payload).u8(0)
    try:
        return ErrResp(code=ErrCode(code))
    except ValueError:
        raise ProtocolError(f"unknown error code {code}") from None


def call_conf_token(payload: bytes) -> int:
    """The conf token of an HTTPReqCall, read without decoding the rest of it."""
    return root(payload).u32(6)


def decode_http_req_call_req(payload: bytes) -> HTTPReqCallReq:
    t = root(payload)
    return HTTPReqCallReq(
        id=t.u32(0),
        src_ip=t.raw(1) or b"",
        method=t.u8(2),
        path=t.string(3) or "",
        args=t.entries(4),
        headers=t.entries(5),
        conf_token=t.u32(6),
    )


def _decode_stop(t: Table) -> Stop:
    return Stop(status=t.u16(0), headers=t.entries(1), body=t.raw(2) or b"")


def _decode_rewrite(t: Table) -> Rewrite:
    return Rewrite(
        path=t.string(0),
        headers=t.entries(1),
        args=t.entries(2),
        resp_headers=t.entries(3),
        body=t.raw(4) or b"",
    )


def decode_http_req_call_resp(payload: bytes) -> HTTPReqCallResp:
    t = root(payload)
    kind = t.u8(1)
    action: Stop | Rewrite | None = None
    if kind:
        inner = t.table(2)
        if inner is None or kind not in (1, 2):
            raise ProtocolError(f"bad action (type {kind})")
        action = _decode_stop(inner) if kind == 1 else _decode_rewrite(inner)
    return HTTPReqCallResp(id=t.u32(0), action=action)


def decode_extra_info_req(payload: bytes) -> ExtraInfoReq:
    t = root(payload)
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
    return ExtraInfoResp(result=root(payload).raw(0))


def decode_http_resp_call_req(payload: bytes) -> HTTPRespCallReq:
    t = root(payload)
    return HTTPRespCallReq(id=t.u32(0), status=t.u16(1), headers=t.entries(2), conf_token=t.u32(3))


def decode_http_resp_call_resp(payload: bytes) -> HTTPRespCallResp:
    t = root(payload)
    return HTTPRespCallResp(
        id=t.u32(0), status=t.u16(1), headers=t.entries(2), body=t.raw(3) or b""
    )


# --- writing ------------------------------------------------------------------------------


def encode_err_resp(code: ErrCode) -> bytes:
    return finish(lambda buf, _: put_table(buf, 1, [], ((0, 1, int(code)),)), None)


def encode_prepare_conf_req(msg: PrepareConfReq) -> bytes:
    refs: list[tuple[int, Put, Any]] = [(0, put_entries, msg.conf), (1, put_string, msg.key)]
    return finish(lambda buf, _: put_table(buf, 2, refs), None)


def encode_prepare_conf_resp(conf_token: int) -> bytes:
    return finish(lambda buf, _: put_table(buf, 1, [], ((0, 4, conf_token),)), None)


def encode_http_req_call_req(msg: HTTPReqCallReq) -> bytes:
    refs: list[tuple[int, Put, Any]] = [
        (1, put_bytes, msg.src_ip),
        (3, put_string, msg.path),
        (4, put_entries, msg.args),
        (5, put_entries, msg.headers),
    ]
    scalars = ((0, 4, msg.id), (6, 4, msg.conf_token), (2, 1, int(msg.method)))
    return finish(lambda buf, _: put_table(buf, 7, refs, scalars), None)


def _put_stop(buf: bytearray, stop: Stop) -> int:
    refs: list[tuple[int, Put, Any]] = []
    if stop.headers:
        refs.append((1, put_entries, stop.headers))
    if stop.body:
        refs.append((2, put_bytes, stop.body))
    return put_table(buf, 3, refs, ((0, 2, stop.status),))


def _put_rewrite(buf: bytearray, rw: Rewrite) -> int:
    refs: list[tuple[int, Put, Any]] = []
    if rw.path is not None:
        refs.append((0, put_string, rw.path))
    if rw.headers:
        refs.append((1, put_entries, rw.headers))
    if rw.args:
        refs.append((2, put_entries, rw.args))
    if rw.resp_headers:
        refs.append((3, put_entries, rw.resp_headers))
    if rw.body:
        refs.append((4, put_bytes, rw.body))
    return put_table(buf, 5, refs)


def _put_http_req_call_resp(buf: bytearray, msg: HTTPReqCallResp) -> int:
    action = msg.action
    if action is None:
        return put_table(buf, 3, [], ((0, 4, msg.id),))
    put: Put
    if isinstance(action, Stop):
        kind, put = 1, _put_stop
    else:
        kind, put = 2, _put_rewrite
    return put_table(buf, 3, [(2, put, action)], ((0, 4, msg.id), (1, 1, kind)))


def encode_http_req_call_resp(msg: HTTPReqCallResp) -> bytes:
    return finish(_put_http_req_call_resp, msg)


def _put_var(buf: bytearray, name: str) -> int:
    return put_table(buf, 1, [(0, put_string, name)])


def _put_empty_table(buf: bytearray, _: Any) -> int:
    return put_table(buf, 0, [])


def encode_extra_info_req(info: ExtraInfo) -> bytes:
    inner: Put
    if isinstance(info, Var):
        kind, inner, value = 1, _put_var, info.name
    else:
        kind, inner, value = (2 if isinstance(info, ReqBody) else 3), _put_empty_table, None
    return finish(lambda buf, _: put_table(buf, 2, [(1, inner, value)], ((0, 1, kind),)), None)


def encode_extra_info_resp(result: bytes | None) -> bytes:
    refs: list[tuple[int, Put, Any]] = [] if result is None else [(0, put_bytes, result)]
    return finish(lambda buf, _: put_table(buf, 1, refs), None)


def encode_http_resp_call_req(msg: HTTPRespCallReq) -> bytes:
    refs: list[tuple[int, Put, Any]] = [(2, put_entries, msg.headers)]
    scalars = ((0, 4, msg.id), (3, 4, msg.conf_token), (1, 2, msg.status))
    return finish(lambda buf, _: put_table(buf, 4, refs, scalars), None)


def encode_http_resp_call_resp(msg: HTTPRespCallResp) -> bytes:
    refs: list[tuple[int, Put, Any]] = []
    if msg.headers:
        refs.append((2, put_entries, msg.headers))
    if msg.body:
        refs.append((3, put_bytes, msg.body))
    scalars = ((0, 4, msg.id), (1, 2, msg.status))
    return finish(lambda buf, _: put_table(buf, 4, refs, scalars), None)


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
    PACK_U32(out, _NO_ACTION_ID_AT, call_id)
    return bytes(out)
