"""Synthetic MRI archives with exact ground truth: anatomy defined in world mm, sampled on
axial, sagittal, coronal, oblique and flipped grids, written as DICOM with labels and reports.

``write_demo_archive`` builds the demo archive behind ``mrfm demo-archive``; the lower-level
pieces (``Phantom``, ``make_grid``, ``write_dicom_series``) let tests build exactly the case they
need.
"""

from __future__ import annotations

from .acquisition import FLIPS, ORIENTATIONS, grid_points, make_grid, plane_axes
from .anatomy import build_phantom, location_words
from .archive import DEFAULT_FORMATS, SeriesPlan, sample_series, write_demo_archive
from .bad_inputs import write_bad_inputs
from .dicom_writer import (
    TRANSFER_SYNTAXES,
    Patient,
    derive_uid,
    encoder_available,
    write_dicom_series,
)
from .manifest import ArchiveManifest, LesionTruth, SeriesTruth, StudyTruth
from .phantom import CONTRASTS, LABEL_NAMES, REGIONS, Lesion, Phantom, Structure
from .reports import write_report

__all__ = [
    "ArchiveManifest",
    "CONTRASTS",
    "DEFAULT_FORMATS",
    "FLIPS",
    "LABEL_NAMES",
    "Lesion",
    "LesionTruth",
    "ORIENTATIONS",
    "Patient",
    "Phantom",
    "REGIONS",
    "SeriesPlan",
    "SeriesTruth",
    "Structure",
    "StudyTruth",
    "TRANSFER_SYNTAXES",
    "build_phantom",
    "derive_uid",
    "encoder_available",
    "grid_points",
    "location_words",
    "make_grid",
    "plane_axes",
    "sample_series",
    "write_bad_inputs",
    "write_demo_archive",
    "write_dicom_series",
    "write_report",
]
