"""DICOM headers reduced to :class:`Frame` records: one per classic image, Enhanced frame or
Siemens mosaic tile, each with its position, orientation and spacing. Where a file's pixel data
lies and the size checks made before decoding are in :mod:`engine.dicom.pixel_plan`; which strings
identify the patient, and their removal from stored text, in :mod:`engine.dicom.patient_identifiers`."""

from __future__ import annotations

import math
import mmap
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble

from .. import memory_budget
from ..errors import HeaderError
from ..discover import Source
from .deflated import read_deflated
from .groups import PER_FRAME_GROUPS, PIXEL_TAGS, GroupsError, find_pixel_data, read_frame_groups
from .pixel_plan import (  # noqa: F401  (PixelPlan, pixel_bytes_needed, pixel_size_problem: re-exported)
    PixelBytes,
    PixelPlan,
    as_int,
    declared_bytes,
    expansion_problem,
    pixel_bytes_needed,
    pixel_plan,
    pixel_size_problem,
    transfer_syntax,
    truncation_problem,
)
from .patient_identifiers import patient_identifiers, scrub_cached
from .raw_header import Header, _lean_partial, _stop, _tag_vr  # noqa: F401  (_tag_vr: re-exported for tests)

# re-exported: the identifier rules' public names, imported from here before they had a module
from .patient_identifiers import PHI_RULE as PHI_RULE
from .patient_identifiers import REMOVED as REMOVED
from .patient_identifiers import SHORT_IDENTIFIER as SHORT_IDENTIFIER
from .patient_identifiers import SHORT_NAME_PART as SHORT_NAME_PART
from .patient_identifiers import scrub as scrub

ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
IN_STACK_POSITION = 0x00209057
NUMBER_OF_IMAGES_IN_MOSAIC = (0x0019, 0x100A)
POSITION_TOL_MM = 0.01  # frames closer than this along the normal share a slice position
ORIENTATION_TOL = 1e-3  # direction-cosine difference allowed within one series
VOLUME_RULE = (
    "first volume: at each slice position the frame with the lowest (temporal, echo/dimension, acquisition) key"
)


@dataclass(frozen=True)
class Frame:
    """One 2D image in a series; ``index`` is the frame (Enhanced) or tile (mosaic) number."""

    source: Source
    index: int
    rows: int
    cols: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, float, float] | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), mm
    slice_step: float | None  # SpacingBetweenSlices or SliceThickness, for one-slice stacks
    order: tuple  # non-spatial key: which volume of a multi-volume series this frame belongs to
    tiebreak: tuple = ()
    rescale: tuple[float, float] | None = None  # (slope, intercept); None: stored values as they are


@dataclass
class DicomRecord:
    """What discovery keeps from one DICOM file's header."""

    source: Source
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    description: str
    kind: str  # "classic" | "enhanced" | "mosaic"
    frames: list[Frame]
    meta: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    pixels: PixelPlan | None = None
    declared_bytes: int = 0  # Rows x Columns x frames x samples x BitsAllocated/8, as the header says


# --------------------------------------------------------------------------- header records


_DEFLATED = "1.2.840.10008.1.2.1.99"


def read_header(source: Source) -> tuple[Dataset, PixelBytes]:
    """The dataset without pixel data, and what the file holds of its pixel data.

    Raises on anything that is not readable DICOM.
    """
    ds, held, _, _ = read_file_header(source)
    return ds, held


