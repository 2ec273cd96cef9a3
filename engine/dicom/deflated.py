"""Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99): the dataset after the file meta
group is one raw deflate stream.

pydicom inflates it whole and unbounded (a 4 MB file can ask for gigabytes), and reading the
header through pydicom left the file positioned after the compressed bytes, so the pixel data
looked empty. Here the stream is inflated with the caps of :mod:`engine.bounded_read` (the
budget in force and the ratio cap) and parsed from memory as Explicit VR Little Endian, the
file meta (and its transfer syntax) kept as stored.
"""

from __future__ import annotations

import io

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

from .. import memory_budget
from ..bounded_read import RAW_DEFLATE_WBITS, inflate
from ..discover import Source

DEFLATED = "1.2.840.10008.1.2.1.99"


def inflated(source: Source) -> tuple[FileMetaDataset, io.BytesIO]:
    """The file meta as stored and the inflated dataset bytes (positioned at 0)."""
    with source.open() as fh:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        data = inflate(fh, limit=memory_budget.current(), what=str(source), wbits=RAW_DEFLATE_WBITS)
    return meta, io.BytesIO(data)


def read_deflated(source: Source, *, stop_before_pixels: bool) -> tuple[Dataset, io.BytesIO]:
    """The dataset of a Deflated file, and its inflated bytes positioned where the read stopped
    (at the Pixel Data element when ``stop_before_pixels``)."""
    meta, buf = inflated(source)
    stop = (lambda tag, vr, length: int(tag) >= 0x7FE00010) if stop_before_pixels else None
    ds = read_dataset(buf, False, True, stop_when=stop)
    ds.file_meta = meta
    ds.set_original_encoding(False, True, ds._character_set)
    return ds, buf


def is_deflated(ds: Dataset | pydicom.FileDataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return meta is not None and str(meta.get("TransferSyntaxUID", "")) == DEFLATED
