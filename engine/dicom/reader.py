"""Grouping DICOM records into series, loading a series into a Volume, and the reader plugin."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_rescale, pixel_array
from pydicom.uid import UID

from ..discover import Source
from ..errors import InputError, LoadError, one_line
from ..memory_budget import series_need
from ..series_ref import SeriesRef, sanitise_key
from ..geometry import LPS_TO_RAS, Volume, affine_problem, check_affine, orientation_name
from .frames import (
    VOLUME_RULE,
    DicomRecord,
    PixelPlan,
    as_int,
    mosaic_count,
    pixel_bytes_needed,
    pixel_size_problem,
    read_file_header,
    record_from_header,
)
from .codestream import check_fragments
from .deflated import DEFLATED, read_deflated
from .frames import _stored_syntax
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
                # what loading needs, so it reads pixel data and never a header again
                plan=[dataclasses.replace(r, meta={}) for r in recs],
                # every file's declared pixel data plus the float32 copies of the volume
                needs_bytes=series_need(sum(r.declared_bytes for r in recs), math.prod(dims)),
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
    """Decode a DICOM series into a float32 :class:`Volume` (see module docstring).

    The records come from the scan (``ref.plan``): each file's pixel data is read once and
    its header is not parsed again. A SeriesRef without them (built by hand) is scanned here.
    """
    records = ref.plan if ref.plan is not None else _read_records(ref)
    for rec in records:
        if rec.problems:
            raise LoadError(rec.problems[0])
        if rec.modality != "MR":
            raise LoadError(f"{rec.source}: modality {rec.modality or 'missing'} is not MR")
    try:
        stack = plan_stack([f for r in records for f in r.frames])
    except StackError as exc:
        raise StackError(f"series {ref.key}: {exc}") from exc
    by_source = {r.source: r for r in records}
    wanted: dict[Source, list[int]] = defaultdict(list)
    for f in stack.frames:
        wanted[f.source].append(f.index)
    if stack.resample is None:
        data = _assemble_in_place(stack, wanted, by_source)
    else:
        planes: dict[tuple[Source, int], np.ndarray] = {}
        for source, indices in wanted.items():
            planes.update(_decode(by_source[source], indices))
        data = _assemble([planes[(f.source, f.index)] for f in stack.frames], stack)
    meta = dict(ref.meta)
    meta.update(series_key=ref.key, reader="dicom")
    meta.update(stack.notes)
    _note_volumes(meta, stack)
    check_affine(stack.affine, f"series {ref.key} ({frame_names(stack.frames)})")
    return Volume(data=data, affine=stack.affine, meta=meta)


def _read_records(ref: SeriesRef) -> list[DicomRecord]:
    records = []
    for source in ref.sources:
        try:
            records.append(record_from_header(source, *read_file_header(source)))
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError) as exc:
            raise LoadError(f"{source}: unreadable DICOM header ({one_line(exc)})") from exc
    return _unique_instances(records)[0]


def _assemble_in_place(
    stack: Stack, wanted: dict[Source, list[int]], by_source: dict[Source, DicomRecord]
) -> np.ndarray:
    """The (I, J, K) float32 array, each file's planes copied in as it is decoded: the volume
    and one file's planes are held at once, never every plane and the volume besides."""
    f0 = stack.frames[0]
    data = np.empty((f0.cols, f0.rows, len(stack.frames)), dtype=np.float32)
    slots: dict[tuple[Source, int], list[int]] = defaultdict(list)
    for k, f in enumerate(stack.frames):
        slots[(f.source, f.index)].append(k)
    for source, indices in wanted.items():
        for key, plane in _decode(by_source[source], indices).items():
            for k in slots.pop(key, ()):
                data[:, :, k] = plane.T
    if slots:  # every slot is written, or the volume would hold uninitialised memory
        raise LoadError(f"{frame_names(stack.frames)}: {len(slots)} frame(s) were not decoded")
    return data


def _assemble(slices: list[np.ndarray], stack: Stack) -> np.ndarray:
    """The (I, J, K) float32 array from (rows, columns) planes: stacked as they are, or
    interpolated along the normal."""
    planes = np.stack(slices)  # (K, J, I)
    if stack.resample is not None:
        k0, k1, w = (np.array(v) for v in zip(*stack.resample))
        keep, take = (1.0 - w).astype(np.float32)[:, None, None], w.astype(np.float32)[:, None, None]
        planes = keep * planes[k0] + take * planes[k1]
    return np.ascontiguousarray(planes.transpose(2, 1, 0), dtype=np.float32)


