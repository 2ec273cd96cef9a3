"""Masks as NIfTI-1 (.nii.gz) with the stored affine; labels, colours and provenance in a JSON sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from engine import ExportContext, affine_of


class NiftiExporter:
    name = "nifti"
    description = "mask outputs as .nii.gz (stored affine, sform and qform: scanner) with a labels sidecar JSON"
    version = "1"

    def export_series(self, ctx: ExportContext, key: str) -> list[Path]:
        attrs, files = ctx.attrs(key), []
        for head, output, meta in ctx.outputs(key, ["mask"]):
            mask = np.asarray(ctx.read(key, head, output))
            affine = affine_of(attrs, meta)
            img = nib.Nifti1Image(mask, affine)
            img.set_sform(affine, code=1)  # scanner: the affine is the scanner's RAS+ frame
            img.set_qform(affine, code=1)
            img.header.set_xyzt_units("mm")
            image, sidecar_path = (
                ctx.series_file(key, f"{head}_{output}.nii.gz"),
                ctx.series_file(key, f"{head}_{output}.json"),
            )
            nib.save(img, image)
            labels = meta.get("labels") or []
            colors = meta.get("colors") or []
            sidecar = {
                "series_key": key,
                "study_uid": attrs.get("study_uid"),
                "series_uid": attrs.get("series_uid"),
                "head": head,
                "head_version": meta.get("head_version"),
                "output": output,
                "run_id": (attrs.get("heads") or {}).get(head, {}).get("run_id") or attrs.get("run_id"),
                "labels": {str(i): name for i, name in enumerate(labels)},
                "colors": {str(i): c for i, c in enumerate(colors)},
                "description": meta.get("description"),
                "frame": "RAS+ mm; the sform maps voxel (i, j, k) to world (nibabel convention)",
            }
            sidecar_path.write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
            files += [image, sidecar_path]
        return files
