"""Write a (I, J, K) volume with a voxel-to-RAS affine as a DICOM series, one file per slice.

Geometry mapping (the inverse of what a loader does): slice k's pixel array is ``data[:, :, k].T``
(rows follow j, columns follow i); ImageOrientationPatient holds the LPS directions of the i and j
axes; ImagePositionPatient of slice k is the LPS position of voxel (0, 0, k). Slices may be stacked
in either direction along the normal; the positions say which.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
)
from pydicom.valuerep import format_number_as_ds

from ..geometry import LPS_TO_RAS

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
}
_SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage}

# Spin-echo parameters that make each contrast plausible to anyone reading the headers.
SEQUENCE_PARAMS: dict[str, dict[str, Any]] = {
    "T1": dict(ScanningSequence="SE", SequenceVariant="SK", RepetitionTime=550, EchoTime=12),
    "T2": dict(ScanningSequence="SE", SequenceVariant="SK", RepetitionTime=4200, EchoTime=100, EchoTrainLength=16),
    "FLAIR": dict(
        ScanningSequence=["SE", "IR"],
        SequenceVariant=["SK", "MP"],
        RepetitionTime=9000,
        EchoTime=120,
        InversionTime=2500,
        EchoTrainLength=20,
    ),
    "PD": dict(ScanningSequence="SE", SequenceVariant="SK", RepetitionTime=3000, EchoTime=20, EchoTrainLength=8),
}


def derive_uid(*parts: object) -> str:
    """A valid, deterministic UID derived from the given parts.

    The form is 2.25.<integer of a name-based (version 5) UUID>, at most 44 characters; pydicom's
    ``generate_uid(prefix=None)`` would ignore the parts and return a random UUID.
    """
    name = "mrfm-synthetic/" + "/".join(map(str, parts))
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, name).int}"


def encoder_available(name: str) -> bool:
    """Whether pydicom can write this transfer syntax ('explicit', 'rle', 'jpeg2000', ...) here."""
    uid = TRANSFER_SYNTAXES[name]
    if not uid.is_compressed:
        return True
    from pydicom.pixels import get_encoder  # only compressed transfer syntaxes need an encoder

    try:
        return bool(get_encoder(uid).is_available)
    except NotImplementedError:
        return False


@dataclass(frozen=True)
class Patient:
    name: str = "DEMO^0000"
    id: str = "DEMO0000"
    sex: str = "O"
    age_years: int = 50
    birth_date: str = ""


def write_dicom_series(
    out_dir: Path,
    volume_data: np.ndarray,
    affine_ras: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str | None = None,
    description: str = "",
    series_number: int = 1,
    transfer_syntax: str | UID = "explicit",
    rescale: tuple[float, float] = (1.0, 0.0),
    pixel_dtype: str = "uint16",
    slice_thickness: float | None = None,
    modality: str = "MR",
    patient: Patient = Patient(),
    study_tags: Mapping[str, Any] | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    file_names: str = "IM{:04d}.dcm",
) -> list[Path]:
    """Write ``volume_data`` (physical values) as one DICOM file per slice; returns the paths.

    Stored values are ``round((value - intercept) / slope)`` in ``pixel_dtype`` (uint16 or int16),
    so a reader applying RescaleSlope/RescaleIntercept gets the values back to within slope / 2.
    """
    data = np.asarray(volume_data)
    if data.ndim != 3:
        raise ValueError(f"volume_data must be 3D (I, J, K), got shape {data.shape}")
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    ts = TRANSFER_SYNTAXES[transfer_syntax] if transfer_syntax in TRANSFER_SYNTAXES else UID(transfer_syntax)
    stored = _to_stored(data, rescale, pixel_dtype)
    affine_lps = LPS_TO_RAS @ affine_ras  # the same diagonal converts both ways
    linear = affine_lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    iop = np.concatenate([linear[:, 0] / spacing[0], linear[:, 1] / spacing[1]])
    normal = np.cross(iop[:3], iop[3:])
    frame_uid = frame_of_reference_uid or derive_uid(study_uid, "frame")

    base = _base_dataset(modality, patient, study_uid, series_uid, frame_uid, description, series_number, study_tags)
    base.Rows, base.Columns = int(data.shape[1]), int(data.shape[0])
    base.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (along j), column spacing (along i)
    base.SliceThickness = _ds(slice_thickness if slice_thickness is not None else spacing[2])
    base.SpacingBetweenSlices = _ds(spacing[2])
    base.ImageOrientationPatient = [_ds(v) for v in iop]
    base.ImagesInAcquisition = int(data.shape[2])
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 16, 15
    base.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    base.RescaleSlope, base.RescaleIntercept = _ds(rescale[0]), _ds(rescale[1])
    if modality == "MR":
        base.RescaleType = "US"
    lo, hi = np.percentile(data, [1, 99.5]) if data.size else (0.0, 1.0)
    base.WindowCenter, base.WindowWidth = _ds((lo + hi) / 2), _ds(max(hi - lo, 1.0))
    for key, value in (extra_tags or {}).items():
        setattr(base, key, value)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(data.shape[2]):
        ds = base.copy()
        ds.file_meta = _file_meta(base.SOPClassUID, derive_uid(series_uid, "instance", k), ts)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.InstanceNumber = k + 1
        position = affine_lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine_lps[:3, 3]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ normal))
        pixels = np.ascontiguousarray(stored[:, :, k].T)
        if ts.is_compressed:
            ds.compress(ts, pixels, generate_instance_uid=False)
        else:
            ds.PixelData = pixels.tobytes()
        path = out_dir / file_names.format(k + 1)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _to_stored(data: np.ndarray, rescale: tuple[float, float], pixel_dtype: str) -> np.ndarray:
    dtype = np.dtype(pixel_dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.int16)):
        raise ValueError(f"pixel_dtype must be uint16 or int16, got {pixel_dtype}")
    slope, intercept = rescale
    info = np.iinfo(dtype)
    values = np.rint((data.astype(np.float64) - intercept) / slope)
    return np.clip(values, info.min, info.max).astype(dtype)


def _ds(value: float) -> str:
    v = float(np.round(value, 8))
    return format_number_as_ds(0.0 if v == 0 else v)


def _file_meta(sop_class: str, sop_instance: str, ts: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MRFM_SYNTH"
    return meta


def _base_dataset(
    modality: str,
    patient: Patient,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    description: str,
    series_number: int,
    study_tags: Mapping[str, Any] | None,
) -> Dataset:
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}, got {modality!r}")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M" if modality == "MR" else "AXIAL"]
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "MRFM Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = ""
    ds.SeriesDescription = description
    ds.PatientName = patient.name
    ds.PatientID = patient.id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{int(patient.age_years):03d}Y"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = int(series_number)
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    if modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant = "SE", "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.MagneticFieldStrength = 1.5
        ds.ImagingFrequency = 63.87
        ds.ImagedNucleus = "1H"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 500, 15, 1
    else:
        ds.KVP = 120
    for key, value in (study_tags or {}).items():
        setattr(ds, key, value)
    return ds