def _decode(rec: DicomRecord, indices: list[int]) -> dict[tuple[Source, int], np.ndarray]:
    """Decoded, rescaled float32 planes (rows, columns) for the wanted frames/tiles of one file."""
    plan, source = rec.pixels, rec.source
    if plan is None:
        return _decode_with_header(source, rec.kind, indices)
    if plan.problem:
        raise LoadError(plan.problem)
    try:
        if rec.kind == "enhanced":
            stored = _frames(source, plan, sorted(set(indices)))
            by_index = {f.index: f for f in rec.frames}
            out = {}
            for i in indices:
                slope, intercept = by_index[i].rescale or (1.0, 0.0)
                out[(source, i)] = stored[i].astype(np.float32) * np.float32(slope) + np.float32(intercept)
            return out
        image = _rescaled(_frames(source, plan, None), plan)
    except LoadError:
        raise
    except Exception as exc:  # truncated data, unsupported codec, corrupt fragments ...
        raise LoadError(f"{source}: cannot decode pixel data ({one_line(exc)})") from exc
    if rec.kind == "classic":
        if plan.frames > 1:
            raise LoadError(f"{source}: multi-frame image without functional groups is not supported")
        return {(source, 0): image[0]}
    return _tiles(source, image[0], plan.mosaic or 1, indices)


def _rescaled(stored: Any, plan: PixelPlan) -> np.ndarray:
    """Stored values through the modality rescale, as pydicom's apply_rescale (float64 math)."""
    arr = np.stack([stored[i] for i in sorted(stored)])
    if plan.modality_lut is not None:
        holder = pydicom.Dataset()
        holder.ModalityLUTSequence = plan.modality_lut
        return np.asarray(apply_rescale(arr, holder), dtype=np.float32)
    if plan.rescale is not None:
        arr = arr.astype(np.float64) * plan.rescale[0]
        arr += plan.rescale[1]
    return np.asarray(arr, dtype=np.float32)


