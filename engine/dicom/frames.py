"""DICOM headers reduced to :class:`Frame` records: one per classic image, Enhanced frame or
Siemens mosaic tile, each with its position, orientation and spacing."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ..discover import Source

ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
IN_STACK_POSITION = 0x00209057
NUMBER_OF_IMAGES_IN_MOSAIC = (0x0019, 0x100A)
POSITION_TOL_MM = 0.01  # frames closer than this along the normal share a slice position
ORIENTATION_TOL = 1e-3  # direction-cosine difference allowed within one series
VOLUME_RULE = "first volume: at each slice position the frame with the lowest (temporal, echo/dimension, acquisition) key"


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


# --------------------------------------------------------------------------- header records


@dataclass(frozen=True)
class PixelBytes:
    """How much pixel data a file holds: the bytes after the header, and the length the Pixel
    Data element declares (None when encapsulated or unparseable)."""

    present: int
    declared: int | None = None


def read_header(source: Source) -> tuple[Dataset, PixelBytes]:
    """The dataset without pixel data, and what the file holds of its pixel data.

    Raises on anything that is not readable DICOM.
    """
    with source.open() as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        return ds, _pixel_bytes(fh, ds)


def _pixel_bytes(fh, ds: Dataset) -> PixelBytes:
    """Read the Pixel Data element's tag and length (the file is positioned at it)."""
    here = fh.tell()
    head = fh.read(12)
    fh.seek(0, 2)
    remaining = fh.tell() - here
    ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
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


def record_from_header(
    source: Source, ds: Dataset, remaining: PixelBytes | int | None = None, *, with_patient_age: bool = False
) -> DicomRecord:
    """Build the record for one file; raises ValueError for DICOM without image data."""
    if "Rows" not in ds or "Columns" not in ds:
        uid = ds.get("SOPClassUID")
        name = str(getattr(uid, "name", "") or "")
        known = bool(name) and name != str(uid)
        if not known or "Image Storage" in name or "Rows" in ds or "Columns" in ds:
            # an image object (or one whose class is unreadable) without its matrix size: a file
            # cut inside its header or a broken writer, not a report
            raise ValueError(f"incomplete image header: no Rows/Columns (a truncated file or a broken writer; SOP class {name or uid or 'missing'})")
        raise ValueError(f"no image data (SOP class {name})")
    if _is_enhanced(ds):
        kind, frames = "enhanced", _enhanced_frames(ds, source)
    elif mosaic_count(ds):
        kind, frames = "mosaic", _mosaic_frames(ds, source)
    else:
        kind, frames = "classic", [_classic_frame(ds, source)]
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    meta = {
        "transfer_syntax": str(ts) if ts else None,
        "transfer_syntax_name": getattr(ts, "name", None),
        "sop_class": str(ds.get("SOPClassUID", "")),
        "series_number": as_int(ds.get("SeriesNumber")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "body_part": str(ds.get("BodyPartExamined", "")),
        "multiframe": kind == "enhanced",
        "mosaic": kind == "mosaic",
    }
    identifiers = patient_identifiers(ds)
    for key in ("manufacturer", "body_part"):
        meta[key] = scrub(meta[key], identifiers)
    if with_patient_age:
        meta["patient_age"] = str(ds.get("PatientAge", ""))
    rec = DicomRecord(
        source=source,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        description=scrub(str(ds.get("SeriesDescription", "")), identifiers),
        kind=kind,
        frames=frames,
        meta=meta,
    )
    truncated = _truncation(ds, remaining)
    if truncated:
        rec.problems.append(f"{source}: {truncated}")
    return rec


# --------------------------------------------------------------------------- identifiers in free text

REMOVED = "[removed]"
_DATE_FORMS = ("{y}{m}{d}", "{y}-{m}-{d}", "{y}/{m}/{d}", "{y}.{m}.{d}", "{d}.{m}.{y}", "{d}/{m}/{y}",
               "{m}/{d}/{y}", "{d}-{m}-{y}", "{m}-{d}-{y}")
SHORT_IDENTIFIER = 4  # shorter identifiers are removed only as whole words ("Li" is in "oblique")


def patient_identifiers(ds: Dataset) -> list[str]:
    """Strings that identify the patient: the name as a whole, written several ways, and its
    components of two or more characters; PatientID and OtherPatientIDs; the birth date in
    DICOM form and the common formatted forms. Longest first, so a whole name goes before its
    parts."""
    found: set[str] = set()
    name = ds.get("PatientName")
    if name:
        text = str(name)
        parts = [p.strip() for p in re.split(r"[\^=]", text) if p.strip()]
        found.update({text, " ".join(parts), ", ".join(parts[:2]), " ".join(reversed(parts[:2]))})
        found.update(p for p in parts if len(p) >= 2)
        found.update(w for p in parts for w in p.split() if len(w) >= 2)
    ids = [ds.get("PatientID"), *(_values(ds.get("OtherPatientIDs")))]
    ids += [item.get("PatientID") for item in ds.get("OtherPatientIDsSequence", []) or []]
    found.update(str(v).strip() for v in ids if v is not None and str(v).strip())
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    if re.fullmatch(r"\d{8}", birth):
        y, m, d = birth[:4], birth[4:6], birth[6:]
        found.update(form.format(y=y, m=m, d=d) for form in _DATE_FORMS)
    return sorted((f for f in found if len(f) >= 2), key=len, reverse=True)


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def scrub(text: str, identifiers: list[str]) -> str:
    """``text`` with every identifier replaced by "[removed]" (case-insensitive)."""
    for ident in identifiers:
        pattern = re.escape(ident)
        if len(ident) < SHORT_IDENTIFIER:
            pattern = rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])"
        text = re.sub(pattern, REMOVED, text, flags=re.IGNORECASE)
    return text