def read_file_header(source: Source) -> tuple[Dataset, PixelBytes, list[dict[str, Any]] | None, tuple | None]:
    """One pass over a file's header: the dataset (without per-frame groups or pixel data),
    what the file holds of its pixel data, the per-frame functional groups (None when absent,
    or when the lean reader could not follow them and they are in ``ds``), and the pixel data
    element as (tag, value offset, VR, declared length), None when not found.
    """
    with source.open() as fh:
        ds = _lean_partial(fh)
        if ds is None:
            if _stored_syntax(fh) == _DEFLATED:  # pydicom would inflate it whole, unbounded
                return _deflated_header(source)
            fh.seek(0)
            ds = read_partial(fh, stop_when=_stop)
        here = fh.tell()
        ts = transfer_syntax(ds)
        if ts is None:
            return _pydicom_header(source)
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(here)
        first = _Offset(fh.read(12), here)  # the next element's header: groups or pixel data
        groups, pixel = None, None
        if _peek_tag(first, here, ts.is_little_endian) != PER_FRAME_GROUPS:
            pixel = _pixel_element(first, here, ts)
        elif not ts.is_little_endian:
            return _pydicom_header(source)
        else:
            head = _buffer(fh, source, here, size)
            try:
                groups, here = read_frame_groups(head, here, ts.is_implicit_VR)
                pixel = find_pixel_data(head, here, ts.is_implicit_VR)
            except GroupsError:
                return _pydicom_header(source)
            finally:
                if isinstance(head, mmap.mmap):
                    head.close()
    return ds, _held(pixel, here, size, ts), groups, pixel


def _stored_syntax(fh: Any) -> str | None:
    """The transfer syntax the file meta names (None when unreadable)."""
    fh.seek(0)
    try:
        read_preamble(fh, False)
        return str(_read_file_meta_info(fh).get("TransferSyntaxUID", "")) or None
    except Exception:  # pydicom's own read reports what is wrong
        return None


def _deflated_header(source: Source) -> tuple[Dataset, PixelBytes, None, None]:
    """A Deflated file's header, inflated within the budget, and its pixel data's size as the
    inflated dataset holds it."""
    ds, buf = read_deflated(source, stop_before_pixels=True)
    return ds, _pixel_bytes(buf, ds), None, None


def _pydicom_header(source: Source) -> tuple[Dataset, PixelBytes, None, None]:
    """The whole header through pydicom: for what the lean path does not follow."""
    with source.open() as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        return ds, _pixel_bytes(fh, ds), None, None


def _pixel_bytes(fh, ds: Dataset) -> PixelBytes:
    """Read the Pixel Data element's tag and length (the file is positioned at it)."""
    here = fh.tell()
    head = fh.read(12)
    fh.seek(0, 2)
    remaining = fh.tell() - here
    ts = transfer_syntax(ds)
    if ts is None or not ts.is_little_endian or len(head) < 8 or head[:4] != b"\xe0\x7f\x10\x00":
        return PixelBytes(remaining)
    if ts.is_implicit_VR:
        size, length = 8, int.from_bytes(head[4:8], "little")
    elif len(head) == 12 and head[4:6] in (b"OB", b"OW"):
        size, length = 12, int.from_bytes(head[8:12], "little")
    else:
        return PixelBytes(remaining)
    if length == 0xFFFFFFFF:  # encapsulated (compressed) data
        return PixelBytes(remaining)
    return PixelBytes(min(length, remaining - size), length)


def _buffer(fh: Any, source: Source, start: int, size: int) -> Any:
    """The file's bytes for the lean walker: a read-only map of a file on disk (only the pages
    walked are read), or a zip member's bytes after ``start`` padded to keep offsets."""
    if source.member is None and size:
        try:
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            pass
    fh.seek(start)
    return _Offset(fh.read(), start)


class _Offset:
    """Bytes that start at file offset ``start``: indexes and struct reads use file offsets."""

    def __init__(self, data: bytes, start: int) -> None:
        self.data, self.start = data, start

    def __len__(self) -> int:
        return self.start + len(self.data)

    def __getitem__(self, key: slice) -> bytes:
        return self.data[key.start - self.start : key.stop - self.start]


def _peek_tag(buf: Any, pos: int, little: bool) -> int | None:
    raw = buf[pos : pos + 4]
    if len(raw) < 4:
        return None
    group, elem = struct.unpack("<HH" if little else ">HH", raw)
    return group << 16 | elem


def _pixel_element(buf: Any, pos: int, ts: Any) -> tuple[int, int, bytes | None, int] | None:
    """The pixel data element at ``pos`` as (tag, value offset, VR, declared length)."""
    raw = buf[pos : pos + 12]
    if len(raw) < 8:
        return None
    end = "<" if ts.is_little_endian else ">"
    group, elem = struct.unpack(end + "HH", raw[:4])
    tag = group << 16 | elem
    if tag not in PIXEL_TAGS:
        return None
    if ts.is_implicit_VR:
        return tag, pos + 8, None, struct.unpack(end + "I", raw[4:8])[0]
    vr = raw[4:6]
    if vr in (b"OB", b"OW", b"OF", b"OD", b"UN") and len(raw) == 12:
        return tag, pos + 12, vr, struct.unpack(end + "I", raw[8:12])[0]
    return None