def _tiles(source: Source, image: np.ndarray, n: int, indices: list[int]) -> dict[tuple[Source, int], np.ndarray]:
    """Mosaic tiles as (rows, columns) planes: one reshape, no per-tile copies."""
    per_side = math.ceil(math.sqrt(n))
    rows, cols = image.shape[0] // per_side, image.shape[1] // per_side
    grid = image[: per_side * rows, : per_side * cols].reshape(per_side, rows, per_side, cols).swapaxes(1, 2)
    return {(source, t): grid[t // per_side, t % per_side] for t in indices}


_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _frames(source: Source, plan: PixelPlan, indices: list[int] | None) -> dict[int, np.ndarray]:
    """Stored values of the wanted frames (all when ``indices`` is None), each (rows, columns).

    Uncompressed little-endian integer data is read straight into numpy, only the bytes of the
    wanted frames; everything else goes through pydicom's decoders with the pixel module kept
    from the scan."""
    module = dict(plan.module)
    bits = int(module.get("BitsAllocated", 16))
    wanted = list(range(plan.frames)) if indices is None else indices
    if plan.transfer_syntax in _NATIVE_LE and not plan.encapsulated and bits in (8, 16, 32):
        dtype = np.dtype(f"<{'i' if module.get('PixelRepresentation') == 1 else 'u'}{bits // 8}")
        frame_bytes = plan.rows * plan.cols * dtype.itemsize
        first, last = min(wanted), max(wanted)
        with source.open() as fh:
            fh.seek(plan.offset + first * frame_bytes)
            raw = fh.read((last - first + 1) * frame_bytes)
        if len(raw) < (last - first + 1) * frame_bytes:
            raise LoadError(
                f"{source}: truncated pixel data ({len(raw)} bytes where {(last - first + 1) * frame_bytes} are needed)"
            )
        block = np.frombuffer(raw, dtype).reshape(-1, plan.rows, plan.cols)
        return {i: block[i - first] for i in wanted}
    ds = _pixel_dataset(source, plan)
    if indices is None or len(set(indices)) == plan.frames:
        arr = ds.pixel_array.reshape(plan.frames, plan.rows, plan.cols)
        return {i: arr[i] for i in wanted}
    return {i: pixel_array(ds, index=i) for i in wanted}


def _pixel_dataset(source: Source, plan: PixelPlan) -> pydicom.Dataset:
    """A dataset holding only the pixel module and the pixel bytes, for pydicom's decoders."""
    with source.open() as fh:
        fh.seek(plan.offset)
        raw = fh.read() if plan.length < 0 else fh.read(plan.length)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(plan.transfer_syntax)
    ds.Rows, ds.Columns = plan.rows, plan.cols
    for key, value in plan.module:
        setattr(ds, key, value)
    if plan.encapsulated and raw[-8:] == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00":
        raw = raw[:-8]  # the sequence delimiter is not part of the value
    if plan.encapsulated:
        check_fragments(source, raw, plan.rows, plan.cols, as_int(dict(plan.module).get("SamplesPerPixel"), 1) or 1)
    ds.PixelData = raw
    ds["PixelData"].VR = "OB" if plan.encapsulated else plan.pixel_vr
    ds["PixelData"].is_undefined_length = plan.encapsulated
    return ds


def _decode_with_header(source: Source, kind: str, indices: list[int]) -> dict[tuple[Source, int], np.ndarray]:
    """The whole file through pydicom, for files whose pixel data the scan could not locate."""
    try:
        ds = _read_whole(source)
        if as_int(ds.get("SamplesPerPixel"), 1) != 1:
            raise LoadError(f"{source}: colour images (SamplesPerPixel > 1) are not supported")
        if "PixelData" in ds and ds["PixelData"].is_undefined_length:
            check_fragments(source, ds.PixelData, int(ds.Rows), int(ds.Columns), 1)
        _check_pixel_size(source, ds)
        if kind == "enhanced":
            rec = record_from_header(source, ds)
            n = as_int(ds.get("NumberOfFrames"), 1) or 1
            if len(set(indices)) == n:
                stack = ds.pixel_array.reshape(n, int(ds.Rows), int(ds.Columns))
                raw = {i: stack[i] for i in indices}
            else:
                raw = {i: pixel_array(ds, index=i) for i in indices}
            out = {}
            for i, plane in raw.items():
                slope, intercept = rec.frames[i].rescale or (1.0, 0.0)
                out[(source, i)] = plane.astype(np.float32) * np.float32(slope) + np.float32(intercept)
            return out
        image = np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32)
    except InputError:  # LoadError, OverBudget: already say what and why
        raise
    except Exception as exc:  # truncated data, unsupported codec, corrupt fragments ...
        raise LoadError(f"{source}: cannot decode pixel data ({one_line(exc)})") from exc
    if kind == "classic":
        if image.ndim != 2:
            raise LoadError(f"{source}: multi-frame image without functional groups is not supported")
        return {(source, 0): image}
    return _tiles(source, image, mosaic_count(ds) or 1, indices)


def _read_whole(source: Source) -> pydicom.Dataset:
    """The whole file through pydicom; a Deflated one inflated within the budget."""
    with source.open() as fh:
        deflated = _stored_syntax(fh) == DEFLATED
        if not deflated:
            fh.seek(0)
            return pydicom.dcmread(fh)
    return read_deflated(source, stop_before_pixels=False)[0]


def _check_pixel_size(source: Source, ds: pydicom.Dataset) -> None:
    """Uncompressed pixel data must match Rows x Columns x frames (see frames._size_problem)."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None or ts.is_compressed or "PixelData" not in ds:
        return
    held, needed = len(ds.PixelData), pixel_bytes_needed(ds)
    row = (
        int(ds.Columns) * (as_int(ds.get("SamplesPerPixel"), 1) or 1) * (as_int(ds.get("BitsAllocated"), 16) or 16) // 8
    )
    if held < needed or held - needed >= max(row, 2):
        raise LoadError(f"{source}: {pixel_size_problem(held, ds)}")


class DicomReader:
    """The built-in DICOM reader (registered by ``plugins.readers``)."""

    name = "dicom"

    def sniff(self, source: Source, head: bytes) -> bool:
        """DICOM Part 10 files are recognised by content: 128-byte preamble then ``DICM``."""
        return len(head) >= 132 and head[128:132] == b"DICM"

    def scan_file(self, source: Source, *, with_patient_age: bool = False) -> DicomRecord:
        return record_from_header(source, *read_file_header(source), with_patient_age=with_patient_age)

    def group(self, records: list[DicomRecord]) -> list[SeriesRef]:
        return group_records(records)

    def load(self, ref: SeriesRef) -> Volume:
        return load_series(ref)
