"""How a DICOM file's pixel data is read and how big it may be: the plan loading follows (where
the bytes lie, how to decode them) and the size checks made from the header before any pixel is
decoded (truncation, Rows x Columns that do not fit the data, a decompression ratio past the cap).

Split from :mod:`engine.dicom.frames`, which reduces the header to frame geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from ..bounded_read import ratio_problem
from ..discover import Source
from .raw_header import Header


@dataclass(frozen=True)
class PixelPlan:
    """Where a file's pixel data lies and how to decode it, kept from the one header read so that
    loading reads pixel bytes and nothing else.

    Files whose pixel data the header scan could not locate (deflated syntax, float pixel
    data ...) get no plan and are read whole with pydicom. ``length`` is the declared length
    (-1 for encapsulated data: the fragments run to the end of the file).
    ``problem`` is raised at load (colour images, pixel data that does not fit the grid).
    """

    transfer_syntax: str
    offset: int
    length: int
    encapsulated: bool
    rows: int
    cols: int
    frames: int
    module: tuple[tuple[str, Any], ...]  # pixel-module attributes pydicom's decoders need
    rescale: tuple[float, float] | None = None  # classic and mosaic (float64, as pydicom applies it)
    modality_lut: Any = None  # a ModalityLUTSequence (rare in MR), applied by pydicom
    mosaic: int = 0  # tiles in a Siemens mosaic
    problem: str | None = None
    pixel_vr: str = "OW"


@dataclass(frozen=True)
class PixelBytes:
    """How much pixel data a file holds: the bytes after the header, and the length the Pixel
    Data element declares (None when encapsulated or unparseable)."""

    present: int
    declared: int | None = None


_PIXEL_MODULE = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "NumberOfFrames",
)


def declared_bytes(h: Header) -> int:
    try:
        return max(0, pixel_bytes_needed(h))
    except (TypeError, ValueError):
        return 0


def expansion_problem(ds: Dataset | Header, remaining: PixelBytes | int | None, declared: int) -> str | None:
    """Compressed pixel data that would decode to more than the ratio cap allows of the bytes
    the file holds (a 978-byte JPEG 2000 declaring 16384 x 16384): refused before decoding."""
    ts = transfer_syntax(ds)
    if remaining is None or ts is None or not ts.is_compressed:
        return None
    held = remaining.present if isinstance(remaining, PixelBytes) else remaining
    problem = ratio_problem(declared, held)
    return f"pixel data declares {declared} bytes decoded from {held} bytes held, {problem}" if problem else None


def pixel_bytes_needed(ds: Dataset) -> int:
    """Bytes of uncompressed pixel data the header's Rows, Columns, frames, samples and
    BitsAllocated call for."""
    return (
        int(ds.get("Rows"))
        * int(ds.get("Columns"))
        * (as_int(ds.get("NumberOfFrames"), 1) or 1)
        * (as_int(ds.get("SamplesPerPixel"), 1) or 1)
        * (as_int(ds.get("BitsAllocated"), 16) or 16)
        // 8
    )


def pixel_size_problem(held: int, ds: Dataset) -> str:
    return (
        f"pixel data holds {held} bytes, Rows x Columns x frames x bytes/pixel "
        f"({int(ds.get('Rows'))} x {int(ds.get('Columns'))} x {as_int(ds.get('NumberOfFrames'), 1) or 1} x "
        f"{(as_int(ds.get('SamplesPerPixel'), 1) or 1) * (as_int(ds.get('BitsAllocated'), 16) or 16) // 8}) "
        f"needs {pixel_bytes_needed(ds)}"
    )


def truncation_problem(ds: Dataset | Header, remaining: PixelBytes | int | None) -> str | None:
    """For uncompressed files, whether the file holds less pixel data than the header needs:
    a truncated file (the Pixel Data element declares more than the file holds) or Rows/Columns
    that are larger than the data."""
    ts = transfer_syntax(ds)
    if remaining is None or ts is None or ts.is_compressed or "Rows" not in ds:
        return None
    held = remaining if isinstance(remaining, PixelBytes) else PixelBytes(remaining)
    needed = pixel_bytes_needed(ds)
    if held.declared is not None and held.present < held.declared:
        return f"truncated file: {held.present} bytes of pixel data, the Pixel Data element declares {held.declared}"
    if held.present < needed:
        return pixel_size_problem(held.present, ds)
    return None


def transfer_syntax(ds: Dataset | Header) -> Any:
    meta = getattr(ds.ds if isinstance(ds, Header) else ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def pixel_plan(
    source: Source, ds: Dataset | Header, pixel: tuple | None, held: PixelBytes | int | None, mosaic: int
) -> PixelPlan | None:
    """How loading reads this file's pixels without its header; None: through pydicom."""
    ts = transfer_syntax(ds)
    if ts is None or pixel is None or pixel[0] != 0x7FE00010 or not isinstance(held, PixelBytes):
        return None
    _, offset, vr, declared = pixel
    encapsulated = declared == 0xFFFFFFFF
    length = -1 if encapsulated else declared  # encapsulated: fragments run to the end of the file
    module = tuple((k, _plain(ds.get(k))) for k in _PIXEL_MODULE if k in ds and ds.get(k) not in (None, ""))
    problem = None
    if as_int(ds.get("SamplesPerPixel"), 1) != 1:
        problem = f"{source}: colour images (SamplesPerPixel > 1) are not supported"
    elif not ts.is_compressed:
        problem = size_problem(source, ds, min(declared, held.present) if held.declared is not None else declared)
    rescale, lut = None, None
    if "ModalityLUTSequence" in ds:
        lut = ds.get("ModalityLUTSequence")
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        try:
            rescale = (float(ds.get("RescaleSlope")), float(ds.get("RescaleIntercept")))
        except (TypeError, ValueError):
            problem = problem or f"{source}: cannot decode pixel data (RescaleSlope/RescaleIntercept are not numbers)"
    return PixelPlan(
        str(ts),
        offset,
        length,
        encapsulated,
        int(ds.get("Rows")),
        int(ds.get("Columns")),
        as_int(ds.get("NumberOfFrames"), 1) or 1,
        module,
        rescale,
        lut,
        mosaic,
        problem,
        (vr or b"OW").decode("ascii", "replace"),
    )


def _plain(value: Any) -> Any:
    """pydicom value types reduced to int/str, so the plan pickles small."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, int):
        return int(value)
    return str(value)


def size_problem(source: Source, ds: Dataset, held: int) -> str | None:
    """Uncompressed pixel data must match Rows x Columns x frames: a short element cannot fill
    the grid, and a whole row or more beyond it (not just the even-length pad byte) means the
    header's dimensions are not the data's."""
    needed = pixel_bytes_needed(ds)
    row = (
        int(ds.get("Columns"))
        * (as_int(ds.get("SamplesPerPixel"), 1) or 1)
        * (as_int(ds.get("BitsAllocated"), 16) or 16)
        // 8
    )
    if held < needed or held - needed >= max(row, 2):
        return f"{source}: {pixel_size_problem(held, ds)}"
    return None


def as_int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default
