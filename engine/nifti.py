"""NIfTI series: one file is one series. Loaded with nibabel; the affine is nibabel's (sform when
set, else qform), which is already voxel -> RAS mm.

3D images load as they are; 4D images load their first volume (``meta["volumes"]`` gives the
count); images with more than four dimensions are rejected.

Geometry is checked before anything uses it (:func:`geometry_problem`): the sform, when it is the
affine in use, must be finite; otherwise the qform's quaternion, offset and the voxel sizes in
pixdim must be finite and pixdim positive (nibabel would silently replace a zero or negative
size with 1 or its absolute value, which places the anatomy somewhere else). The resulting
affine must pass :func:`engine.geometry.check_affine`. A failure is a
:class:`~engine.errors.GeometryError` naming the file and the rule.

Series keys come from content, never from the file name (which often carries the patient's
name): ``nifti-`` and a hash of the header and samples of the stored bytes (:func:`content_key`).
The header's free-text ``descrip`` is not passed on: it cannot be checked for identifiers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from . import memory_budget
from .bounded_read import inflate
from .discover import Source
from .errors import GeometryError, LoadError
from .series_ref import SeriesRef, sanitise_key
from .geometry import Volume, affine_problem, orientation_name

SUFFIXES = (".nii", ".nii.gz")


@dataclass
class NiftiRecord:
    source: Source
    shape: tuple[int, ...]
    affine: np.ndarray
    digest: str = ""
    problem: str | None = None  # why the geometry is unusable, found at scan time
    stored_bytes: int = 0  # the loaded volume's voxels as stored (header dims x datatype size)


def _is_nifti_name(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


KEY_SAMPLES = 16  # blocks of the stored file hashed into the key, spread over its length
KEY_BLOCK = 4096


def content_key(source: Source, header: bytes) -> str:
    """``nifti-`` and 12 hex digits of a SHA-1 over the header, the stored size and
    ``KEY_SAMPLES`` blocks spread over the stored bytes: stable across runs and places, different
    for different images, and reading a few KiB rather than the whole file."""
    digest = hashlib.sha1(header)
    with source.open() as fh:
        fh.seek(0, 2)
        size = fh.tell()
        digest.update(str(size).encode())
        for i in range(KEY_SAMPLES):
            fh.seek(size * i // KEY_SAMPLES)
            digest.update(fh.read(KEY_BLOCK))
    return sanitise_key("nifti-" + digest.hexdigest()[:12])


GZIP_MAGIC = b"\x1f\x8b"
HEADER_READ_MAX = 1024**2  # header and extensions read for a scan of a zip member (kilobytes in practice)


def read_image(source: Source) -> nib.Nifti1Image | nib.Nifti2Image:
    """Open a NIfTI image lazily (paths) or from memory (zip members), for its header.

    A zip member is read only as far as its header and extensions: the voxels of a large or
    hostile member are never inflated at scan time."""
    if source.member is None:
        return nib.load(str(source.path))
    with source.open() as fh:
        head = fh.read(2)
        stream = gzip.GzipFile(fileobj=fh) if head == GZIP_MAGIC else fh
        fh.seek(0)
        return _from_bytes(stream.read(HEADER_READ_MAX))


def _from_bytes(data: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
    try:
        return nib.Nifti1Image.from_bytes(data)
    except Exception:
        return nib.Nifti2Image.from_bytes(data)


def voxel_image(source: Source, img: nib.Nifti1Image | nib.Nifti2Image) -> nib.Nifti1Image | nib.Nifti2Image:
    """An image whose voxels can be read, holding at least the first volume: a plain file on
    disk as nibabel maps it; anything compressed, or a zip member, inflated into memory within
    the budget and the ratio cap (:func:`engine.bounded_read.inflate`), only as far as the
    first volume."""
    with source.open() as fh:
        head = fh.read(2)
        if source.member is None and head != GZIP_MAGIC:
            return img
        hdr = raw_header(source)  # as stored: an image's own header copy forgets the data offset
        offset = int(img.dataobj.offset)
        want = offset + volume_bytes(img)
        limit = memory_budget.current()
        if head == GZIP_MAGIC:
            data = inflate(fh, limit=limit, what=str(source), prefix=head, want=want)
        else:
            fh.seek(0)
            data = fh.read(want)
    if len(data) < want:
        raise LoadError(f"{source}: truncated NIfTI file ({len(data)} bytes where the header needs {want})")
    first = hdr.copy()  # the bytes hold the first volume: say so, or nibabel wants the rest
    first.set_data_shape(tuple(int(s) for s in hdr.get_data_shape())[:3])
    block = first.binaryblock
    return _from_bytes(block + data[len(block) :])


def volume_bytes(img: nib.Nifti1Image | nib.Nifti2Image) -> int:
    """Stored bytes of the volume mrfm loads (the first of a 4D image), from the header."""
    shape = tuple(int(s) for s in img.header.get_data_shape())
    return math.prod(shape[:3]) * img.header.get_data_dtype().itemsize


def _check_ndim(source: Source, shape: tuple[int, ...]) -> None:
    if len(shape) < 3 and len(shape) != 2:
        raise LoadError(f"{source}: NIfTI image has {len(shape)} dimension(s); need 3 or 4")
    if len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise LoadError(f"{source}: NIfTI image has {len(shape)} dimensions {shape}; at most 4 are supported")


def raw_header(source: Source) -> nib.Nifti1Header | nib.Nifti2Header:
    """The header as stored: nibabel's loaders quietly repair pixdim, hiding what is wrong."""
    with source.open() as fh:
        head = fh.read(4) + fh.read(540 - 4)
    if head[:2] == b"\x1f\x8b":
        with source.open() as fh, gzip.GzipFile(fileobj=fh) as gz:
            head = gz.read(540)
    little = int.from_bytes(head[:4], "little")
    big = int.from_bytes(head[:4], "big")
    klass = nib.Nifti2Header if 540 in (little, big) else nib.Nifti1Header
    return klass.from_fileobj(io.BytesIO(head), check=False)