def _held(pixel: tuple | None, end_of_header: int, size: int, ts: Any) -> PixelBytes:
    """What the file holds of its pixel data, as the truncation checks need it (the same
    rules as :func:`_pixel_bytes`, from the element already found)."""
    if pixel is None or pixel[0] != 0x7FE00010:
        return PixelBytes(size - end_of_header)
    _, vpos, vr, length = pixel
    header = 8 if ts.is_implicit_VR else 12
    remaining = size - (vpos - header)
    if not ts.is_little_endian or length == 0xFFFFFFFF or (vr is not None and vr not in (b"OB", b"OW")):
        return PixelBytes(remaining)
    return PixelBytes(min(length, remaining - header), length)


def record_from_header(
    source: Source,
    ds: Dataset,
    remaining: PixelBytes | int | None = None,
    groups: list[dict[str, Any]] | None = None,
    pixel: tuple | None = None,
    *,
    with_patient_age: bool = False,
) -> DicomRecord:
    """Build the record for one file; raises ValueError for DICOM without image data.

    ``groups`` are the per-frame functional groups when :func:`read_file_header` read them
    (otherwise they are in ``ds``); ``pixel`` is the pixel data element it found.
    """
    h = ds if isinstance(ds, Header) else Header(ds)
    ds = h.ds
    if "Rows" not in h or "Columns" not in h:
        uid = ds.get("SOPClassUID")
        name = str(getattr(uid, "name", "") or "")
        known = bool(name) and name != str(uid)
        if not known or "Image Storage" in name or "Rows" in h or "Columns" in h:
            # an image object (or one whose class is unreadable) without its matrix size: a file
            # cut inside its header or a broken writer, not a report
            raise HeaderError(
                f"incomplete image header: no Rows/Columns (a truncated file or a broken writer; SOP class {name or uid or 'missing'})"
            )
        raise HeaderError(f"no image data (SOP class {name})")
    mosaic = 0
    declared = declared_bytes(h)
    # a file that declares more than the budget never loads: its frames are not listed one by one
    # (NumberOfFrames can say 10^9); the series fails on its need
    max_frames = 1 if declared > memory_budget.current() else None
    if groups is not None or _is_enhanced(h):
        kind, frames = "enhanced", _enhanced_frames(ds, source, groups, max_frames)
    elif mosaic_count(h):
        mosaic = mosaic_count(ds) or 1
        kind, frames = "mosaic", _mosaic_frames(ds, source)
    else:
        kind, frames = "classic", [_classic_frame(h, source)]
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    meta = {
        "transfer_syntax": str(ts) if ts else None,
        "transfer_syntax_name": getattr(ts, "name", None),
        "sop_class": str(h.get("SOPClassUID", "")),
        "series_number": as_int(h.get("SeriesNumber")),
        "manufacturer": str(h.get("Manufacturer", "")),
        "body_part": str(h.get("BodyPartExamined", "")),
        "multiframe": kind == "enhanced",
        "mosaic": kind == "mosaic",
    }
    identifiers = _patient_identifiers(h)
    for key in ("manufacturer", "body_part"):
        meta[key] = scrub_cached(meta[key], identifiers)
    if with_patient_age:
        meta["patient_age"] = str(h.get("PatientAge", ""))
    rec = DicomRecord(
        source=source,
        study_uid=str(h.get("StudyInstanceUID", "")),
        series_uid=str(h.get("SeriesInstanceUID", "")),
        sop_uid=str(h.get("SOPInstanceUID", "")),
        modality=str(h.get("Modality", "")),
        description=scrub_cached(str(h.get("SeriesDescription", "")), identifiers),
        kind=kind,
        frames=frames,
        meta=meta,
        pixels=pixel_plan(source, h, pixel, remaining, mosaic),
    )
    rec.declared_bytes = declared
    truncated = truncation_problem(h, remaining) or expansion_problem(h, remaining, rec.declared_bytes)
    if truncated:
        rec.problems.append(f"{source}: {truncated}")
    return rec


