"""DICOM series: header records for discovery, slice-stack geometry, and pixel decoding.

Every image, whatever its storage, is reduced to :class:`Frame` records (one 2D image with its
position and orientation): a classic one-file-per-slice image, one frame of an Enhanced
multi-frame object, or one tile of a Siemens mosaic. :func:`plan_stack` orders frames along the
slice normal, checks the stack (dimensions, orientation, duplicates, gaps) and builds the
voxel-to-RAS affine; the same function runs at scan time (problems are reported) and at load
time (problems raise :class:`~engine.discover.LoadError`).

Series holding several volumes (time points, echoes, field-map components, or one volume per
file as in Siemens XA multi-file runs and mosaic time series) load as their **first volume**:
frames at each slice position are ordered by a non-spatial key — temporal position, then the
remaining dimension indices / echo number / acquisition number — and the first one is kept.
``meta["volumes"]`` gives the count and ``meta["volume_rule"]`` states the rule.

Voxel values are the stored values through the DICOM rescale (RescaleSlope/Intercept or the
modality LUT; per frame for Enhanced objects), as float32. Vendor-private scalings (e.g.
Philips' floating-point scale) are not applied.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale, pixel_array

from .discover import LoadError, SeriesRef, Source, sanitise_key
from .geometry import LPS_TO_RAS, Volume, orientation_name

ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
IN_STACK_POSITION = 0x00209057
NUMBER_OF_IMAGES_IN_MOSAIC = (0x0019, 0x100A)
POSITION_TOL_MM = 0.01  # frames closer than this along the normal share a slice position
SPACING_REL_TOL = 0.01  # steps may differ from the median by 1% (or POSITION_TOL_MM)
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


@dataclass
class Stack:
    """A checked slice stack: one volume's frames ordered along the slice normal."""

    frames: list[Frame]
    affine: np.ndarray  # voxel (i, j, k) -> RAS mm
    n_volumes: int


class StackError(ValueError):
    """The frames of a series do not form one regular 3D grid."""


# --------------------------------------------------------------------------- header records


def read_header(source: Source) -> tuple[Dataset, int]:
    """The dataset without pixel data, and how many bytes follow the header in the file.

    Raises on anything that is not readable DICOM.
    """
    with source.open() as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        return ds, _remaining_bytes(fh)


def _remaining_bytes(fh) -> int:
    here = fh.tell()
    fh.seek(0, 2)
    end = fh.tell()
    return end - here


def record_from_header(
    source: Source, ds: Dataset, remaining: int | None = None, *, with_patient_age: bool = False
) -> DicomRecord:
    """Build the record for one file; raises ValueError for DICOM without image data."""
    if "Rows" not in ds or "Columns" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", None) or ds.get("SOPClassUID", "unknown")
        raise ValueError(f"no image data (SOP class {sop})")
    if _is_enhanced(ds):
        kind, frames = "enhanced", _enhanced_frames(ds, source)
    elif _mosaic_count(ds):
        kind, frames = "mosaic", _mosaic_frames(ds, source)
    else:
        kind, frames = "classic", [_classic_frame(ds, source)]
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    meta = {
        "transfer_syntax": str(ts) if ts else None,
        "transfer_syntax_name": getattr(ts, "name", None),
        "sop_class": str(ds.get("SOPClassUID", "")),
        "series_number": _int(ds.get("SeriesNumber")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "body_part": str(ds.get("BodyPartExamined", "")),
        "multiframe": kind == "enhanced",
        "mosaic": kind == "mosaic",
    }
    if with_patient_age:
        meta["patient_age"] = str(ds.get("PatientAge", ""))
    rec = DicomRecord(
        source=source,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        kind=kind,
        frames=frames,
        meta=meta,
    )
    truncated = _truncation(ds, remaining)
    if truncated:
        rec.problems.append(f"{source}: {truncated}")
    return rec


def _truncation(ds: Dataset, remaining: int | None) -> str | None:
    """For uncompressed files, whether fewer pixel bytes follow the header than it declares."""
    ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if remaining is None or ts is None or ts.is_compressed:
        return None
    expected = (
        int(ds.Rows) * int(ds.Columns) * _int(ds.get("NumberOfFrames"), 1)
        * _int(ds.get("SamplesPerPixel"), 1) * _int(ds.get("BitsAllocated"), 16) // 8
    )
    if remaining < expected:
        return f"truncated file: {remaining} bytes of pixel data, header declares {expected}"
    return None


def _int(value: Any, default: int | None = None) -> int | None:
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
            _int(ds.get("TemporalPositionIdentifier"), 0),
            _int(_first(ds.get("EchoNumbers")), 0),
            _int(ds.get("AcquisitionNumber"), 0),
        ),
        tiebreak=(_int(ds.get("InstanceNumber"), 0), str(source)),
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
    n = _int(ds.get("NumberOfFrames"), 1) or 1
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    pointers = [int(item.get("DimensionIndexPointer", 0)) for item in ds.get("DimensionIndexSequence", [])]
    instance = _int(ds.get("InstanceNumber"), 0)
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
        temporal = _int(content.get("TemporalPositionIndex"), 0) if content is not None else 0
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


