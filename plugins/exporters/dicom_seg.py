"""Mask outputs as DICOM Segmentation (highdicom): one SEG per mask, frames on the source frames.

Each source frame's pixel centres (from its ImagePositionPatient, orientation and spacing, LPS)
are mapped into the stored native grid (voxel -> RAS affine), so transposes, flipped axes and
slice order come out right for axial, sagittal, coronal, oblique and enhanced sources alike.
Classic series reference every instance; an enhanced series references the first multi-frame
instance (InstanceNumber order) whose frames lie on the grid — the volume the loader kept.
A label map (integer mask) becomes a BINARY SEG with one segment per non-background label; a
floating mask (probabilities) becomes one FRACTIONAL segment.
"""

from __future__ import annotations

import re
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np

from engine import ExportContext, InputError, affine_of, hex_rgb

from ._dicom import Frame, frames_of, identity, read_headers, sample_plane, uid

GRID_TOLERANCE = 0.1  # voxels: a frame's pixel centres must lie this close to stored grid points
SERIES_NUMBER = 9100


class DicomSegExporter:
    name = "dicom-seg"
    description = "mask outputs as DICOM Segmentation referencing the source instances (highdicom)"
    version = "1"

    def export_series(self, ctx: ExportContext, key: str) -> list[Path]:
        masks = list(ctx.outputs(key, ["mask"]))
        if not masks:
            return []
        headers = read_headers(ctx, key)
        files = []
        for n, (head, output, meta) in enumerate(masks):
            seg = build_segmentation(ctx, key, headers, head, output, meta, n)
            path = ctx.series_file(key, f"seg_{head}_{output}.dcm")
            seg.save_as(path)
            files.append(path)
        return files


def source_frames(
    headers: list[Any], mask: np.ndarray, affine: np.ndarray
) -> tuple[list[Any], list[Frame], list[np.ndarray]]:
    """(source_images for highdicom, their frames, the mask plane of each frame).

    A multi-frame instance holding several frames at one position (echoes, time points) keeps the
    first frame at each position: a SEG frame stands for a position, not for each echo.
    """
    multi = [ds for ds in headers if "PerFrameFunctionalGroupsSequence" in ds]
    candidates = [[_shared_groups(ds)] for ds in multi] if multi else [headers]
    worst = None
    for images in candidates:
        frames = [f for ds in images for f in frames_of(ds)]
        if multi:
            seen: set[tuple[float, ...]] = set()
            frames = [f for f in frames if (p := tuple(np.round(f.position, 3))) not in seen and not seen.add(p)]
        planes, ok = [], True
        for frame in frames:
            plane, err, inside = sample_plane(mask, affine, frame)
            if err > GRID_TOLERANCE or not inside:
                ok, worst = False, (err, inside)
                break
            planes.append(plane)
        if ok:
            return images, frames, planes
    raise InputError(
        f"the source frames do not lie on the stored grid (max {worst[0]:.2f} voxel off, "
        f"inside: {worst[1]}); the series was resampled at load, so a SEG cannot reference its frames"
    )


def _shared_groups(ds: Any) -> Any:
    """A header copy whose pixel measures and orientation are shared functional groups.

    highdicom reads them from the shared groups only; some scanners (e.g. Siemens XA) repeat them
    per frame. Identical per-frame values are moved to the shared group of an in-memory copy (the
    file and its UIDs are untouched); differing ones cannot be one SEG and fail the series.
    """

    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    missing = [n for n in ("PixelMeasuresSequence", "PlaneOrientationSequence") if shared is None or n not in shared]
    if not missing:
        return ds
    ds = deepcopy(ds)
    if shared is None:
        from pydicom.dataset import Dataset  # heavy: loaded when a DICOM export runs, not when exporters register
        from pydicom.sequence import Sequence  # heavy: loaded when a DICOM export runs, not when exporters register

        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    shared = ds.SharedFunctionalGroupsSequence[0]
    for name in missing:
        values = {repr(per[name].value) for per in ds.PerFrameFunctionalGroupsSequence if name in per}
        if len(values) != 1:
            raise InputError(f"the source's {name} differs between frames; one SEG cannot hold them")
        setattr(shared, name, ds.PerFrameFunctionalGroupsSequence[0][name].value)
        for per in ds.PerFrameFunctionalGroupsSequence:
            if name in per:
                del per[name]
    return ds


