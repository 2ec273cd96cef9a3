"""A hostile-input corpus: small, deliberately broken archives a robust pipeline must report on
rather than crash on, loop on, leak from or silently drop.

``write_bad_inputs(out_dir, seed)`` writes one folder ``bad_<case>`` per case under ``out_dir``
and returns ``{case: folder}``. Everything is deterministic per seed and small (32x32x8 series).
Every DICOM object carries the patient name ``DOE^JANE``, id ``PID-424242`` and birth date
19700101; the name is also in some folder and file names and in one SeriesDescription, so a run
over the corpus can be checked for leaks into the store. Each DICOM series is described
``BAD <CASE>`` (and NIfTI headers carry the same text), which is how a report matches the
store's series to the cases; files that are skipped are matched by their ``bad_<case>`` path in
the run's warnings.

Expected outcomes (``EXPECTED`` holds the status part):

DICOM content
- ``good``: a valid 8-slice MR series -> complete.
- ``not_dicom``: a text file named ``IM0001.dcm`` -> skipped file (not DICOM or NIfTI).
- ``empty_file``: a zero-byte ``IM0001.dcm`` -> skipped file (empty).
- ``truncated``: the last file cut inside its pixel data -> failed (truncated file, named).
- ``truncated_header``: the middle file cut inside its header -> that file skipped; the series
  then has a gap -> failed (missing slice).
- ``missing_slice``: the 4th of 8 slices removed -> failed (gap in slice positions).
- ``duplicate_slice``: two files at one position with different SOP Instance UIDs -> failed
  (two slices at one position).
- ``duplicate_sop``: one file copied under a second name (same SOP Instance UID) -> complete,
  the copy is dropped with a note.
- ``mixed_size``: one series UID, slices 5-8 are 40 columns wide -> failed (mixed matrix).
- ``mixed_orientation``: one series UID, slices 5-8 sagittal -> failed (mixed orientation).
- ``mixed_spacing``: one series UID, slices 5-8 with 3 mm pixels instead of 4 mm -> failed.
- ``ct``: a complete CT series -> skipped (not MR).
- ``sr_document``: a Basic Text SR (no Rows, Columns or pixels) -> skipped (not an image) or
  skipped file.
- ``no_pixel_data``: MR Image Storage objects without Rows, Columns and PixelData -> failed
  (no pixel data) or skipped file.
- ``missing_position``: no ImagePositionPatient -> failed (slices cannot be placed).
- ``missing_orientation``: no ImageOrientationPatient -> failed.
- ``orientation_not_unit``: ImageOrientationPatient scaled by 1.05 -> failed (not unit length).
- ``orientation_not_orthogonal``: 80 degrees between row and column -> failed.
- ``zero_spacing``: PixelSpacing 0\\0 -> failed.
- ``negative_spacing``: PixelSpacing -4\\-4 -> failed.
- ``rows_lie``: Rows/Columns say 64x64, the pixel data holds 32x32 -> failed (size mismatch).
- ``jittered_oblique``: oblique grid, 7 mm slice step with +-1 % jitter -> complete.
- ``variable_spacing``: slice steps of 2 mm then 5 mm -> complete (resampled to a regular
  grid, noted).
- ``single_slice``: a one-slice series -> complete (a one-slice volume).
- ``two_slice``: a two-slice series -> complete.
- ``rgb``: a colour (RGB, 3 samples per pixel) MR image series -> failed (not a scalar image).
- ``rich_markup``: SeriesDescription with ``[/]`` and ``[bold]`` -> complete, printed verbatim.
- ``phi_description``: SeriesDescription holding the patient name -> complete; the store must
  not hold the name.
- ``phi_path``: a valid series in a folder and files named after the patient -> complete; the
  store must not hold the name.

NIfTI
- ``nifti_nan_affine``: sform and qform both NaN -> failed (affine not finite).
- ``nifti_singular_affine``: sform with a zero column, no qform -> failed (singular affine).
- ``nifti_zero_pixdim``: qform only, with zero pixdim -> failed (zero voxel size).
- ``nifti_2d``: a 32x32 image -> complete (one slice).
- ``nifti_5d``: shape (32, 32, 8, 1, 3) -> failed (non-singleton 5th axis).
- ``nifti_gz_truncated``: a ``.nii.gz`` cut in half -> failed (truncated) or skipped file.
- ``nifti_nan_voxels``: finite affine, a block of NaN voxels -> complete (non-finite voxels
  treated as background, noted) or failed with that reason.

Zip archives
- ``zip_traversal``: a valid series stored under ``../../`` member names -> skipped files (unsafe
  member names); nothing is ever extracted.
- ``zip_absolute``: a valid series stored under absolute member names -> skipped files.
- ``nested_zip``: a zip holding a zip holding a valid series -> skipped file (nested zips are not
  opened).
- ``zip_bomb``: a member declaring 150 MB (zeros, deflated to ~150 KB) -> skipped file, never
  inflated in full.
- ``corrupt_zip``: a zip whose central directory is damaged -> skipped file (unreadable zip).

File system
- ``symlink_outside``: a link to a folder outside ``out_dir`` (``<out_dir>-outside/``, written
  beside it, holding a valid series) -> not followed, reported as a skipped file.
- ``symlink_loop``: a folder link to its own parent and two file links to each other -> not
  followed / unreadable, reported, and the scan terminates.
- ``broken_symlink``: a ``.dcm`` link to a missing file -> skipped file (unreadable).
- ``unreadable``: the middle file of a series with mode 000 -> skipped file and the series
  fails with a gap; a process running as root can read it, and the series completes.

Decoding (``bad_decoding``): files declaring 16384 x 16384 in a kilobyte (JPEG 2000, RLE,
uncompressed) -> failed ("needs N GiB, budget M GiB"); JPEG 2000 frames whose codestream declares
more than the header -> failed; a Deflated DICOM bomb -> skipped file;
a valid Deflated series -> complete; a ``.nii.gz`` bomb and a NIfTI header declaring 32767^3
-> failed. Nothing is decoded or inflated past the memory budget.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from .bad_corpus import (  # noqa: F401 (the corpus' constants are also this module's API)
    BAD_SHAPE,
    BOMB_BYTES,
    EXPECTED,
    PATIENT,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    SPACING,
)
from .bad_corpus import WRITERS as _WRITERS
from .bad_corpus import Corpus as _Corpus
from .bad_corpus import case as _case
from .bad_corpus import edit as _edit
from .dicom_writer import derive_uid

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

# One of each common kind (not DICOM, truncated, a gap, mixed matrix, not MR): a quick subset
# for tests that count outcomes while the full corpus exercises the hardening.
BASIC_CASES = ("not_dicom", "truncated", "missing_slice", "mixed_size", "ct")


def write_bad_inputs(out_dir: Path, seed: int = 0, cases: Iterable[str] | None = None) -> dict[str, Path]:
    """Write one folder per bad case under ``out_dir`` (all cases, or those named in ``cases``);
    returns case name -> folder. See the module docstring for what each case holds."""
    names = list(cases) if cases is not None else list(_WRITERS)
    unknown = sorted(set(names) - set(_WRITERS))
    if unknown:
        raise ValueError(f"unknown bad-input case(s) {unknown}; known: {sorted(_WRITERS)}")
    corpus = _Corpus(Path(out_dir), seed)
    corpus.out_dir.mkdir(parents=True, exist_ok=True)
    return {name: _WRITERS[name](corpus) for name in names}


# ---- helpers ------------------------------------------------------------------------------------


def _splice(corpus: _Corpus, case: str, **second) -> Path:
    """One series UID whose slices 5-8 come from a second acquisition differing by ``second``."""
    first = corpus.series(case)
    other = corpus.series(case, file_names="IMB{:04d}.dcm", **second)
    for k in range(4):
        other[k].unlink()
        first[4 + k].unlink()
    return first[0].parent


def _set_positions(paths: list[Path], offsets_mm: np.ndarray) -> None:
    """Move slice k to ``offsets_mm[k]`` from the first slice along the series' stacking direction."""
    first, second = (np.asarray(pydicom.dcmread(p).ImagePositionPatient, dtype=float) for p in paths[:2])
    step = (second - first) / np.linalg.norm(second - first)
    for path, offset in zip(paths, offsets_mm):
        _edit([path], lambda ds, p=first + offset * step: _place(ds, p))