def _frame_rescale(ds: Dataset, index: int) -> tuple[float, float]:
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


def _mosaic_count(ds: Dataset) -> int | None:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" not in image_type:
        return None
    n = _int(ds[NUMBER_OF_IMAGES_IN_MOSAIC].value) if NUMBER_OF_IMAGES_IN_MOSAIC in ds else None
    if not n:
        csa = _csa_image_header(ds)
        if csa is not None:
            from nibabel.nicom import csareader

            n = _int(csareader.get_n_mosaic(csa))
    return n or None


def _mosaic_frames(ds: Dataset, source: Source) -> list[Frame]:
    """One Frame per mosaic tile, with positions computed like dcm2niix and nibabel do.

    The header's ImagePositionPatient is the corner of the whole mosaic; the first slice's corner
    is shifted by half the difference between mosaic and tile sizes. Tiles follow the CSA
    SliceNormalVector, one SpacingBetweenSlices (else SliceThickness) apart.
    """
    n = _mosaic_count(ds) or 1
    per_side = math.ceil(math.sqrt(n))
    rows, cols = int(ds.Rows) // per_side, int(ds.Columns) // per_side
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    step = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness")) or 1.0
    order = (_int(ds.get("AcquisitionNumber"), 0), _int(ds.get("InstanceNumber"), 0))
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


# --------------------------------------------------------------------------- stack geometry


def _names(frames: list[Frame], limit: int = 3) -> str:
    names = sorted({str(f.source) for f in frames})
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_stack(frames: list[Frame]) -> Stack:
    """Order frames along the slice normal, check the grid, and build the voxel->RAS affine.

    Raises :class:`StackError` with a reason naming the files for: missing geometry, mixed
    dimensions or orientations, duplicate positions, missing slices, non-uniform spacing.
    """
    if not frames:
        raise StackError("no image frames")
    shapes: dict[tuple[int, int], list[Frame]] = defaultdict(list)
    for f in frames:
        shapes[(f.rows, f.cols)].append(f)
    if len(shapes) > 1:
        parts = "; ".join(f"{r}x{c} in {_names(fs)}" for (r, c), fs in sorted(shapes.items()))
        raise StackError(f"mixed image dimensions (rows x columns) within the series: {parts}")
    missing = [f for f in frames if f.iop is None or f.ipp is None or f.pixel_spacing is None]
    if missing:
        raise StackError(
            f"no ImageOrientationPatient/ImagePositionPatient/PixelSpacing in {_names(missing)}"
        )
    iops = np.array([f.iop for f in frames], dtype=float)
    off = np.abs(iops - iops[0]).max(axis=1) > ORIENTATION_TOL
    if off.any():
        odd = [f for f, o in zip(frames, off) if o]
        raise StackError(
            f"mixed slice orientations (ImageOrientationPatient differs) in {_names(odd)} "
            f"versus {frames[0].source}"
        )
    spacings = np.array([f.pixel_spacing for f in frames], dtype=float)
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise StackError(f"mixed PixelSpacing within the series: {_names(frames)}")

    row_cos, col_cos = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    proj = np.array([np.dot(f.ipp, normal) for f in frames])  # type: ignore[arg-type]
    order = np.argsort(proj, kind="stable")

    positions: list[list[Frame]] = []
    last = None
    for idx in order:
        if last is None or proj[idx] - last > POSITION_TOL_MM:
            positions.append([])
            last = proj[idx]
        positions[-1].append(frames[idx])

    volume, n_volumes = _first_volume(positions)
    pos = np.array([np.dot(f.ipp, normal) for f in volume])  # type: ignore[arg-type]
    _check_spacing(volume, pos)

    lps = np.eye(4)
    row_sp, col_sp = volume[0].pixel_spacing  # type: ignore[misc]
    lps[:3, 0] = row_cos * col_sp  # i runs along a row (across columns)
    lps[:3, 1] = col_cos * row_sp  # j runs down a column (across rows)
    first = np.array(volume[0].ipp, dtype=float)
    if len(volume) > 1:
        lps[:3, 2] = (np.array(volume[-1].ipp, dtype=float) - first) / (len(volume) - 1)
    else:
        lps[:3, 2] = normal * (volume[0].slice_step or 1.0)
    lps[:3, 3] = first
    return Stack(frames=volume, affine=LPS_TO_RAS @ lps, n_volumes=n_volumes)


