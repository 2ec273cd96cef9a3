"""One OME-Zarr image per series (NGFF 0.5, Zarr v3), with ``labels/`` for the mask outputs.

NGFF 0.5 places an image by scale and translation only. The native grid is reoriented (axis
flips and transposes, no resampling) to the closest RAS-aligned order and written as (z, y, x) =
(S, A, R): scale is the voxel spacing and translation the world position of the first voxel's
centre, so napari overlays image and labels in RAS mm. For an axis-aligned series this is exact;
for an oblique one NGFF cannot hold the rotation, so the same scale/translation is written (the
nearest axis-aligned placement, data unresampled) and ``attrs.mrfm`` records the full affine, the
flag ``axis_aligned: false`` and the largest corner displacement in mm.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import zarr

from engine import ExportContext, InputError, affine_of, hex_rgb

NGFF_VERSION = "0.5"
_AXES = [{"name": n, "type": "space", "unit": "millimeter"} for n in ("z", "y", "x")]


def to_ras_order(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose (I, J, K) data to the closest RAS axis order; returns (data, its affine)."""
    ornt = nib.orientations.io_orientation(affine)
    xform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    out = nib.orientations.apply_orientation(data, xform)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(xform, data.shape)


def ngff_placement(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[list[float], list[float], float]:
    """(scale, translation) in (z, y, x) order for a RAS-ordered grid, and the worst corner error in mm."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    origin = affine[:3, 3]
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    exact = affine[:3, :3] @ corners + origin[:, None]
    approx = spacing[:, None] * corners + origin[:, None]
    error = float(np.abs(exact - approx).max())
    return spacing[::-1].tolist(), origin[::-1].tolist(), error


def _multiscales(name: str, scale: list[float], translation: list[float]) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "axes": _AXES,
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": scale},
                        {"type": "translation", "translation": translation},
                    ],
                }
            ],
        }
    ]


def _write_array(group: zarr.Group, data: np.ndarray) -> None:
    chunks = tuple(min(64, s) for s in data.shape)
    arr = group.create_array(
        "0", shape=data.shape, dtype=data.dtype, chunks=chunks, fill_value=0, dimension_names=("z", "y", "x")
    )
    arr[...] = data


class OmeZarrExporter:
    name = "ome-zarr"
    description = "an NGFF 0.5 image per series with labels/ for masks (scale and translation from the geometry)"
    version = "1"

    def export_series(self, ctx: ExportContext, key: str) -> list[Path]:
        attrs = ctx.attrs(key)
        affine = affine_of(attrs)
        shape = tuple((attrs.get("geometry") or {}).get("shape") or ())
        volume = ctx.volume(key)
        image = np.asarray(volume.data, dtype=np.float32)
        if image.shape != shape:
            raise InputError(f"the source volume's shape {image.shape} differs from the stored grid {shape}")
        data, ras_affine = to_ras_order(image, affine)
        scale, translation, error = ngff_placement(ras_affine, data.shape)
        path = ctx.path(f"{key}.ome.zarr")
        if path.exists():
            shutil.rmtree(path)
        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        _write_array(root, data.transpose(2, 1, 0))
        lo, hi = (float(v) for v in np.percentile(data, [0.5, 99.5])) if data.size else (0.0, 1.0)
        root.update_attributes(
            {
                "ome": {
                    "version": NGFF_VERSION,
                    "multiscales": _multiscales(attrs.get("description") or key, scale, translation),
                    "omero": {
                        "channels": [
                            {
                                "window": {"start": lo, "end": hi, "min": float(data.min()), "max": float(data.max())},
                                "color": "FFFFFF",
                                "active": True,
                                "label": "image",
                            }
                        ],
                        "rdefs": {"model": "greyscale"},
                    },
                },
                "mrfm": {
                    "series_key": key,
                    "study_uid": attrs.get("study_uid"),
                    "series_uid": attrs.get("series_uid"),
                    "frame": "world = RAS+ mm; array axes (z, y, x) = (S, A, R) after reorientation",
                    "native_affine": affine.tolist(),
                    "affine": ras_affine.tolist(),
                    "axis_aligned": error < 1e-3,
                    "max_placement_error_mm": error,
                },
            }
        )
        names = []
        labels_group = None
        for head, output, meta in ctx.outputs(key, ["mask"]):
            mask = np.asarray(ctx.read(key, head, output))
            if mask.shape != shape:
                continue
            labels_group = labels_group or root.create_group("labels")
            name = f"{head}_{output}"
            g = labels_group.create_group(name)
            _write_array(g, to_ras_order(mask, affine)[0].transpose(2, 1, 0))
            g.update_attributes(
                {
                    "ome": {
                        "version": NGFF_VERSION,
                        "multiscales": _multiscales(name, scale, translation),
                        "image-label": _image_label(meta),
                    },
                    "mrfm": {"head": head, "head_version": meta.get("head_version"), "output": output},
                }
            )
            names.append(name)
        if labels_group is not None:
            labels_group.update_attributes({"ome": {"version": NGFF_VERSION, "labels": names}})
        return [path]


def _image_label(meta: dict[str, Any]) -> dict[str, Any]:
    labels, colors = list(meta.get("labels") or []), list(meta.get("colors") or [])
    out: dict[str, Any] = {
        "source": {"image": "../../"},
        "properties": [{"label-value": i, "name": n} for i, n in enumerate(labels) if i > 0],
    }
    rgba = [{"label-value": i, "rgba": [*rgb, 255]} for i, c in enumerate(colors) if i > 0 and (rgb := hex_rgb(c))]
    if rgba:
        out["colors"] = rgba
    return out