def _place(ds: Dataset, position: np.ndarray) -> None:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.SliceLocation = f"{float(position @ np.cross(iop[:3], iop[3:])):.6f}"


# ---- DICOM content ------------------------------------------------------------------------------


@_case("good", "complete")
def _good(c: _Corpus) -> Path:
    return c.series("good")[0].parent


@_case("not_dicom", "skipped file")
def _not_dicom(c: _Corpus) -> Path:
    folder = c.folder("not_dicom")
    (folder / "IM0001.dcm").write_text("This is a scanner log, not a DICOM file.\n")
    return folder


@_case("empty_file", "skipped file")
def _empty_file(c: _Corpus) -> Path:
    folder = c.folder("empty_file")
    (folder / "IM0001.dcm").write_bytes(b"")
    return folder


@_case("truncated", "failed")
def _truncated(c: _Corpus) -> Path:
    paths = c.series("truncated")
    raw = paths[-1].read_bytes()
    paths[-1].write_bytes(raw[: len(raw) - BAD_SHAPE[0] * BAD_SHAPE[1]])  # lose half the pixels
    return paths[-1].parent


@_case("truncated_header", "failed")
def _truncated_header(c: _Corpus) -> Path:
    paths = c.series("truncated_header")
    raw = paths[3].read_bytes()
    paths[3].write_bytes(raw[:400])  # preamble, DICM and part of the meta and patient module
    return paths[0].parent