def _first_volume(positions: list[list[Frame]]) -> tuple[list[Frame], int]:
    """Pick one frame per slice position (see the module docstring for the rule)."""
    counts = set()
    chosen = []
    for group in positions:
        by_key: dict[tuple, list[Frame]] = defaultdict(list)
        for f in group:
            by_key[f.order].append(f)
        dupes = [fs for fs in by_key.values() if len(fs) > 1]
        if dupes:
            raise StackError(
                f"duplicate slice position ({len(dupes[0])} images at one location): {_names(dupes[0])}"
            )
        counts.add(len(by_key))
        chosen.append(min(group, key=lambda f: (f.order, f.tiebreak)))
    if len(counts) > 1:
        raise StackError(
            f"incomplete volumes: slice positions hold {sorted(counts)} images each "
            f"(a duplicate or missing image) in {_names([f for g in positions for f in g])}"
        )
    return chosen, counts.pop()


def _check_spacing(volume: list[Frame], pos: np.ndarray) -> None:
    if len(volume) < 3:
        return
    steps = np.diff(pos)
    median = float(np.median(steps))
    tol = max(POSITION_TOL_MM, SPACING_REL_TOL * median)
    bad = np.flatnonzero(np.abs(steps - median) > tol)
    if not bad.size:
        return
    gaps = []
    for b in bad:
        ratio = steps[b] / median
        k = round(ratio)
        if k >= 2 and abs(steps[b] - k * median) <= tol * k:
            gaps.append(
                f"{k - 1} missing between {volume[b].source} ({pos[b]:.2f} mm) and "
                f"{volume[b + 1].source} ({pos[b + 1]:.2f} mm)"
            )
        else:
            gaps = []
            break
    if gaps:
        raise StackError(f"missing slice(s), expected step {median:.3f} mm: " + "; ".join(gaps[:3]))
    b = int(bad[0])
    raise StackError(
        f"non-uniform slice spacing: step {steps[b]:.3f} mm between {volume[b].source} and "
        f"{volume[b + 1].source}, median step {median:.3f} mm"
    )


# --------------------------------------------------------------------------- grouping and loading


def group_records(records: list[DicomRecord]) -> list[SeriesRef]:
    """Group file records by study and series UID and check each series' geometry."""
    groups: dict[tuple[str, str, int], list[DicomRecord]] = defaultdict(list)
    for rec in records:
        # SeriesNumber splits re-numbered copies that kept the UID (dcm2niix separates them too)
        groups[(rec.study_uid, rec.series_uid, rec.meta.get("series_number") or 0)].append(rec)
    numbers: dict[tuple[str, str], int] = defaultdict(int)
    for study, series, _ in groups:
        numbers[(study, series)] += 1
    refs = []
    for (study, series, number), recs in sorted(groups.items()):
        key = sanitise_key(series or str(recs[0].source))
        if numbers[(study, series)] > 1:
            key = f"{key}_{number}"
        recs, ignored = _unique_instances(recs)
        first = recs[0]
        problems = [p for r in recs for p in r.problems] + ignored
        modalities = sorted({r.modality for r in recs})
        non_mr = [m for m in modalities if m != "MR"]
        if non_mr:
            problems.append(
                f"modality {'/'.join(non_mr) or 'missing'} is not MR: {_names([f for r in recs for f in r.frames])}"
            )
        kinds = sorted({r.kind for r in recs})
        meta = dict(first.meta)
        meta.update(kind="/".join(kinds), n_files=len(recs))
        try:
            stack = plan_stack([f for r in recs for f in r.frames])
            dims = (stack.frames[0].cols, stack.frames[0].rows, len(stack.frames))
            orientation = orientation_name(stack.affine)
            _note_volumes(meta, stack)
        except StackError as exc:
            problems.append(str(exc))
            f0 = first.frames[0]
            dims = (f0.cols, f0.rows, len({f.ipp for r in recs for f in r.frames}))
            orientation = _orientation_from_iop(f0.iop)
        refs.append(
            SeriesRef(
                key=key,
                reader="dicom",
                study_uid=study,
                series_uid=series,
                modality="/".join(modalities),
                description=first.description,
                sources=sorted((r.source for r in recs), key=str),
                dims=dims,
                n_slices=dims[2],
                orientation=orientation,
                problems=problems,
                meta=meta,
            )
        )
    return refs


def _unique_instances(recs: list[DicomRecord]) -> tuple[list[DicomRecord], list[str]]:
    """Drop repeated copies of one SOP instance (e.g. the same file in a folder and a zip)."""
    seen: dict[str, DicomRecord] = {}
    keep, notes = [], []
    for rec in sorted(recs, key=lambda r: str(r.source)):
        if rec.sop_uid and rec.sop_uid in seen:
            notes.append(f"{rec.source}: same SOPInstanceUID as {seen[rec.sop_uid].source}; copy ignored")
            continue
        seen[rec.sop_uid] = rec
        keep.append(rec)
    return keep, notes


