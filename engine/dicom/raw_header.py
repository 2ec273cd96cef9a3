"""The raw-element header reader used at discovery: plain little-endian DICOM headers read
element by element from the file's bytes, without pydicom's parse.

It exists for speed. :func:`_lean_partial` makes one pass over the header bytes and holds the
same raw elements ``read_partial`` would, without pydicom's per-element overhead;
:class:`Header` converts the plain values discovery reads straight from those bytes, once each.
Whatever this reader does not follow (big-endian or deflated data, undefined lengths, unusual
values) goes to pydicom.
"""

from __future__ import annotations

import functools
import re
import struct
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag

from .groups import PER_FRAME_GROUPS, PIXEL_TAGS

# --------------------------------------------------------------------------- header values

_MISSING = object()
_FAST_VRS = frozenset(("US", "UL", "IS", "DS", "CS", "SH", "LO", "UI", "AS", "DA", "TM"))
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


@functools.lru_cache(maxsize=None)
def _tag_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag, dictionary_VR(tag)


class Header:
    """The header values discovery reads, each converted once.

    Plain values (numbers, UIDs, codes, single ASCII strings) are converted from the raw bytes
    read by :func:`read_partial` as pydicom would convert them; anything else (sequences,
    person names, other character sets, several text values, unusual VRs, big-endian data)
    goes through pydicom. pydicom's own conversion costs several times the parse of the element.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self._values: dict[str, Any] = {}

    def __contains__(self, keyword: str) -> bool:
        return _tag_vr(keyword)[0] in self.ds._dict

    def get(self, keyword: str, default: Any = None) -> Any:
        value = self._values.get(keyword, _MISSING)
        if value is _MISSING:
            value = self._values[keyword] = self._read(keyword)
        return default if value is _MISSING else value

    def raw(self, keyword: str) -> Any:
        """The element's bytes as stored (None when converted already or absent): a cheap key."""
        elem = self.ds._dict.get(_tag_vr(keyword)[0])
        return elem.value if isinstance(elem, RawDataElement) else None

    def _read(self, keyword: str) -> Any:
        tag, vr = _tag_vr(keyword)
        elem = self.ds._dict.get(tag)
        if elem is None:
            return _MISSING
        if isinstance(elem, RawDataElement):
            value = _fast_value(elem, vr)
            if value is not _MISSING:
                return value
        return self.ds.get(keyword, _MISSING)


def _fast_value(elem: RawDataElement, vr: str) -> Any:
    """pydicom's value for a raw element when it is one of the plain cases, else _MISSING."""
    raw = elem.value
    if elem.VR not in (None, vr) or vr not in _FAST_VRS or not elem.is_little_endian or not raw:
        return _MISSING
    if vr == "US":
        return int.from_bytes(raw, "little") if len(raw) == 2 else _MISSING
    if vr == "UL":
        return int.from_bytes(raw, "little") if len(raw) == 4 else _MISSING
    if not raw.isascii() or b"\x1b" in raw:
        return _MISSING
    text = raw.decode("ascii")
    if vr == "DS":
        parts = [p.strip() for p in text.split("\\")]
        if not all(_NUMBER.fullmatch(p) for p in parts):
            return _MISSING
        return float(parts[0]) if len(parts) == 1 else [float(p) for p in parts]
    if "\\" in text:
        return _MISSING
    if vr == "IS":
        text = text.strip()
        return int(text) if _INTEGER.fullmatch(text) else _MISSING
    return text.rstrip(" \x00")


# --------------------------------------------------------------------------- raw-element reader

_STOP_TAGS = frozenset((PER_FRAME_GROUPS, *PIXEL_TAGS))


def _stop(tag: Any, vr: Any, length: Any) -> bool:
    """pydicom stops at the per-frame groups (read by :mod:`.groups`) or the pixel data.
    (Called for every element: compared as a plain int, BaseTag's own __eq__ is slow.)"""
    return int(tag) in _STOP_TAGS


# Header bytes the lean reader reads, growing: most classic MR headers fit the first read (and a
# zip member is decompressed only as far as it is read), vendor private elements can need more;
# a header that fits none goes to pydicom.
LEAN_READS = (16 * 1024, 256 * 1024, 4 * 1024 * 1024)
_ELEMENT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHI")
_U32 = struct.Struct("<I")
_LONG_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"))
_LEAN_SYNTAXES = frozenset(
    (
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
    )
)


def _lean_partial(fh: Any) -> Dataset | None:
    """What ``read_partial(fh, stop_when=_stop)`` returns for a plain little-endian file, without
    pydicom's per-element overhead: the same raw elements, the file left at the element that
    stopped the read. None (file position undefined) for anything else: a missing preamble,
    a command set, big-endian or deflated data, undefined lengths, a VR switch, a short file."""
    head = b""
    for size in LEAN_READS:
        head += fh.read(size - len(head))
        ds = _lean_dataset(fh, head)
        if ds is not None or len(head) < size:
            return ds  # parsed, or the whole file was there and pydicom must read it
    return None


def _lean_dataset(fh: Any, head: bytes) -> Dataset | None:
    """The dataset when its header lies within ``head`` (the file's first bytes)."""
    if len(head) < 144 or head[128:132] != b"DICM":
        return None
    meta, pos = _lean_elements(head, 132, False, group=2)
    if meta is None or 0x00020010 not in meta:
        return None
    file_meta = FileMetaDataset(meta)
    file_meta.set_original_encoding(False, True, "iso8859")
    ts = str(file_meta.get("TransferSyntaxUID", ""))
    if ts not in _LEAN_SYNTAXES:
        return None
    implicit = ts == "1.2.840.10008.1.2"
    elements, end = _lean_elements(head, pos, implicit)
    if elements is None or end >= len(head):
        return None  # past what was read: the caller reads more, or pydicom reads to the end
    ds = Dataset(elements)
    ds.file_meta = file_meta
    ds.set_original_encoding(implicit, True, ds._character_set)
    fh.seek(end)
    return ds


def _lean_elements(buf: bytes, pos: int, implicit: bool, group: int | None = None) -> tuple[dict[int, Any] | None, int]:
    """Raw elements from ``pos`` up to a stop tag (or the first element outside ``group``, or
    the end of ``buf``), as pydicom's data_element_generator yields them; None where it would
    do something this reader does not."""
    out: dict[int, Any] = {}
    size = len(buf)
    while pos + 8 <= size:
        if implicit:
            g, e, length = _IMPLICIT.unpack_from(buf, pos)
            vr, vpos = None, pos + 8
        else:
            g, e, code, length = _ELEMENT.unpack_from(buf, pos)
            if group is not None and g != group:
                return out, pos
            if not (b"AA" <= code <= b"ZZ"):
                return None, pos
            vr = code.decode("ascii")
            vpos = pos + 8
            if vr in _LONG_VRS:
                if pos + 12 > size:
                    return None, pos
                length, vpos = _U32.unpack_from(buf, pos + 8)[0], pos + 12
        tag = g << 16 | e
        if group is not None and g != group:
            return out, pos
        if tag in _STOP_TAGS and group is None:
            return out, pos
        if length == 0xFFFFFFFF or g in (0x0000, 0x0002, 0xFFFE) and group is None or vpos + length > size:
            return None, pos
        value = buf[vpos : vpos + length] if length else empty_value_for_VR(vr, raw=True)
        out[tag] = RawDataElement(BaseTag(tag), vr, length, value, vpos, implicit, True)
        pos = vpos + length
    return out, size if pos < size else pos  # pydicom reads a short last header to the end