@_case("missing_slice", "failed")
def _missing_slice(c: _Corpus) -> Path:
    paths = c.series("missing_slice")
    paths[3].unlink()
    return paths[0].parent


@_case("duplicate_slice", "failed")
def _duplicate_slice(c: _Corpus) -> Path:
    paths = c.series("duplicate_slice")
    twin = paths[2].with_name("IM0003b.dcm")
    shutil.copyfile(paths[2], twin)
    uid = derive_uid(c.series_uid("duplicate_slice"), "twin")

    def retag(ds: Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.PixelData = bytes(reversed(ds.PixelData))  # same place, different image

    _edit([twin], retag)
    return paths[0].parent


@_case("duplicate_sop", "complete")
def _duplicate_sop(c: _Corpus) -> Path:
    paths = c.series("duplicate_sop")
    shutil.copyfile(paths[2], paths[2].with_name("IM0003 copy.dcm"))
    return paths[0].parent


@_case("mixed_size", "failed")
def _mixed_size(c: _Corpus) -> Path:
    return _splice(c, "mixed_size", shape=(40, 32, 8))


@_case("mixed_orientation", "failed")
def _mixed_orientation(c: _Corpus) -> Path:
    return _splice(c, "mixed_orientation", orientation="sagittal")


@_case("mixed_spacing", "failed")
def _mixed_spacing(c: _Corpus) -> Path:
    return _splice(c, "mixed_spacing", spacing=(3.0, 3.0, 4.0))


@_case("ct", "skipped")
def _ct(c: _Corpus) -> Path:
    return c.series("ct", modality="CT", rescale=(1.0, -1024.0))[0].parent


@_case("sr_document", "skipped or skipped file")
def _sr_document(c: _Corpus) -> Path:
    ds = _bare_dataset(c, "sr_document", BASIC_TEXT_SR, "SR")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.TextValue = "Findings: none."
    folder = c.folder("sr_document")
    ds.save_as(folder / "SR0001.dcm", enforce_file_format=True)
    return folder


@_case("no_pixel_data", "failed or skipped file")
def _no_pixel_data(c: _Corpus) -> Path:
    paths = c.series("no_pixel_data")

    def strip(ds: Dataset) -> None:
        for tag in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
            delattr(ds, tag)

    _edit(paths, strip)
    return paths[0].parent


@_case("missing_position", "failed")
def _missing_position(c: _Corpus) -> Path:
    paths = c.series("missing_position")
    _edit(paths, lambda ds: (delattr(ds, "ImagePositionPatient"), delattr(ds, "SliceLocation")))
    return paths[0].parent


@_case("missing_orientation", "failed")
def _missing_orientation(c: _Corpus) -> Path:
    paths = c.series("missing_orientation")
    _edit(paths, lambda ds: delattr(ds, "ImageOrientationPatient"))
    return paths[0].parent


@_case("orientation_not_unit", "failed")
def _orientation_not_unit(c: _Corpus) -> Path:
    paths = c.series("orientation_not_unit")
    _edit(
        paths,
        lambda ds: setattr(
            ds, "ImageOrientationPatient", [f"{1.05 * float(v):.6f}" for v in ds.ImageOrientationPatient]
        ),
    )
    return paths[0].parent


@_case("orientation_not_orthogonal", "failed")
def _orientation_not_orthogonal(c: _Corpus) -> Path:
    paths = c.series("orientation_not_orthogonal")

    def tilt(ds: Dataset) -> None:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        row, col = iop[:3], iop[3:]
        angle = np.deg2rad(80.0)
        col = np.cos(angle) * row + np.sin(angle) * col  # still unit length, 80 degrees from row
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]

    _edit(paths, tilt)
    return paths[0].parent


