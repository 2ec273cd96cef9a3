"""A lean reader for the per-frame functional groups of Enhanced multi-frame files.

pydicom builds a Dataset for every item of every nested sequence: for a Philips Enhanced MR
(thousands of elements per file, mostly private) that is most of the load time. This walker
reads little-endian DICOM bytes directly, descends only into the functional-group macros that
geometry and rescale need, and skips everything else (defined lengths by seeking, undefined
lengths by walking their items). It also finds the Pixel Data element after the groups, so the
file's header is read once. Anything it does not understand raises :class:`GroupsError` and the
caller falls back to pydicom.
"""

from __future__ import annotations

import struct
from typing import Any

from ..errors import GroupsError

PER_FRAME_GROUPS = 0x52009230
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # float, double float, integer pixel data
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

# macro sequence -> {element tag: (keyword, VR)} kept from its first item
MACROS: dict[int, tuple[str, dict[int, tuple[str, str]]]] = {
    0x00209111: (
        "FrameContentSequence",
        {
            0x00209157: ("DimensionIndexValues", "UL"),
            0x00209128: ("TemporalPositionIndex", "UL"),
        },
    ),
    0x00209113: ("PlanePositionSequence", {0x00200032: ("ImagePositionPatient", "DS")}),
    0x00209116: ("PlaneOrientationSequence", {0x00200037: ("ImageOrientationPatient", "DS")}),
    0x00289110: (
        "PixelMeasuresSequence",
        {
            0x00280030: ("PixelSpacing", "DS"),
            0x00180088: ("SpacingBetweenSlices", "DS"),
            0x00180050: ("SliceThickness", "DS"),
        },
    ),
    0x00289145: (
        "PixelValueTransformationSequence",
        {
            0x00281053: ("RescaleSlope", "DS"),
            0x00281052: ("RescaleIntercept", "DS"),
        },
    ),
}
_HEAD = struct.Struct("<HHI")  # group, element, 32-bit length (implicit VR)
_EXPLICIT = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_U32 = struct.Struct("<I")


def _value(buf: Any, raw: tuple[int, int, bytes | None], vr: str) -> Any:
    vpos, length, _ = raw
    data = bytes(buf[vpos : vpos + length])
    if vr == "UL":
        n = length // 4
        values = list(struct.unpack_from(f"<{n}I", data)) if n else []
        return values[0] if n == 1 else values
    text = data.decode("ascii", "replace").strip("\x00 ")
    parts = [p.strip() for p in text.split("\\")]
    if not text:
        return None
    return parts[0] if len(parts) == 1 else parts


def read_frame_groups(buf: Any, pos: int, implicit: bool) -> tuple[list[dict[str, dict[str, Any]]], int]:
    """The per-frame functional groups starting at ``pos`` (the (5200,9230) element): one dict per
    frame, ``{macro keyword: {element keyword: value}}`` for the macros in :data:`MACROS`, and
    the position after the sequence.

    One flat pass over the elements (a stack of open sequences and items, no recursion and no
    objects per element): most of the bytes are private sequences of undefined length, which
    can only be skipped by walking them.
    """
    raw, end = _walk_groups(buf, pos, implicit)
    frames: list[dict[str, dict[str, Any]]] = []
    for found in raw:
        frame: dict[str, dict[str, Any]] = {}
        for (seq_tag, elem_tag), value in found.items():
            keyword, elements = MACROS[seq_tag]
            name, vr = elements[elem_tag]
            frame.setdefault(keyword, {})[name] = _value(buf, value, vr)
        frames.append(frame)
    return frames, end


