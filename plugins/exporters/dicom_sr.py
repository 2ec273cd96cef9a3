"""Scores, values and boxes as a DICOM TID 1500 Measurement Report (highdicom Comprehensive 3D SR).

- scores and values: one measurement group (TID 1501) per output, one measurement per label;
- boxes: one volumetric ROI group (TID 1411) per box whose surface is the box's six faces as
  SCOORD3D polygons in the source Frame of Reference (LPS mm; the store's boxes are RAS mm),
  with its score; the group names the box's label or query as finding type;
- when a DICOM SEG of the series was exported into the same folder, it is evidence of the report
  and each of its segments gets a volumetric ROI group referencing it, with its volume in mm3.
Concept names for mrfm's outputs use the private coding scheme ``99MRFM``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from engine import ExportContext, SkipSeries, affine_of, is_safe_name

from ._dicom import LPS, identity, read_headers, uid

SCHEME = "99MRFM"
SERIES_NUMBER = 9200
_UCUM = {"mm3": "mm3", "ml": "mL", "mL": "mL", "cm3": "cm3", "mm": "mm", "cm": "cm", "s": "s", "ms": "ms", "%": "%"}


def box_faces(box_ras: np.ndarray) -> list[np.ndarray]:
    """The six faces of an (x0, y0, z0, x1, y1, z1) RAS box as closed LPS polygons (5 points each)."""
    lo, hi = np.minimum(box_ras[:3], box_ras[3:]), np.maximum(box_ras[:3], box_ras[3:])
    faces = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for end in (lo[axis], hi[axis]):
            pts = []
            for a, b in ((0, 0), (1, 0), (1, 1), (0, 1), (0, 0)):
                p = np.empty(3)
                p[axis], p[u], p[v] = end, (lo, hi)[a][u], (lo, hi)[b][v]
                pts.append(p * LPS)
            faces.append(np.asarray(pts, dtype=np.float64))
    return faces


def _concept(meaning: str, *parts: Any) -> Any:
    from highdicom.sr import CodedConcept  # heavy: loaded when a DICOM export runs, not when exporters register

    code = "MRFM" + hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10].upper()
    return CodedConcept(value=code, scheme_designator=SCHEME, meaning=str(meaning)[:64])


def _unit(units: str | None) -> Any:
    from highdicom.sr import CodedConcept  # heavy: loaded when a DICOM export runs, not when exporters register
    from pydicom.sr.codedict import codes  # heavy: loaded when a DICOM export runs, not when exporters register

    u = _UCUM.get(str(units or "").strip())
    return CodedConcept(value=u, scheme_designator="UCUM", meaning=u) if u else codes.UCUM.NoUnits


class DicomSrExporter:
    name = "dicom-sr"
    description = "scores, values and boxes (SCOORD3D, LPS) as a TID 1500 Measurement Report; references the SEG"
    version = "1"

    def export_series(self, ctx: ExportContext, key: str) -> list[Path]:
        items = list(ctx.outputs(key, ["scores", "value", "boxes"]))
        segs = [pydicom.dcmread(p) for p in ctx.exported("dicom-seg", key) if p.suffix == ".dcm"]
        if not items and not segs:
            raise SkipSeries("no scores, values, boxes or exported SEG")
        headers = read_headers(ctx, key)
        sr = build_report(ctx, key, headers, items, segs)
        path = ctx.series_file(key, "sr_measurements.dcm")
        sr.save_as(path)
        return [path]


def build_report(
    ctx: ExportContext, key: str, headers: list[Any], items: list[tuple[str, str, dict[str, Any]]], segs: list[Any]
) -> Any:
    import highdicom as hd  # heavy: loaded when a DICOM export runs, not when exporters register
    from pydicom.sr.codedict import codes  # heavy: loaded when a DICOM export runs, not when exporters register

    attrs = ctx.attrs(key)
    ident = identity(ctx, key)
    frame_uid = headers[0].FrameOfReferenceUID
    source_series = hd.sr.SourceSeriesForSegmentation(headers[0].SeriesInstanceUID)
    groups: list[Any] = []

    def algo(head: str, meta: dict[str, Any]) -> Any:
        version = str(meta.get("head_version") or (attrs.get("heads") or {}).get(head, {}).get("version") or "0")
        return hd.sr.AlgorithmIdentification(
            name=f"mrfm {head}"[:64], version=version[:64], parameters=[ident["model_name"]]
        )

    def tracking(*parts: Any) -> Any:
        return hd.sr.TrackingIdentifier(
            uid=uid("sr-track", attrs.get("series_uid"), *parts), identifier="/".join(map(str, parts))[:64]
        )

    for head, output, meta in items:
        value = ctx.read(key, head, output)
        labels = list(meta.get("labels") or [])
        if meta["kind"] in ("scores", "value"):
            values = np.asarray(value, dtype=np.float64).reshape(-1)
            unit = codes.UCUM.NoUnits if meta["kind"] == "scores" else _unit(meta.get("units"))
            measurements = [
                hd.sr.Measurement(
                    name=_concept(f"{output}: {labels[i] if i < len(labels) else i}", head, output, i),
                    value=float(v),
                    unit=unit,
                    algorithm_id=algo(head, meta),
                )
                for i, v in enumerate(values)
            ]
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking(head, output), algorithm_id=algo(head, meta), measurements=measurements
                )
            )
            continue
        world = np.asarray(value["world"], dtype=np.float64).reshape(-1, 6)
        names = value.get("queries") if value.get("queries") is not None else value.get("labels")
        for n, box in enumerate(world):
            label = str(names[n]) if names is not None else (labels[0] if labels else output)
            surface = hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
                graphic_data=box_faces(box),
                frame_of_reference_uid=frame_uid,
                source_series=source_series,
            )
            score = hd.sr.Measurement(
                name=_concept(f"{output}: score", head, output, "score"),
                value=float(value["scores"][n]),
                unit=codes.UCUM.NoUnits,
            )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking(head, output, n),
                    referenced_volume_surface=surface,
                    finding_type=_concept(label, head, output, "finding", label),
                    algorithm_id=algo(head, meta),
                    measurements=[score],
                )
            )
    for seg in segs:
        groups += _segment_groups(ctx, key, seg, tracking)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid("device", ident["model_fingerprint"]),
            name="mrfm",
            manufacturer_name=ident["manufacturer"],
            model_name=ident["model_name"],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.MRIUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    fp = [(h, (attrs.get("heads") or {}).get(h, {}).get("fingerprint")) for h, _, _ in items]
    return hd.sr.Comprehensive3DSR(
        evidence=[*headers, *segs],
        content=report,
        series_instance_uid=uid("sr-series", attrs.get("series_uid"), fp),
        series_number=SERIES_NUMBER,
        sop_instance_uid=uid("sr", attrs.get("series_uid"), fp, [s.SOPInstanceUID for s in segs]),
        instance_number=1,
        manufacturer=ident["manufacturer"],
        is_complete=True,
        series_description="mrfm measurements",
        software_versions=ident["software_versions"],
    )


def _segment_groups(ctx: ExportContext, key: str, seg: Any, tracking: Any) -> list[Any]:
    """A volumetric ROI group per segment of an exported SEG, with its volume from the stored mask."""
    import highdicom as hd  # heavy: loaded when a DICOM export runs, not when exporters register
    from pydicom.sr.codedict import codes  # heavy: loaded when a DICOM export runs, not when exporters register

    head, output = _seg_output(seg)
    if head is None:
        return []
    try:
        mask = np.asarray(ctx.read(key, head, output))
        meta = dict(ctx.store.root["series"][key][head][output].attrs)
    except KeyError:
        return []
    voxel_mm3 = abs(float(np.linalg.det(affine_of(ctx.attrs(key), meta)[:3, :3])))
    groups = []
    present = {
        int(per.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for per in seg.get("PerFrameFunctionalGroupsSequence", [])
    }
    for item in seg.SegmentSequence:
        n = int(item.SegmentNumber)
        if n not in present:  # an empty segment has no frame to reference
            continue
        volume = float((mask == n).sum()) * voxel_mm3
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(head, output, "segment", n),
                referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=n),
                finding_type=_concept(str(item.SegmentLabel), head, output, "segment", n),
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=volume,
                        unit=hd.sr.CodedConcept(value="mm3", scheme_designator="UCUM", meaning="cubic millimeter"),
                    )
                ],
            )
        )
    return groups


def _seg_output(seg: Any) -> tuple[str | None, str | None]:
    """(head, output) a SEG was made from: its content description reads 'mrfm HEAD/OUTPUT VERSION'."""
    text = str(seg.get("ContentDescription") or "")
    if not text.startswith("mrfm ") or "/" not in text:
        return None, None
    head, _, rest = text[5:].partition("/")
    output = rest.split(" ")[0]
    # read from a file in the out folder: only plain names are looked up in the store
    return (head, output) if is_safe_name(head) and is_safe_name(output) else (None, None)