@_case("zero_spacing", "failed")
def _zero_spacing(c: _Corpus) -> Path:
    return c.series("zero_spacing", extra_tags={"PixelSpacing": ["0", "0"]})[0].parent


@_case("negative_spacing", "failed")
def _negative_spacing(c: _Corpus) -> Path:
    return c.series("negative_spacing", extra_tags={"PixelSpacing": ["-4", "-4"]})[0].parent


@_case("rows_lie", "failed")
def _rows_lie(c: _Corpus) -> Path:
    return c.series("rows_lie", extra_tags={"Rows": 64, "Columns": 64})[0].parent


@_case("jittered_oblique", "complete")
def _jittered_oblique(c: _Corpus) -> Path:
    paths = c.series("jittered_oblique", orientation="oblique", spacing=(4.0, 4.0, 7.0))
    jitter = 0.07 * c.rng.uniform(-1.0, 1.0, len(paths))  # +-1 % of the 7 mm step
    jitter[0] = 0.0
    _set_positions(paths, 7.0 * np.arange(len(paths)) + jitter)
    return paths[0].parent


@_case("variable_spacing", "complete")
def _variable_spacing(c: _Corpus) -> Path:
    paths = c.series("variable_spacing", spacing=(4.0, 4.0, 2.0))
    steps = [2.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0]
    _set_positions(paths, np.concatenate([[0.0], np.cumsum(steps)]))
    _edit(paths, lambda ds: delattr(ds, "SpacingBetweenSlices"))
    return paths[0].parent


@_case("single_slice", "complete")
def _single_slice(c: _Corpus) -> Path:
    return c.series("single_slice", shape=(32, 32, 1))[0].parent


@_case("two_slice", "complete")
def _two_slice(c: _Corpus) -> Path:
    return c.series("two_slice", shape=(32, 32, 2))[0].parent


@_case("rgb", "failed")
def _rgb(c: _Corpus) -> Path:
    paths = c.series("rgb")

    def colour(ds: Dataset) -> None:
        grey = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
        level = (grey // 8).clip(0, 255).astype(np.uint8)
        ds.PixelData = np.stack([level, 255 - level, level // 2], axis=-1).tobytes()
        ds["PixelData"].VR = "OB"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        for tag in ("WindowCenter", "WindowWidth"):
            delattr(ds, tag)

    _edit(paths, colour)
    return paths[0].parent


@_case("rich_markup", "complete")
def _rich_markup(c: _Corpus) -> Path:
    return c.series("rich_markup", description="BAD RICH_MARKUP [/] [bold]unclosed [red")[0].parent


@_case("phi_description", "complete")
def _phi_description(c: _Corpus) -> Path:
    return c.series("phi_description", description=f"BAD PHI_DESCRIPTION {PATIENT_NAME} {PATIENT_ID}")[0].parent


@_case("phi_path", "complete")
def _phi_path(c: _Corpus) -> Path:
    folder = c.folder("phi_path") / f"{PATIENT_NAME} {PATIENT_ID} {PATIENT_BIRTH_DATE}"
    c.series("phi_path", folder, file_names=f"{PATIENT_NAME}_{{:04d}}.dcm")
    return folder.parent


def _bare_dataset(c: _Corpus, case: str, sop_class: str, modality: str) -> Dataset:
    """A minimal non-image object with the corpus' patient and study."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = derive_uid(c.series_uid(case), "instance", 0)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesDescription = modality, f"BAD {case.upper()}"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE
    ds.StudyInstanceUID, ds.SeriesInstanceUID = c.study_uid(), c.series_uid(case)
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    return ds


# The NIfTI and archive-level builders (bad_nifti, bad_archive) register with ``_case`` on import;
# imported last and in this order so the corpus keeps the case order documented above (the cases
# share one random generator: the order fixes the bytes).
# isort: off
from . import bad_nifti  # noqa: E402
from . import bad_archive  # noqa: E402
from . import bad_decoding  # noqa: E402
# isort: on

_CASE_MODULES = (bad_nifti, bad_archive, bad_decoding)