def build_segmentation(
    ctx: ExportContext, key: str, headers: list[Any], head: str, output: str, meta: dict[str, Any], index: int = 0
) -> Any:
    import highdicom as hd  # heavy: loaded when a DICOM export runs, not when exporters register
    from pydicom.sr.codedict import codes  # heavy: loaded when a DICOM export runs, not when exporters register

    attrs = ctx.attrs(key)
    mask = np.asarray(ctx.read(key, head, output))
    images, frames, planes = source_frames(headers, mask, affine_of(attrs, meta))
    one_per_frame = len(frames) == sum(int(ds.get("NumberOfFrames") or 1) for ds in images)
    ident = identity(ctx, key)
    version = str(meta.get("head_version") or (attrs.get("heads") or {}).get(head, {}).get("version") or "0")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"mrfm {head}"[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=version[:64],
        source="mrfm",
        parameters={
            "model": ident["model_name"],
            "model_fingerprint": ident["model_fingerprint"][:64],
            "output": output,
        },
    )
    labels = list(meta.get("labels") or [])
    colors = list(meta.get("colors") or [])
    fractional = np.issubdtype(mask.dtype, np.floating)
    if fractional:
        stack = np.stack(planes).astype(np.float32)
        segments = [(1, labels[-1] if labels else output, colors[-1] if colors else None)]
    else:
        numbers = list(range(1, max(len(labels), int(mask.max()) + 1)))
        stack = (
            np.stack([np.stack(planes)[..., None] == np.asarray(numbers)])
            .reshape(len(planes), *planes[0].shape, len(numbers))
            .astype(np.uint8)
        )
        segments = [
            (n, labels[n] if n < len(labels) else f"label {n}", colors[n] if n < len(colors) else None) for n in numbers
        ]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=str(label)[:64],
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.SCT.Lesion if "lesion" in str(label).lower() else codes.cid7150.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*rgb) if (rgb := hex_rgb(color)) else None,
        )
        for n, label, color in segments
    ]
    fp = (attrs.get("heads") or {}).get(head, {}).get("fingerprint")
    return hd.seg.Segmentation(
        source_images=images,
        pixel_array=stack,
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=uid("seg-series", attrs.get("series_uid"), head, output, fp),
        series_number=SERIES_NUMBER + index,
        sop_instance_uid=uid("seg", attrs.get("series_uid"), head, output, fp),
        instance_number=1,
        manufacturer=ident["manufacturer"],
        manufacturer_model_name=ident["model_name"],
        software_versions=ident["software_versions"],
        device_serial_number=ident["serial"],
        content_label=re.sub(r"[^A-Z0-9_ ]", "_", f"MRFM_{head}".upper())[:16],
        content_description=f"mrfm {head}/{output} {version}"[:64],
        series_description=f"mrfm {head} {output}"[:64],
        omit_empty_frames=not all(not p.any() for p in planes),
        # a subset of a multi-frame source's frames: highdicom matches them to source frames by position
        plane_positions=None
        if one_per_frame
        else [hd.PlanePositionSequence("PATIENT", f.position.tolist()) for f in frames],
        pixel_measures=None
        if one_per_frame
        else hd.PixelMeasuresSequence(pixel_spacing=list(frames[0].spacing), slice_thickness=_thickness(images[0])),
        plane_orientation=None
        if one_per_frame
        else hd.PlaneOrientationSequence("PATIENT", [*frames[0].row_dir.tolist(), *frames[0].col_dir.tolist()]),
    )


def _thickness(ds: Any) -> float | None:
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    item = shared.get("PixelMeasuresSequence") if shared is not None else None
    value = item[0].get("SliceThickness") if item else ds.get("SliceThickness")
    return float(value) if value not in (None, "") else None
