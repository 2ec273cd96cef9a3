"""NIfTI series: one file is one series. Loaded with nibabel; the affine is nibabel's (sform when
set, else qform), which is already voxel -> RAS mm.

3D images load as they are; 4D images load their first volume (``meta["volumes"]`` gives the
count); images with more than four dimensions are rejected.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .discover import LoadError, SeriesRef, Source, sanitise_key
from .geometry import Volume, orientation_name

SUFFIXES = (".nii", ".nii.gz")


@dataclass
class NiftiRecord:
    source: Source
    shape: tuple[int, ...]
    affine: np.ndarray
    description: str


def _is_nifti_name(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def series_key(source: Source) -> str:
    """File name plus a short hash of where it lives, stable across scans of the same place."""
    where = str(Path(source.path).resolve()) + (f"!{source.member}" if source.member else "")
    digest = hashlib.sha1(where.encode()).hexdigest()[:8]
    return sanitise_key(f"{_stem(source.name)}-{digest}")


def read_image(source: Source) -> nib.Nifti1Image | nib.Nifti2Image:
    """Open a NIfTI image lazily (paths) or from memory (zip members)."""
    if source.member is None:
        return nib.load(str(source.path))
    data = source.read_bytes()
    if source.member.lower().endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return nib.Nifti1Image.from_bytes(data)
    except Exception:
        return nib.Nifti2Image.from_bytes(data)


def _check_ndim(source: Source, shape: tuple[int, ...]) -> None:
    if len(shape) < 3 and len(shape) != 2:
        raise LoadError(f"{source}: NIfTI image has {len(shape)} dimension(s); need 3 or 4")
    if len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise LoadError(f"{source}: NIfTI image has {len(shape)} dimensions {shape}; at most 4 are supported")


class NiftiReader:
    """The built-in NIfTI reader (registered by ``plugins.readers``)."""

    name = "nifti"

    def sniff(self, source: Source, head: bytes) -> bool:
        return _is_nifti_name(source.name)

    def scan_file(self, source: Source, *, with_patient_age: bool = False) -> NiftiRecord:
        img = read_image(source)
        descrip = img.header.get("descrip")
        text = descrip.item().decode("latin-1", "replace").strip("\x00 ") if descrip is not None else ""
        return NiftiRecord(source, tuple(int(s) for s in img.shape), np.asarray(img.affine), text)

    def group(self, records: list[NiftiRecord]) -> list[SeriesRef]:
        refs = []
        for rec in records:
            problems = []
            try:
                _check_ndim(rec.source, rec.shape)
            except LoadError as exc:
                problems.append(str(exc))
            shape3 = tuple(rec.shape[:3]) + (1,) * (3 - len(rec.shape[:3]))
            meta = {"volumes": rec.shape[3] if len(rec.shape) > 3 else 1}
            if meta["volumes"] > 1:
                meta["volume_rule"] = "first volume of the 4D image"
            refs.append(
                SeriesRef(
                    key=series_key(rec.source),
                    reader=self.name,
                    study_uid="",
                    series_uid="",
                    modality="MR",
                    description=rec.description,
                    sources=[rec.source],
                    dims=shape3,
                    n_slices=shape3[2],
                    orientation=orientation_name(rec.affine),
                    problems=problems,
                    meta=meta,
                )
            )
        return refs

    def load(self, ref: SeriesRef) -> Volume:
        source = ref.sources[0]
        try:
            img = read_image(source)
        except Exception as exc:
            raise LoadError(f"{source}: unreadable NIfTI file ({exc})") from exc
        shape = tuple(int(s) for s in img.shape)
        _check_ndim(source, shape)
        try:
            if len(shape) == 2:
                data = np.asarray(img.dataobj, dtype=np.float32)[:, :, None]
            elif len(shape) == 3:
                data = np.asarray(img.dataobj, dtype=np.float32)
            else:  # 4D (or 5D+ with singleton trailing axes): first volume only
                data = np.asarray(img.dataobj[:, :, :, 0], dtype=np.float32).reshape(shape[:3])
        except Exception as exc:
            raise LoadError(f"{source}: cannot read NIfTI voxel data ({exc})") from exc
        meta = dict(ref.meta)
        meta.update(series_key=ref.key, reader=self.name, source=str(source))
        return Volume(data=np.ascontiguousarray(data), affine=np.asarray(img.affine), meta=meta)
