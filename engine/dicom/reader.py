"""Grouping DICOM records into series, loading a series into a Volume, and the reader plugin."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale, pixel_array

from ..discover import LoadError, SeriesRef, Source, sanitise_key
from ..geometry import LPS_TO_RAS, Volume, affine_problem, check_affine, orientation_name
from .frames import (
    VOLUME_RULE,
    DicomRecord,
    as_int,
    frame_rescale,
    mosaic_count,
    pixel_bytes_needed,
    pixel_size_problem,
    read_header,
    record_from_header,
)
from .stack import Stack, StackError, frame_names, plan_stack

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
                f"modality {'/'.join(non_mr) or 'missing'} is not MR: {frame_names([f for r in recs for f in r.frames])}"
            )
        kinds = sorted({r.kind for r in recs})
        meta = dict(first.meta)
        meta.update(kind="/".join(kinds), n_files=len(recs))
        try:
            stack = plan_stack([f for r in recs for f in r.frames])
            dims = (stack.frames[0].cols, stack.frames[0].rows, stack.n_slices)
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
    """A best-effort name for a series whose stack failed; "unknown" for unusable vectors."""
    if iop is None:
        return "unknown"
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3], iop[3:]
    lps[:3, 2] = np.cross(iop[:3], iop[3:])
    if affine_problem(lps):
        return "unknown"
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
        raise StackError(f"series {ref.key}: {exc}") from exc
    kinds = {r.source: r.kind for r in records}
    wanted: dict[Source, list[int]] = defaultdict(list)
    for f in stack.frames:
        wanted[f.source].append(f.index)
    planes: dict[tuple[Source, int], np.ndarray] = {}
    for source, indices in wanted.items():
        planes.update(_decode(source, kinds[source], indices))
    data = _assemble([planes[(f.source, f.index)].T for f in stack.frames], stack)
    meta = dict(ref.meta)
    meta.update(series_key=ref.key, reader="dicom")
    meta.update(stack.notes)
    _note_volumes(meta, stack)
    check_affine(stack.affine, f"series {ref.key} ({frame_names(stack.frames)})")
    return Volume(data=data, affine=stack.affine, meta=meta)


def _assemble(slices: list[np.ndarray], stack: Stack) -> np.ndarray:
    """The (I, J, K) float32 array: the slices as they are, or interpolated along the normal."""
    if stack.resample is None:
        return np.ascontiguousarray(np.stack(slices, axis=2), dtype=np.float32)
    out = np.empty((*slices[0].shape, len(stack.resample)), dtype=np.float32)
    for j, (k0, k1, w) in enumerate(stack.resample):
        out[:, :, j] = (1.0 - w) * slices[k0] + w * slices[k1]
    return out


def _check_pixel_size(source: Source, ds: pydicom.Dataset) -> None:
    """Uncompressed pixel data must match Rows x Columns x frames: a short element cannot fill
    the grid, and a whole row or more beyond it (not just the even-length pad byte) means the
    header's dimensions are not the data's."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None or ts.is_compressed or "PixelData" not in ds:
        return
    held, needed = len(ds.PixelData), pixel_bytes_needed(ds)
    row = int(ds.Columns) * (as_int(ds.get("SamplesPerPixel"), 1) or 1) * (as_int(ds.get("BitsAllocated"), 16) or 16) // 8
    if held < needed or held - needed >= max(row, 2):
        raise LoadError(f"{source}: {pixel_size_problem(held, ds)}")


def _decode(source: Source, kind: str, indices: list[int]) -> dict[tuple[Source, int], np.ndarray]:
    """Decoded, rescaled 2D planes (rows, columns) for the wanted frames/tiles of one file."""
    try:
        with source.open() as fh:
            ds = pydicom.dcmread(fh)
        if as_int(ds.get("SamplesPerPixel"), 1) != 1:
            raise LoadError(f"{source}: colour images (SamplesPerPixel > 1) are not supported")
        _check_pixel_size(source, ds)
        if kind == "enhanced":
            n = as_int(ds.get("NumberOfFrames"), 1) or 1
            if len(set(indices)) == n:
                stack = ds.pixel_array.reshape(n, int(ds.Rows), int(ds.Columns))
                raw = {i: stack[i] for i in indices}
            else:
                raw = {i: pixel_array(ds, index=i) for i in indices}
            out = {}
            for i, plane in raw.items():
                slope, intercept = frame_rescale(ds, i)
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
    n = mosaic_count(ds) or 1
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