# --------------------------------------------------------------------------- pixel data size


def pixel_bytes_needed(ds: Dataset) -> int:
    """Bytes of uncompressed pixel data the header's Rows, Columns, frames, samples and
    BitsAllocated call for."""
    return (
        int(ds.Rows) * int(ds.Columns) * (as_int(ds.get("NumberOfFrames"), 1) or 1)
        * (as_int(ds.get("SamplesPerPixel"), 1) or 1) * (as_int(ds.get("BitsAllocated"), 16) or 16) // 8
    )


def pixel_size_problem(held: int, ds: Dataset) -> str:
    return (
        f"pixel data holds {held} bytes, Rows x Columns x frames x bytes/pixel "
        f"({int(ds.Rows)} x {int(ds.Columns)} x {as_int(ds.get('NumberOfFrames'), 1) or 1} x "
        f"{(as_int(ds.get('SamplesPerPixel'), 1) or 1) * (as_int(ds.get('BitsAllocated'), 16) or 16) // 8}) "
        f"needs {pixel_bytes_needed(ds)}"
    )


def _truncation(ds: Dataset, remaining: PixelBytes | int | None) -> str | None:
    """For uncompressed files, whether the file holds less pixel data than the header needs:
    a truncated file (the Pixel Data element declares more than the file holds) or Rows/Columns
    that are larger than the data."""
    ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if remaining is None or ts is None or ts.is_compressed or "Rows" not in ds:
        return None
    held = remaining if isinstance(remaining, PixelBytes) else PixelBytes(remaining)
    needed = pixel_bytes_needed(ds)
    if held.declared is not None and held.present < held.declared:
        return f"truncated file: {held.present} bytes of pixel data, the Pixel Data element declares {held.declared}"
    if held.present < needed:
        return pixel_size_problem(held.present, ds)
    return None


def as_int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
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


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or str(ds.get("SOPClassUID", "")) == ENHANCED_MR_STORAGE


def _classic_frame(ds: Dataset, source: Source) -> Frame:
    return Frame(
        source=source,
        index=0,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
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


def _group_item(frame_item: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    """A functional-group macro for one frame: per-frame first, shared groups as fallback."""
    for holder in (frame_item, shared):
        if holder is not None and sequence in holder and len(holder[sequence].value):
            return holder[sequence].value[0]
    return None


def _enhanced_frames(ds: Dataset, source: Source) -> list[Frame]:
    n = as_int(ds.get("NumberOfFrames"), 1) or 1
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    pointers = [int(item.get("DimensionIndexPointer", 0)) for item in ds.get("DimensionIndexSequence", [])]
    instance = as_int(ds.get("InstanceNumber"), 0)
    frames = []
    for i in range(n):
        item = per_frame[i] if i < len(per_frame) else None
        position = _group_item(item, shared, "PlanePositionSequence")
        orient = _group_item(item, shared, "PlaneOrientationSequence")
        measures = _group_item(item, shared, "PixelMeasuresSequence")
        content = _group_item(item, shared, "FrameContentSequence")
        indices = list(content.get("DimensionIndexValues", [])) if content is not None else []
        if not isinstance(indices, list):
            indices = [indices]
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
            )
        )
    return frames


def frame_rescale(ds: Dataset, index: int) -> tuple[float, float]:
    """Slope and intercept for one Enhanced frame (PixelValueTransformationSequence)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    item = per_frame[index] if per_frame is not None and index < len(per_frame) else None
    pvt = _group_item(item, shared_seq[0] if shared_seq else None, "PixelValueTransformationSequence")
    source = pvt if pvt is not None else ds
    slope = source.get("RescaleSlope", 1.0)
    intercept = source.get("RescaleIntercept", 0.0)
    return float(slope if slope not in (None, "") else 1.0), float(intercept if intercept not in (None, "") else 0.0)


# --------------------------------------------------------------------------- Siemens mosaic


def _csa_image_header(ds: Dataset) -> dict | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom warns that its readers are experimental
        from nibabel.nicom import csareader

        try:
            return csareader.get_csa_header(ds, "image")
        except Exception:
            return None


def mosaic_count(ds: Dataset) -> int | None:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" not in image_type:
        return None
    n = as_int(ds[NUMBER_OF_IMAGES_IN_MOSAIC].value) if NUMBER_OF_IMAGES_IN_MOSAIC in ds else None
    if not n:
        csa = _csa_image_header(ds)
        if csa is not None:
            from nibabel.nicom import csareader

            n = as_int(csareader.get_n_mosaic(csa))
    return n or None


def _mosaic_frames(ds: Dataset, source: Source) -> list[Frame]:
    """One Frame per mosaic tile, with positions computed like dcm2niix and nibabel do.

    The header's ImagePositionPatient is the corner of the whole mosaic; the first slice's corner
    is shifted by half the difference between mosaic and tile sizes. Tiles follow the CSA
    SliceNormalVector, one SpacingBetweenSlices (else SliceThickness) apart.
    """
    n = mosaic_count(ds) or 1
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
            from nibabel.nicom import csareader

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


