"""DICOM series: header records for discovery, slice-stack geometry, and pixel decoding.

Every image, whatever its storage, is reduced to :class:`Frame` records (one 2D image with its
position and orientation): a classic one-file-per-slice image, one frame of an Enhanced
multi-frame object, or one tile of a Siemens mosaic. :func:`plan_stack` orders frames along the
slice normal, checks the stack (dimensions, orientation vectors, spacing, duplicates, gaps,
shear), fits the slice positions to a regular grid (or plans resampling for variable spacing) and
builds the voxel-to-RAS affine; the same function runs at scan time (problems are reported) and
at load time (problems raise :class:`~engine.dicom.stack.StackError`, a
:class:`~engine.errors.GeometryError`). Tolerances and their reasons are in
:mod:`engine.dicom.stack`; the rule applied goes to the volume's ``meta["slice_rule"]``.

Free text passed on (SeriesDescription and the like) has the patient's name, IDs and birth date
replaced with "[removed]" (:func:`~engine.dicom.frames.scrub`); records and volumes carry no
file-system paths.

Series holding several volumes (time points, echoes, field-map components, or one volume per
file as in Siemens XA multi-file runs and mosaic time series) load as their **first volume**:
frames at each slice position are ordered by a non-spatial key — temporal position, then the
remaining dimension indices / echo number / acquisition number — and the first one is kept.
``meta["volumes"]`` gives the count and ``meta["volume_rule"]`` states the rule.

Uncompressed pixel data must match Rows x Columns x frames; a mismatch is named with both sizes.

Voxel values are the stored values through the DICOM rescale (RescaleSlope/Intercept or the
modality LUT; per frame for Enhanced objects), as float32. Vendor-private scalings (e.g.
Philips' floating-point scale) are not applied.
"""

from .frames import DicomRecord, Frame, read_header, record_from_header
from .reader import DicomReader, group_records, load_series
from .stack import Stack, StackError, plan_stack

__all__ = [
    "DicomReader",
    "DicomRecord",
    "Frame",
    "Stack",
    "StackError",
    "group_records",
    "load_series",
    "plan_stack",
    "read_header",
    "record_from_header",
]