# --------------------------------------------------------------------------- identifiers in free text
# the rules live in engine.dicom.patient_identifiers; here they are worked out once per patient

_IDENTITY = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate")


def _patient_identifiers(h: Header) -> tuple[tuple[str, str], ...]:
    """:func:`patient_identifiers`, worked out once per patient: files of one patient carry the
    same identifying elements, so their stored bytes (and the character set that decodes
    them) are the key."""
    if "OtherPatientIDsSequence" in h:
        return tuple(patient_identifiers(h.ds))
    raw = tuple(h.raw(k) for k in _IDENTITY)
    if any(v is None and k in h for k, v in zip(_IDENTITY, raw)):  # converted already: no bytes to key on
        return tuple(patient_identifiers(h.ds))
    key = (tuple(h.ds._character_set), *raw)
    found = _IDENTIFIERS.get(key)
    if found is None:
        if len(_IDENTIFIERS) >= _IDENTIFIERS_MAX:
            _IDENTIFIERS.clear()
        found = _IDENTIFIERS[key] = tuple(patient_identifiers(h.ds))
    return found


_IDENTIFIERS: dict[tuple, tuple[tuple[str, str], ...]] = {}
_IDENTIFIERS_MAX = 4096


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if isinstance(value, (str, bytes)):
        return None  # one value where n are needed
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out > 0 else None


def _is_enhanced(ds: Dataset | Header) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or str(ds.get("SOPClassUID", "")) == ENHANCED_MR_STORAGE


def _classic_frame(ds: Dataset | Header, source: Source) -> Frame:
    return Frame(
        source=source,
        index=0,
        rows=int(ds.get("Rows")),
        cols=int(ds.get("Columns")),
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        slice_step=_float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness")),
        order=(
            as_int(ds.get("TemporalPositionIdentifier"), 0),
            as_int(_first(ds.get("EchoNumbers")), 0),
            as_int(ds.get("AcquisitionNumber"), 0),
        ),
        tiebreak=(as_int(ds.get("InstanceNumber"), 0), str(source)),
    )


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


# --------------------------------------------------------------------------- Enhanced multi-frame


def _group_item(frame_item: Any, shared: Any, sequence: str) -> Any:
    """A functional-group macro for one frame: per-frame first, shared groups as fallback.

    A holder is a pydicom item or a dict from :func:`~.groups.read_frame_groups`
    (``{macro: {element: value}}``, the macro's first item only)."""
    for holder in (frame_item, shared):
        if holder is None or sequence not in holder:
            continue
        if isinstance(holder, dict):
            return holder[sequence]
        if len(holder[sequence].value):
            return holder[sequence].value[0]
    return None


def _enhanced_frames(
    ds: Dataset, source: Source, groups: list[dict[str, Any]] | None = None, max_frames: int | None = None
) -> list[Frame]:
    n = min(as_int(ds.get("NumberOfFrames"), 1) or 1, max_frames or 2**63)
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = groups if groups is not None else list(ds.get("PerFrameFunctionalGroupsSequence", []))
    pointers = [int(item.get("DimensionIndexPointer", 0)) for item in ds.get("DimensionIndexSequence", [])]
    instance = as_int(ds.get("InstanceNumber"), 0)
    frames = []
    for i in range(n):
        item = per_frame[i] if i < len(per_frame) else None
        position = _group_item(item, shared, "PlanePositionSequence")
        orient = _group_item(item, shared, "PlaneOrientationSequence")
        measures = _group_item(item, shared, "PixelMeasuresSequence")
        content = _group_item(item, shared, "FrameContentSequence")
        indices = content.get("DimensionIndexValues", []) if content is not None else []
        indices = list(indices) if isinstance(indices, list) or type(indices).__name__ == "MultiValue" else [indices]
        rest = tuple(int(v) for p, v in zip(pointers, indices) if p != IN_STACK_POSITION)
        temporal = as_int(content.get("TemporalPositionIndex"), 0) if content is not None else 0
        frames.append(
            Frame(
                source=source,
                index=i,
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                iop=_floats(orient.get("ImageOrientationPatient"), 6) if orient else None,
                ipp=_floats(position.get("ImagePositionPatient"), 3) if position else None,  # type: ignore[arg-type]
                pixel_spacing=_floats(measures.get("PixelSpacing"), 2) if measures else None,  # type: ignore[arg-type]
                slice_step=(
                    (_float(measures.get("SpacingBetweenSlices")) or _float(measures.get("SliceThickness")))
                    if measures
                    else None
                ),
                order=(temporal, rest),
                tiebreak=(instance, str(source), i),
                rescale=_frame_rescale(ds, _group_item(item, shared, "PixelValueTransformationSequence")),
            )
        )
    return frames


