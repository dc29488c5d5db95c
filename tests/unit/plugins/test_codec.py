"""plugins.runner.codec: every table both ways, framing, hostile buffers, flatc-style interop."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import flatbuffers
import pytest
from flatbuffers import number_types as N
from flatbuffers.table import Table

from plugins.runner import codec
from plugins.runner.codec import (
    MAX_PAYLOAD,
    ErrCode,
    ErrResp,
    ExtraInfoReq,
    ExtraInfoResp,
    FrameTooLarge,
    HTTPReqCallReq,
    HTTPReqCallResp,
    HTTPRespCallReq,
    HTTPRespCallResp,
    Method,
    MsgType,
    PrepareConfReq,
    PrepareConfResp,
    ProtocolError,
    ReqBody,
    RespBody,
    Rewrite,
    Stop,
    Var,
)

INVALID_UTF8 = b"caf\xe9 \xff\xfe".decode("utf-8", "surrogateescape")
NON_ASCII = "José ✓ 日本語 \U0001f600"

# --- round trips ----------------------------------------------------------------------------


def test_prepare_conf_req_round_trip() -> None:
    msg = PrepareConfReq(
        conf=[
            ("deepgate-prompt-filter", '{"max_body_bytes": 1000}'),
            ("deepgate-quota", '{"tokens":"ünïcode"}'),
            ("empty", ""),
        ],
        key="route#routes#1#ext-plugin-pre-req#42",
    )
    assert codec.decode_prepare_conf_req(codec.encode_prepare_conf_req(msg)) == msg


def test_prepare_conf_req_empty_round_trip() -> None:
    msg = PrepareConfReq(conf=[], key="")
    assert codec.decode_prepare_conf_req(codec.encode_prepare_conf_req(msg)) == msg


@pytest.mark.parametrize("token", [0, 1, 12345, 0xFFFFFFFF])
def test_prepare_conf_resp_round_trip(token: int) -> None:
    assert codec.decode_prepare_conf_resp(codec.encode_prepare_conf_resp(token)) == (
        PrepareConfResp(conf_token=token)
    )


@pytest.mark.parametrize("code", list(ErrCode))
def test_err_resp_round_trip(code: ErrCode) -> None:
    assert codec.decode_err_resp(codec.encode_err_resp(code)) == ErrResp(code=code)


def full_call() -> HTTPReqCallReq:
    return HTTPReqCallReq(
        id=987654,
        conf_token=17,
        method=Method.POST,
        path="/v1/chat/completions",
        src_ip=bytes([10, 0, 0, 7]),
        args=[("a", "1"), ("a", "2"), ("flag", None), ("q", NON_ASCII)],
        headers=[
            ("host", "127.0.0.1:9080"),
            ("content-type", "application/json"),
            ("x-multi", "one"),
            ("x-multi", "two"),
            ("x-empty", ""),
            ("x-novalue", None),
            ("x-unicode", NON_ASCII),
            ("x-latin1", INVALID_UTF8),
        ],
    )


def test_http_req_call_req_round_trip() -> None:
    msg = full_call()
    assert codec.decode_http_req_call_req(codec.encode_http_req_call_req(msg)) == msg


@pytest.mark.parametrize("method", list(Method))
def test_http_req_call_req_every_method_and_ipv6(method: Method) -> None:
    msg = HTTPReqCallReq(id=1, conf_token=2, method=method, src_ip=bytes(range(16)))
    back = codec.decode_http_req_call_req(codec.encode_http_req_call_req(msg))
    assert back == msg
    assert back.method == method


def test_http_req_call_resp_with_stop_round_trip() -> None:
    msg = HTTPReqCallResp(
        id=5,
        action=Stop(
            status=413,
            headers=[("content-type", "application/json"), ("retry-after", "3")],
            body=b'{"error": {"message": "too big"}}',
        ),
    )
    assert codec.decode_http_req_call_resp(codec.encode_http_req_call_resp(msg)) == msg


def test_http_req_call_resp_with_empty_stop_round_trip() -> None:
    msg = HTTPReqCallResp(id=5, action=Stop())
    back = codec.decode_http_req_call_resp(codec.encode_http_req_call_resp(msg))
    assert back == msg
    assert isinstance(back.action, Stop)


def test_http_req_call_resp_with_rewrite_round_trip() -> None:
    msg = HTTPReqCallResp(
        id=77,
        action=Rewrite(
            path="/v1/chat/completions",
            headers=[("x-deepgate", "1"), ("x-remove-me", None), ("x-u", NON_ASCII)],
            args=[("stream", "true"), ("drop", None)],
            resp_headers=[("x-ratelimit-remaining", "9"), ("x-raw", INVALID_UTF8)],
            body=b'{"model":"gpt-4o","messages":[]}' + bytes(range(256)),
        ),
    )
    assert codec.decode_http_req_call_resp(codec.encode_http_req_call_resp(msg)) == msg


@pytest.mark.parametrize(
    "rewrite",
    [
        Rewrite(),
        Rewrite(path=""),
        Rewrite(body=b"only a body"),
        Rewrite(resp_headers=[("x-only", "resp")]),
    ],
)
def test_http_req_call_resp_partial_rewrites(rewrite: Rewrite) -> None:
    msg = HTTPReqCallResp(id=1, action=rewrite)
    assert codec.decode_http_req_call_resp(codec.encode_http_req_call_resp(msg)) == msg


def test_rewrite_path_none_and_empty_differ_on_the_wire() -> None:
    none = codec.decode_http_req_call_resp(
        codec.encode_http_req_call_resp(HTTPReqCallResp(id=1, action=Rewrite(path=None)))
    )
    empty = codec.decode_http_req_call_resp(
        codec.encode_http_req_call_resp(HTTPReqCallResp(id=1, action=Rewrite(path="")))
    )
    assert isinstance(none.action, Rewrite)
    assert isinstance(empty.action, Rewrite)
    assert none.action.path is None
    assert empty.action.path == ""


def test_http_req_call_resp_no_action_round_trip() -> None:
    msg = HTTPReqCallResp(id=3)
    assert codec.decode_http_req_call_resp(codec.encode_http_req_call_resp(msg)) == msg


@pytest.mark.parametrize(
    "info", [Var("consumer_name"), Var(""), Var(NON_ASCII), ReqBody(), RespBody()]
)
def test_extra_info_req_round_trip(info: Any) -> None:
    assert codec.decode_extra_info_req(codec.encode_extra_info_req(info)) == ExtraInfoReq(info)


@pytest.mark.parametrize("result", [b'{"model":"x"}', bytes(range(256)) * 3, b"", None])
def test_extra_info_resp_round_trip(result: bytes | None) -> None:
    back = codec.decode_extra_info_resp(codec.encode_extra_info_resp(result))
    assert back == ExtraInfoResp(result=result)


def test_extra_info_resp_absent_and_empty_differ() -> None:
    assert codec.decode_extra_info_resp(codec.encode_extra_info_resp(None)).result is None
    assert codec.decode_extra_info_resp(codec.encode_extra_info_resp(b"")).result == b""


def test_http_resp_call_req_round_trip() -> None:
    msg = HTTPRespCallReq(
        id=11,
        conf_token=4,
        status=502,
        headers=[("content-type", "text/event-stream"), ("x-none", None), ("x-b", INVALID_UTF8)],
    )
    assert codec.decode_http_resp_call_req(codec.encode_http_resp_call_req(msg)) == msg


@pytest.mark.parametrize(
    "msg",
    [
        HTTPRespCallResp(id=11, status=200, headers=[("x-a", "1")], body=b"new body"),
        HTTPRespCallResp(id=12),
        HTTPRespCallResp(id=0, status=0, headers=[("x-only", NON_ASCII)]),
    ],
)
def test_http_resp_call_resp_round_trip(msg: HTTPRespCallResp) -> None:
    assert codec.decode_http_resp_call_resp(codec.encode_http_resp_call_resp(msg)) == msg


def test_invalid_utf8_goes_back_out_byte_for_byte() -> None:
    raw = b"caf\xe9 \xff\xfe"
    buf = codec.encode_http_req_call_req(
        HTTPReqCallReq(id=1, conf_token=1, headers=[("x", INVALID_UTF8)])
    )
    assert raw in buf  # the header's original bytes are on the wire again
    assert codec.decode_http_req_call_req(buf).headers == [("x", INVALID_UTF8)]


def test_raw_header_bytes_from_the_wire_survive_decode_and_reencode() -> None:
    # A header value of raw latin-1 bytes, as nginx passes them through.
    b = flatbuffers.Builder(0)
    value = b.CreateByteVector(b"caf\xe9")  # a string's layout, without the trailing NUL
    name = b.CreateString("x-latin1")
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(1, value, 0)
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    entry = b.EndObject()
    b.StartVector(4, 1, 4)
    b.PrependUOffsetTRelative(entry)
    vec = b.EndVector()
    b.StartObject(7)
    b.PrependUOffsetTRelativeSlot(5, vec, 0)
    b.Finish(b.EndObject())
    call = codec.decode_http_req_call_req(bytes(b.Output()))
    assert call.headers == [("x-latin1", "caf\udce9")]
    again = codec.encode_http_resp_call_resp(HTTPRespCallResp(id=0, headers=call.headers))
    assert b"caf\xe9" in again


# --- id 0 (APISIX's first call of a worker carries no id field) ------------------------------


def root_table(buf: bytes) -> Table:
    return Table(buf, flatbuffers.encode.Get(N.UOffsetTFlags.packer_type, buf, 0))


def test_id_zero_is_absent_on_the_wire_and_decodes_as_zero() -> None:
    buf = codec.encode_http_req_call_req(HTTPReqCallReq(id=0, conf_token=5))
    assert root_table(buf).Offset(4) == 0  # slot 0 not written
    assert codec.decode_http_req_call_req(buf).id == 0
    resp = codec.encode_http_req_call_resp(HTTPReqCallResp(id=0))
    assert root_table(resp).Offset(4) == 0
    assert codec.decode_http_req_call_resp(resp).id == 0


def test_hand_built_call_without_id_decodes_as_zero() -> None:
    b = flatbuffers.Builder(64)
    path = b.CreateString("/v1/messages")
    b.StartObject(7)
    b.PrependUint8Slot(2, Method.POST, 0)
    b.PrependUOffsetTRelativeSlot(3, path, 0)
    b.PrependUint32Slot(6, 9, 0)
    b.Finish(b.EndObject())
    call = codec.decode_http_req_call_req(bytes(b.Output()))
    assert call == HTTPReqCallReq(id=0, conf_token=9, method=Method.POST, path="/v1/messages")


# --- framing --------------------------------------------------------------------------------


def test_frame_layout_is_type_then_big_endian_length() -> None:
    assert codec.frame(MsgType.RPC_HTTP_REQ_CALL, b"abc") == b"\x02\x00\x00\x03abc"
    assert codec.frame(MsgType.RPC_ERROR, b"") == b"\x00\x00\x00\x00"
    payload = bytes(0x012345)
    framed = codec.frame(MsgType.RPC_EXTRA_INFO, payload)
    assert framed[:4] == b"\x03\x01\x23\x45"
    assert framed[4:] == payload


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        (b"\x00\x00\x00\x00", (0, 0)),
        (b"\x01\x00\x00\x10", (1, 16)),
        (b"\x02\x01\x02\x03", (2, 0x010203)),
        (b"\x04\xff\xff\xff", (4, 0xFFFFFF)),
    ],
)
def test_parse_header(header: bytes, parsed: tuple[int, int]) -> None:
    assert codec.parse_header(header) == parsed


def test_frame_and_parse_header_agree() -> None:
    for t in MsgType:
        for n in (0, 1, 255, 256, 65535, 65536, 100_000):
            assert codec.parse_header(codec.frame(t, bytes(n))[:4]) == (t, n)


def test_largest_payload_frames_and_one_more_byte_does_not() -> None:
    assert MAX_PAYLOAD == 2**24 - 1
    payload = bytes(MAX_PAYLOAD)
    framed = codec.frame(MsgType.RPC_HTTP_REQ_CALL, payload)
    assert len(framed) == MAX_PAYLOAD + 4
    assert codec.parse_header(framed[:4]) == (2, MAX_PAYLOAD)
    del framed, payload
    with pytest.raises(FrameTooLarge):
        codec.frame(MsgType.RPC_HTTP_REQ_CALL, bytes(2**24))


def test_frame_too_large_is_a_protocol_error() -> None:
    assert issubclass(FrameTooLarge, ProtocolError)


# --- robustness -----------------------------------------------------------------------------

DECODERS: dict[str, Callable[[bytes], object]] = {
    "prepare_conf_req": codec.decode_prepare_conf_req,
    "prepare_conf_resp": codec.decode_prepare_conf_resp,
    "err_resp": codec.decode_err_resp,
    "http_req_call_req": codec.decode_http_req_call_req,
    "http_req_call_resp": codec.decode_http_req_call_resp,
    "extra_info_req": codec.decode_extra_info_req,
    "extra_info_resp": codec.decode_extra_info_resp,
    "http_resp_call_req": codec.decode_http_resp_call_req,
    "http_resp_call_resp": codec.decode_http_resp_call_resp,
}

SAMPLES: dict[str, bytes] = {
    "prepare_conf_req": codec.encode_prepare_conf_req(
        PrepareConfReq(conf=[("p", '{"a":1}'), ("q", "{}")], key="route#1")
    ),
    "prepare_conf_resp": codec.encode_prepare_conf_resp(7),
    "err_resp": codec.encode_err_resp(ErrCode.CONF_TOKEN_NOT_FOUND),
    "http_req_call_req": codec.encode_http_req_call_req(full_call()),
    "http_req_call_resp": codec.encode_http_req_call_resp(
        HTTPReqCallResp(
            id=3,
            action=Rewrite(
                path="/p",
                headers=[("a", "b")],
                args=[("c", None)],
                resp_headers=[("d", "e")],
                body=b"xyz",
            ),
        )
    ),
    "extra_info_req": codec.encode_extra_info_req(Var("request_id")),
    "extra_info_resp": codec.encode_extra_info_resp(b"hello body"),
    "http_resp_call_req": codec.encode_http_resp_call_req(
        HTTPRespCallReq(id=1, conf_token=2, status=200, headers=[("a", "b"), ("c", None)])
    ),
    "http_resp_call_resp": codec.encode_http_resp_call_resp(
        HTTPRespCallResp(id=1, status=201, headers=[("a", "b")], body=b"body")
    ),
}
SAMPLES["http_req_call_resp_stop"] = codec.encode_http_req_call_resp(
    HTTPReqCallResp(id=3, action=Stop(status=403, headers=[("x", "y")], body=b"no"))
)
DECODERS["http_req_call_resp_stop"] = codec.decode_http_req_call_resp


def decode_or_protocol_error(decode: Callable[[bytes], object], payload: bytes) -> object | None:
    """Decode; a ProtocolError is fine, any other exception fails the test."""
    try:
        return decode(payload)
    except ProtocolError:
        return None


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_truncation_raises_protocol_error(name: str) -> None:
    payload, decode = SAMPLES[name], DECODERS[name]
    whole = decode(payload)
    refused = 0
    for n in range(len(payload)):
        got = decode_or_protocol_error(decode, payload[:n])
        if got is None:
            refused += 1
        else:
            # Only trailing padding (a string's NUL, alignment) can go without losing anything.
            assert n >= len(payload) - 3
            assert got == whole
    assert refused >= len(payload) - 3


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_random_bytes_raise_only_protocol_error(name: str) -> None:
    rng = random.Random(20240601)
    decode = DECODERS[name]
    for _ in range(1500):
        payload = rng.randbytes(rng.randint(0, 48))
        decode_or_protocol_error(decode, payload)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_mutated_valid_buffers_raise_only_protocol_error(name: str) -> None:
    rng = random.Random(7)
    payload, decode = SAMPLES[name], DECODERS[name]
    for _ in range(1500):
        buf = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        decode_or_protocol_error(decode, bytes(buf))


def le32(*values: int) -> bytes:
    return b"".join(struct.pack("<I", v & 0xFFFFFFFF) for v in values)


def le16(*values: int) -> bytes:
    return b"".join(struct.pack("<H", v) for v in values)


def one_offset_table(target_rel: int, tail: bytes = b"") -> bytes:
    """A root table whose slot 0 is an offset field holding ``target_rel`` (relative), then tail.

    Layout: [0] root uoffset=12 | [4] vtable (len 6, tsize 8, slot0 at +4) + pad
            | [12] soffset to vtable (8) | [16] uoffset field | [20] tail
    """
    return le32(12) + le16(6, 8, 4) + b"\0\0" + le32(8) + le32(target_rel) + tail


@pytest.mark.parametrize("count", [2**31, 2**32 - 1, 1000])
def test_vector_claiming_huge_count_is_refused(count: int) -> None:
    # slot 0 of HTTPRespCall.Resp is a uint32 id, so use ExtraInfo.Resp ([ubyte] in slot 0)
    # and PrepareConf.Req ([TextEntry] in slot 0).
    buf = one_offset_table(4, le32(count) + b"abcd")
    with pytest.raises(ProtocolError):
        codec.decode_extra_info_resp(buf)
    with pytest.raises(ProtocolError):
        codec.decode_prepare_conf_req(buf)


@pytest.mark.parametrize(
    "payload",
    [
        le32(0xFFFFFFF0) + bytes(12),  # root offset far outside
        le32(4) + le32(0x7FFFFFFF) + bytes(8),  # vtable before the buffer start
        le32(4) + le32(0x80000000) + bytes(8),  # vtable after the end (negative soffset)
        le32(8) + le16(5, 4) + le32(4),  # odd vtable length
        le32(8) + le16(2, 4) + le32(4),  # vtable shorter than its header
        le32(8) + le16(200, 4) + le32(4),  # vtable longer than the buffer
        le32(8) + le16(4, 0xFFFF) + le32(4),  # table size past the end
        le32(12) + le16(6, 8, 0xFFF0) + b"\0\0" + le32(8) + le32(0),  # field past the end
    ],
)
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_hostile_root_table_raises_protocol_error(payload: bytes, name: str) -> None:
    with pytest.raises(ProtocolError):
        DECODERS[name](payload)


@pytest.mark.parametrize("target", [0xFFFFFFF0, 0x7FFFFFFF, 8, 5])
@pytest.mark.parametrize("decode", [codec.decode_extra_info_resp, codec.decode_prepare_conf_req])
def test_child_offset_past_the_end_raises_protocol_error(
    target: int, decode: Callable[[bytes], object]
) -> None:
    # slot 0 is [ubyte] / [TextEntry]: the offset leads outside the 23-byte buffer.
    buf = one_offset_table(target, b"\xff\xff\xff")
    with pytest.raises(ProtocolError):
        decode(buf)


def test_table_vector_elements_pointing_outside_are_refused() -> None:
    # [TextEntry] of one element whose offset points far past the end.
    buf = one_offset_table(4, le32(1) + le32(0x10000))
    with pytest.raises(ProtocolError):
        codec.decode_prepare_conf_req(buf)


@pytest.mark.parametrize("size", range(8))
def test_payloads_too_short_for_a_table(size: int) -> None:
    for decode in DECODERS.values():
        with pytest.raises(ProtocolError):
            decode(bytes(size))


def test_unknown_err_code_is_refused() -> None:
    b = flatbuffers.Builder(16)
    b.StartObject(1)
    b.PrependUint8Slot(0, 9, 0)
    b.Finish(b.EndObject())
    with pytest.raises(ProtocolError, match="unknown error code 9"):
        codec.decode_err_resp(bytes(b.Output()))


def union_table(kind: int, with_inner: bool, type_slot: int, slots: int) -> bytes:
    b = flatbuffers.Builder(32)
    b.StartObject(0)
    inner = b.EndObject()
    b.StartObject(slots)
    b.PrependUint8Slot(type_slot, kind, 0)
    if with_inner:
        b.PrependUOffsetTRelativeSlot(type_slot + 1, inner, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


@pytest.mark.parametrize(("kind", "with_inner"), [(3, True), (255, True), (1, False), (2, False)])
def test_bad_action_union_is_refused(kind: int, with_inner: bool) -> None:
    with pytest.raises(ProtocolError):
        codec.decode_http_req_call_resp(union_table(kind, with_inner, 1, 3))


@pytest.mark.parametrize(("kind", "with_inner"), [(0, False), (0, True), (4, True), (1, False)])
def test_bad_extra_info_union_is_refused(kind: int, with_inner: bool) -> None:
    with pytest.raises(ProtocolError):
        codec.decode_extra_info_req(union_table(kind, with_inner, 0, 2))


def test_shared_data_cannot_multiply_into_a_huge_allocation() -> None:
    # FlatBuffers lets many offsets point at one object. A small frame whose header vector
    # repeats one entry with a long value must not decode into orders of magnitude more memory
    # than it carries (a 16 MiB frame built this way would decode into terabytes).
    b = flatbuffers.Builder(1 << 16)
    value = b.CreateString("v" * 16384)
    name = b.CreateString("x-h")
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    b.PrependUOffsetTRelativeSlot(1, value, 0)
    entry = b.EndObject()
    count = 1024
    b.StartVector(4, count, 4)
    for _ in range(count):
        b.PrependUOffsetTRelative(entry)
    headers = b.EndVector()
    b.StartObject(7)
    b.PrependUOffsetTRelativeSlot(5, headers, 0)
    b.Finish(b.EndObject())
    payload = bytes(b.Output())
    assert len(payload) < 24_000
    try:
        call = codec.decode_http_req_call_req(payload)
    except ProtocolError:
        return
    amplification = sum(len(n) + len(v or "") for n, v in call.headers) // len(payload)
    assert amplification <= 4


# --- interop with buffers laid out by the official Builder -----------------------------------


def build_entries(b: flatbuffers.Builder, pairs: list[tuple[str, str | None]], shared: bool) -> int:
    make = b.CreateSharedString if shared else b.CreateString
    tables = []
    for name, value in pairs:
        n = make(name)
        v = make(value) if value is not None else None
        b.StartObject(2)
        if v is not None:  # value first: field order inside a table must not matter
            b.PrependUOffsetTRelativeSlot(1, v, 0)
        b.PrependUOffsetTRelativeSlot(0, n, 0)
        tables.append(b.EndObject())
    b.StartVector(4, len(tables), 4)
    for t in reversed(tables):
        b.PrependUOffsetTRelative(t)
    return int(b.EndVector())


def test_interop_http_req_call_req_built_by_hand() -> None:
    b = flatbuffers.Builder(0)
    b.ForceDefaults(True)  # id 0 written explicitly, as some builders do
    headers = build_entries(
        b, [("host", "api.example"), ("x-dup", "1"), ("x-dup", "1"), ("x-flag", None)], shared=True
    )
    args = build_entries(b, [("q", "ü"), ("flag", None)], shared=False)
    path = b.CreateString("/v1/chat/completions")
    ip = b.CreateByteVector(bytes.fromhex("20010db8000000000000000000000001"))
    b.StartObject(7)
    # slots in reverse order, unlike our encoder
    b.PrependUint32Slot(6, 4242, 0)
    b.PrependUOffsetTRelativeSlot(5, headers, 0)
    b.PrependUOffsetTRelativeSlot(4, args, 0)
    b.PrependUOffsetTRelativeSlot(3, path, 0)
    b.PrependUint8Slot(2, Method.PATCH, 0)
    b.PrependUOffsetTRelativeSlot(1, ip, 0)
    b.PrependUint32Slot(0, 0, 0)
    b.Finish(b.EndObject())
    buf = bytes(b.Output())
    assert root_table(buf).Offset(4) != 0  # id present on the wire, holding 0

    assert codec.decode_http_req_call_req(buf) == HTTPReqCallReq(
        id=0,
        conf_token=4242,
        method=Method.PATCH,
        path="/v1/chat/completions",
        src_ip=bytes.fromhex("20010db8000000000000000000000001"),
        args=[("q", "ü"), ("flag", None)],
        headers=[("host", "api.example"), ("x-dup", "1"), ("x-dup", "1"), ("x-flag", None)],
    )


def test_interop_rewrite_reply_built_by_hand() -> None:
    b = flatbuffers.Builder(0)
    body = b.CreateByteVector(b'{"messages":[]}')
    resp_headers = build_entries(b, [("x-deepgate-rule", "none")], shared=False)
    headers = build_entries(b, [("authorization", None)], shared=False)
    path = b.CreateString("/upstream/v1/chat")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(4, body, 0)
    b.PrependUOffsetTRelativeSlot(3, resp_headers, 0)
    b.PrependUOffsetTRelativeSlot(1, headers, 0)
    b.PrependUOffsetTRelativeSlot(0, path, 0)
    rewrite = b.EndObject()
    b.StartObject(3)
    b.PrependUOffsetTRelativeSlot(2, rewrite, 0)
    b.PrependUint8Slot(1, 2, 0)
    b.PrependUint32Slot(0, 31, 0)
    b.Finish(b.EndObject())

    assert codec.decode_http_req_call_resp(bytes(b.Output())) == HTTPReqCallResp(
        id=31,
        action=Rewrite(
            path="/upstream/v1/chat",
            headers=[("authorization", None)],
            args=[],
            resp_headers=[("x-deepgate-rule", "none")],
            body=b'{"messages":[]}',
        ),
    )


def test_interop_extra_info_and_prepare_conf_built_by_hand() -> None:
    b = flatbuffers.Builder(0)
    name = b.CreateString("consumer_name")
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    var = b.EndObject()
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(1, var, 0)
    b.PrependUint8Slot(0, 1, 0)
    b.Finish(b.EndObject())
    assert codec.decode_extra_info_req(bytes(b.Output())) == ExtraInfoReq(Var("consumer_name"))

    b = flatbuffers.Builder(0)
    key = b.CreateString("route#routes#7#ext-plugin-pre-req#3")
    conf = build_entries(b, [("deepgate-prompt-filter", '{"normalize":true}')], shared=False)
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(1, key, 0)
    b.PrependUOffsetTRelativeSlot(0, conf, 0)
    b.Finish(b.EndObject())
    assert codec.decode_prepare_conf_req(bytes(b.Output())) == PrepareConfReq(
        conf=[("deepgate-prompt-filter", '{"normalize":true}')],
        key="route#routes#7#ext-plugin-pre-req#3",
    )


def test_our_encoding_reads_back_with_the_official_table_api() -> None:
    buf = codec.encode_http_req_call_resp(
        HTTPReqCallResp(
            id=99, action=Stop(status=429, headers=[("retry-after", "3")], body=b"slow down")
        )
    )
    root = root_table(buf)
    assert root.GetSlot(4, 0, N.Uint32Flags) == 99
    assert root.GetSlot(6, 0, N.Uint8Flags) == 1  # action type Stop
    stop = Table(buf, 0)
    root.Union(stop, root.Offset(8))
    assert stop.GetSlot(4, 0, N.Uint16Flags) == 429
    body_off = stop.Offset(8)
    start, n = stop.Vector(body_off), stop.VectorLen(body_off)
    assert buf[start : start + n] == b"slow down"
    headers_off = stop.Offset(6)
    assert stop.VectorLen(headers_off) == 1
    entry = Table(buf, stop.Indirect(stop.Vector(headers_off)))
    assert entry.String(entry.Offset(4) + entry.Pos) == b"retry-after"
    assert entry.String(entry.Offset(6) + entry.Pos) == b"3"


@pytest.mark.parametrize("call_id", [0, 1, 0xA6A6A6A6, 0xFFFFFFFF])
def test_prebuilt_no_action_reply_decodes_like_the_built_one(call_id: int) -> None:
    framed = codec.no_action_frame(call_id)
    msg_type, size = codec.parse_header(framed[:4])
    assert (msg_type, size) == (codec.MsgType.RPC_HTTP_REQ_CALL, len(framed) - 4)
    assert codec.decode_http_req_call_resp(framed[4:]) == codec.HTTPReqCallResp(id=call_id)
