"""FlatBuffers tables by hand: a bounds-checked reader and a forward writer.

The protocol's messages (``codec``) are built from these two pieces. The reader walks a table
inside ``bytes`` and checks every offset, so a hostile or truncated buffer raises
``ProtocolError`` instead of reading out of range or allocating without limit. The writer appends
objects to a ``bytearray`` and costs a few microseconds per reply, where the generic
``flatbuffers`` Builder makes hundreds of Python calls.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any


class ProtocolError(Exception):
    """A frame or buffer that does not follow the protocol."""


Entries = list[tuple[str, str | None]]
"""Name/value pairs in wire order; a value of ``None`` is an entry without value."""


# --- reading --------------------------------------------------------------------------------

_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U16x2 = struct.Struct("<HH").unpack_from


class Table:
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

    def table(self, slot: int) -> Table | None:
        t = self._target(slot)
        return None if t < 0 else Table(self._buf, t, self._budget)

    def entries(self, slot: int) -> Entries:
        """A vector of TextEntry tables, walked inline (the hot path: every call's headers)
        with the same checks as ``Table`` and ``string``."""
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


def root(payload: bytes) -> Table:
    if len(payload) < 8:
        raise ProtocolError("payload too short to hold a table")
    # Legitimate buffers copy out less than their own size; allow sharing, never amplification.
    return Table(payload, _U32(payload, 0)[0], [2 * len(payload) + 4096])


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
PACK_U32 = struct.Struct("<I").pack_into
_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0", b"\0\0\0\0")
# Entry vtables: (vtable size 8, table size 12, name at 4, value at 8); (6, 8, name at 4) + pad.
_ENTRY_VTABLES = struct.pack("<HHHHHHHxx", 8, 12, 4, 8, 6, 8, 4)

Put = Callable[[bytearray, Any], int]
"""Appends one object to the buffer and returns where it starts."""


def put_string(buf: bytearray, s: str) -> int:
    # nginx passes header bytes through as they came: surrogateescape gives them back unchanged.
    data = s.encode("utf-8", "surrogateescape")
    pos = len(buf)
    n = len(data)
    buf += _P_U32(n)
    buf += data
    buf += _ZEROS[4 - (n & 3)]  # the terminating NUL, then padding to 4
    return pos


def put_bytes(buf: bytearray, data: bytes) -> int:
    pos = len(buf)
    n = len(data)
    buf += _P_U32(n)
    buf += data
    buf += _ZEROS[-n & 3]
    return pos


def put_entries(buf: bytearray, pairs: Entries) -> int:
    """A vector of TextEntry tables."""
    vtables = len(buf)
    buf += _ENTRY_VTABLES
    vec = len(buf)
    buf += _P_U32(len(pairs))
    buf += bytes(4 * len(pairs))
    slot = vec + 4
    for name, value in pairs:
        t = len(buf)
        PACK_U32(buf, slot, t - slot)
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


def put_table(
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
        PACK_U32(buf, field_at, put(buf, value) - field_at)
    return t


def finish(put: Put, value: Any) -> bytes:
    buf = bytearray(4)  # the root offset, filled in last
    PACK_U32(buf, 0, put(buf, value))
    return bytes(buf)