def geometry_problem(img: nib.Nifti1Image | nib.Nifti2Image, hdr=None) -> str | None:
    """Why the header's geometry is unusable (see the module docstring), or None; ``hdr`` is
    the header as stored (:func:`raw_header`), defaulting to the image's own."""
    hdr = img.header if hdr is None else hdr
    ndim = min(3, int(hdr["dim"][0]))
    if int(hdr["sform_code"]) > 0:
        srows = np.array([hdr["srow_x"], hdr["srow_y"], hdr["srow_z"]], dtype=np.float64)
        if not np.isfinite(srows).all():
            return "sform (srow_x/y/z) holds non-finite values"
    else:
        pixdim = np.asarray(hdr["pixdim"][1 : ndim + 1], dtype=np.float64)
        if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
            return f"pixdim voxel sizes {pixdim.tolist()} are not all positive finite numbers"
        if int(hdr["qform_code"]) > 0:
            quatern = [
                float(hdr[k]) for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
            ]
            if not np.isfinite(quatern).all():
                return "qform (quaternion or offset) holds non-finite values"
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel can fail to build an affine from a broken header
        return f"no affine can be built from the header ({type(exc).__name__})"
    return affine_problem(affine)


def _checked_geometry(source: Source, img: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    problem = geometry_problem(img, raw_header(source))
    if problem:
        raise GeometryError(f"{source}: {problem}")
    return np.asarray(img.affine, dtype=np.float64)


def _first_volume(img: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    """The first 3D volume as float32, converted slice by slice: nibabel scales a whole array in
    float64, which would hold twice the float32 volume besides it."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 2:
        return np.asarray(img.dataobj, dtype=np.float32)[:, :, None]
    out = np.empty(shape[:3], dtype=np.float32)
    rest = (0,) * (len(shape) - 3)  # 4D (or 5D+ with singleton trailing axes): first volume only
    for k in range(shape[2]):
        out[:, :, k] = np.asarray(img.dataobj[(slice(None), slice(None), k, *rest)], dtype=np.float32)
    return out


class NiftiReader:
    """The built-in NIfTI reader (registered by ``plugins.readers``)."""

    name = "nifti"

    def sniff(self, source: Source, head: bytes) -> bool:
        return _is_nifti_name(source.name)

    def scan_file(self, source: Source, *, with_patient_age: bool = False) -> NiftiRecord:
        img = read_image(source)
        hdr = raw_header(source)
        problem = geometry_problem(img, hdr)
        affine = np.eye(4) if problem else np.asarray(img.affine, dtype=np.float64)
        digest = content_key(source, hdr.binaryblock)
        return NiftiRecord(source, tuple(int(s) for s in img.shape), affine, digest, problem, volume_bytes(img))

    def group(self, records: list[NiftiRecord]) -> list[SeriesRef]:
        refs = []
        for rec in records:
            problems = []
            try:
                _check_ndim(rec.source, rec.shape)
            except LoadError as exc:
                problems.append(str(exc))
            if rec.problem:
                problems.append(f"{rec.source}: {rec.problem}")
            shape3 = tuple(rec.shape[:3]) + (1,) * (3 - len(rec.shape[:3]))
            meta = {"volumes": rec.shape[3] if len(rec.shape) > 3 else 1}
            if meta["volumes"] > 1:
                meta["volume_rule"] = "first volume of the 4D image"
            refs.append(
                SeriesRef(
                    key=rec.digest,
                    reader=self.name,
                    study_uid="",
                    series_uid="",
                    modality="MR",
                    description="",
                    sources=[rec.source],
                    dims=shape3,
                    n_slices=shape3[2],
                    orientation="unknown" if rec.problem else orientation_name(rec.affine),
                    problems=problems,
                    meta=meta,
                    needs_bytes=memory_budget.series_need(rec.stored_bytes, math.prod(shape3)),
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
        affine = _checked_geometry(source, img)
        memory_budget.check(
            f"series {ref.key}",
            memory_budget.series_need(volume_bytes(img), math.prod(shape[:3])),
            memory_budget.current(),
        )
        try:
            img = voxel_image(source, img)
        except memory_budget.OverBudget:
            raise
        except Exception as exc:
            raise LoadError(f"{source}: cannot read NIfTI voxel data ({exc})") from exc
        try:
            data = _first_volume(img)
        except Exception as exc:
            raise LoadError(f"{source}: cannot read NIfTI voxel data ({exc})") from exc
        meta = dict(ref.meta)
        meta.update(series_key=ref.key, reader=self.name)
        return Volume(data=np.ascontiguousarray(data), affine=affine, meta=meta)