def _note_volumes(meta: dict[str, Any], stack: Stack) -> None:
    meta["volumes"] = stack.n_volumes
    if stack.n_volumes > 1:
        meta["volume_rule"] = VOLUME_RULE


def _orientation_from_iop(iop: tuple[float, ...] | None) -> str:
    if iop is None:
        return "unknown"
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3], iop[3:]
    lps[:3, 2] = np.cross(iop[:3], iop[3:])
    return orientation_name(LPS_TO_RAS @ lps)


def load_series(ref: SeriesRef) -> Volume:
    """Decode a DICOM series into a float32 :class:`Volume` (see module docstring)."""
    records = []
    for source in ref.sources:
        try:
            records.append(record_from_header(source, *read_header(source)))
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError) as exc:
            raise LoadError(f"{source}: unreadable DICOM header ({_reason(exc)})") from exc
    records, _ = _unique_instances(records)
    for rec in records:
        if rec.problems:
            raise LoadError(rec.problems[0])
        if rec.modality != "MR":
            raise LoadError(f"{rec.source}: modality {rec.modality or 'missing'} is not MR")
    try:
        stack = plan_stack([f for r in records for f in r.frames])
    except StackError as exc:
        raise LoadError(f"series {ref.key}: {exc}") from exc
    kinds = {r.source: r.kind for r in records}
    wanted: dict[Source, list[int]] = defaultdict(list)
    for f in stack.frames:
        wanted[f.source].append(f.index)
    planes: dict[tuple[Source, int], np.ndarray] = {}
    for source, indices in wanted.items():
        planes.update(_decode(source, kinds[source], indices))
    data = np.stack([planes[(f.source, f.index)].T for f in stack.frames], axis=2)
    meta = dict(ref.meta)
    meta.update(series_key=ref.key, reader="dicom", source=str(ref.sources[0]) if ref.sources else None)
    _note_volumes(meta, stack)
    return Volume(data=np.ascontiguousarray(data, dtype=np.float32), affine=stack.affine, meta=meta)


def _decode(source: Source, kind: str, indices: list[int]) -> dict[tuple[Source, int], np.ndarray]:
    """Decoded, rescaled 2D planes (rows, columns) for the wanted frames/tiles of one file."""
    try:
        with source.open() as fh:
            ds = pydicom.dcmread(fh)
        if _int(ds.get("SamplesPerPixel"), 1) != 1:
            raise LoadError(f"{source}: colour images (SamplesPerPixel > 1) are not supported")
        if kind == "enhanced":
            n = _int(ds.get("NumberOfFrames"), 1) or 1
            if len(set(indices)) == n:
                stack = ds.pixel_array.reshape(n, int(ds.Rows), int(ds.Columns))
                raw = {i: stack[i] for i in indices}
            else:
                raw = {i: pixel_array(ds, index=i) for i in indices}
            out = {}
            for i, plane in raw.items():
                slope, intercept = _frame_rescale(ds, i)
                out[(source, i)] = plane.astype(np.float32) * np.float32(slope) + np.float32(intercept)
            return out
        image = np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32)
    except LoadError:
        raise
    except Exception as exc:  # truncated data, unsupported codec, corrupt fragments ...
        raise LoadError(f"{source}: cannot decode pixel data ({_reason(exc)})") from exc
    if kind == "classic":
        if image.ndim != 2:
            raise LoadError(f"{source}: multi-frame image without functional groups is not supported")
        return {(source, 0): image}
    n = _mosaic_count(ds) or 1
    per_side = math.ceil(math.sqrt(n))
    rows, cols = int(ds.Rows) // per_side, int(ds.Columns) // per_side
    tiles = {}
    for t in indices:
        top, left = (t // per_side) * rows, (t % per_side) * cols
        tiles[(source, t)] = image[top : top + rows, left : left + cols]
    return tiles


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class DicomReader:
    """The built-in DICOM reader (registered by ``plugins.readers``)."""

    name = "dicom"

    def sniff(self, source: Source, head: bytes) -> bool:
        """DICOM Part 10 files are recognised by content: 128-byte preamble then ``DICM``."""
        return len(head) >= 132 and head[128:132] == b"DICM"

    def scan_file(self, source: Source, *, with_patient_age: bool = False) -> DicomRecord:
        return record_from_header(source, *read_header(source), with_patient_age=with_patient_age)

    def group(self, records: list[DicomRecord]) -> list[SeriesRef]:
        return group_records(records)

    def load(self, ref: SeriesRef) -> Volume:
        return load_series(ref)
