"""DICOM series: header records for discovery, slice-stack geometry, and pixel decoding.

Every image, whatever its storage, is reduced to :class:`Frame` records (one 2D image with its
position and orientation): a classic one-file-per-slice image, one frame of an Enhanced
multi-frame object, or one tile of a Siemens mosaic. :func:`plan_stack` orders frames along the
slice normal, checks the stack (dimensions, orientation, duplicates, gaps) and builds the
voxel-to-RAS affine; the same function runs at scan time (problems are reported) and at load
time (problems raise :class:`~engine.discover.LoadError`).

Series holding several volumes (time points, echoes, field-map components, or one volume per
file as in Siemens XA multi-file runs and mosaic time series) load as their **first volume**:
frames at each slice position are ordered by a non-spatial key — temporal position, then the
remaining dimension indices / echo number / acquisition number — and the first one is kept.
``meta["volumes"]`` gives the count and ``meta["volume_rule"]`` states the rule.

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