def _frame_rescale(ds: Dataset, pvt: Any) -> tuple[float, float]:
    source = pvt if pvt is not None else ds
    slope = source.get("RescaleSlope", 1.0)
    intercept = source.get("RescaleIntercept", 0.0)
    return float(slope if slope not in (None, "") else 1.0), float(intercept if intercept not in (None, "") else 0.0)


# --------------------------------------------------------------------------- Siemens mosaic


def _csa_image_header(ds: Dataset) -> dict | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom warns that its readers are experimental
        from nibabel.nicom import csareader  # only Siemens mosaics carry a CSA header

        try:
            return csareader.get_csa_header(ds, "image")
        except Exception:
            return None


def mosaic_count(ds: Dataset | Header) -> int | None:
    if isinstance(ds, Header):
        raw = ds.raw("ImageType")
        if raw is not None and b"MOSAIC" not in raw.upper():
            return None  # the common case, told from the stored bytes
        ds = ds.ds
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" not in image_type:
        return None
    n = as_int(ds[NUMBER_OF_IMAGES_IN_MOSAIC].value) if NUMBER_OF_IMAGES_IN_MOSAIC in ds else None
    if not n:
        csa = _csa_image_header(ds)
        if csa is not None:
            from nibabel.nicom import csareader  # only Siemens mosaics carry a CSA header

            n = as_int(csareader.get_n_mosaic(csa))
    return n or None


def _mosaic_frames(ds: Dataset, source: Source) -> list[Frame]:
    """One Frame per mosaic tile, with positions computed like dcm2niix and nibabel do.

    The header's ImagePositionPatient is the corner of the whole mosaic; the first slice's corner
    is shifted by half the difference between mosaic and tile sizes. Tiles follow the CSA
    SliceNormalVector, one SpacingBetweenSlices (else SliceThickness) apart.
    """
    n = mosaic_count(ds) or 1
    if n > int(ds.Rows) * int(ds.Columns):  # a hostile count must not list millions of tiles
        raise HeaderError(f"mosaic declares {n} tiles in a {int(ds.Rows)} x {int(ds.Columns)} image")
    per_side = math.ceil(math.sqrt(n))
    rows, cols = int(ds.Rows) // per_side, int(ds.Columns) // per_side
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    step = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness")) or 1.0
    order = (as_int(ds.get("AcquisitionNumber"), 0), as_int(ds.get("InstanceNumber"), 0))
    if iop is None or ipp is None or spacing is None:
        positions: list[tuple[float, float, float] | None] = [None] * n
    else:
        row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
        normal = np.cross(row_cos, col_cos)
        csa = _csa_image_header(ds)
        if csa is not None:
            from nibabel.nicom import csareader  # only Siemens mosaics carry a CSA header

            csa_normal = csareader.get_slice_normal(csa)
            if csa_normal is not None:
                normal = np.asarray(csa_normal, dtype=float)
        corner = (
            np.array(ipp)
            + row_cos * spacing[1] * (int(ds.Columns) - cols) / 2
            + col_cos * spacing[0] * (int(ds.Rows) - rows) / 2
        )
        positions = [tuple(float(v) for v in corner + t * step * normal) for t in range(n)]  # type: ignore[misc]
    return [
        Frame(
            source=source,
            index=t,
            rows=rows,
            cols=cols,
            iop=iop,
            ipp=positions[t],
            pixel_spacing=spacing,  # type: ignore[arg-type]
            slice_step=step,
            order=order,
            tiebreak=(str(source), t),
        )
        for t in range(n)
    ]