def _walk_groups(buf: Any, pos: int, implicit: bool) -> tuple[list[dict[tuple[int, int], Any]], int]:
    """Raw (offset, length, VR) of every wanted element, per frame item, and the end position.

    Stack depths: 1 inside the per-frame sequence, 2 inside a frame item, 3 inside a macro
    sequence, 4 inside a macro's item (where the wanted values are).
    """
    size = len(buf)
    explicit_unpack, head_unpack, u32 = _EXPLICIT.unpack_from, _HEAD.unpack_from, _U32.unpack_from

    def header(at: int) -> tuple[int, bytes | None, int, int]:
        if at + 8 > size:
            raise GroupsError("the file ends inside the per-frame functional groups")
        group, elem, vr, short = explicit_unpack(buf, at)
        if implicit or group == 0xFFFE:
            return group << 16 | elem, None, head_unpack(buf, at)[2], at + 8
        if vr in _LONG_VRS:
            return group << 16 | elem, vr, u32(buf, at + 8)[0], at + 12
        if not (b"AA" <= vr <= b"ZZ"):
            raise GroupsError("VR switch inside a sequence")
        return group << 16 | elem, vr, short, at + 8

    tag, vr, length, pos = header(pos)
    if tag != PER_FRAME_GROUPS:
        raise GroupsError("not at the per-frame functional groups")
    frames: list[dict[tuple[int, int], Any]] = []
    if length == 0:
        return frames, pos
    stack: list[list[int]] = [[-1 if length == UNDEFINED else pos + length, tag, 0]]  # [end or -1, tag, items]
    while stack:
        top = stack[-1]
        if top[0] != -1 and pos >= top[0]:
            stack.pop()  # a container of defined length ends here
            continue
        tag, vr, length, vpos = header(pos)
        depth = len(stack)
        if tag == ITEM:
            top[2] += 1
            if depth == 1:
                frames.append({})
            elif depth == 3 and (top[1] not in MACROS or top[2] > 1) and length != UNDEFINED:
                pos = vpos + length  # only a macro's first item is read
                continue
            stack.append([-1 if length == UNDEFINED else vpos + length, tag, 0])
            pos = vpos
            continue
        if tag == ITEM_END or tag == SEQ_END:
            stack.pop()
            pos = vpos
            continue
        if vr == b"SQ" or (vr is None and (length == UNDEFINED or (depth == 2 and tag in MACROS))):
            if length != UNDEFINED and not (depth == 2 and tag in MACROS):
                pos = vpos + length
                continue
            stack.append([-1 if length == UNDEFINED else vpos + length, tag, 0])
            pos = vpos
            continue
        if length == UNDEFINED:
            raise GroupsError(f"undefined length on a {vr!r} element")
        if depth == 4 and stack[-2][2] == 1:
            seq_tag = stack[-2][1]
            if seq_tag in MACROS and tag in MACROS[seq_tag][1]:
                frames[-1][(seq_tag, tag)] = (vpos, length, vr)
        pos = vpos + length
    return frames, pos


def find_pixel_data(buf: Any, pos: int, implicit: bool) -> tuple[int, int, bytes | None, int] | None:
    """(tag, value offset, VR, declared length) of the first pixel data element at or after
    ``pos`` at the top level; None when the file has none."""
    size = len(buf)
    depth = 0
    while pos + 8 <= size:
        tag, vr, length, vpos = _header(buf, pos, implicit)
        if depth == 0 and tag in PIXEL_TAGS:
            return tag, vpos, vr, length
        if tag == ITEM_END or tag == SEQ_END:
            depth -= 1
            pos = vpos
        elif length == UNDEFINED and (tag == ITEM or vr in (None, b"SQ")):
            depth += 1  # walked: its end is only found by its delimiter
            pos = vpos
        elif length == UNDEFINED:
            raise GroupsError(f"undefined length on a {vr!r} element")
        else:
            pos = vpos + length
        if depth < 0:
            raise GroupsError("a delimiter outside a sequence")
    return None


def _header(buf: Any, at: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    if at + 8 > len(buf):
        raise GroupsError("the file ends inside an element")
    group, elem, vr, short = _EXPLICIT.unpack_from(buf, at)
    if implicit or group == 0xFFFE:
        return group << 16 | elem, None, _HEAD.unpack_from(buf, at)[2], at + 8
    if vr in _LONG_VRS:
        return group << 16 | elem, vr, _U32.unpack_from(buf, at + 8)[0], at + 12
    if not (b"AA" <= vr <= b"ZZ"):
        raise GroupsError("VR switch inside a sequence")
    return group << 16 | elem, vr, short, at + 8
