"""Hostile-input corpus, decoding cases: tiny files whose headers declare huge images, and
compressed files that inflate far past any memory budget. Each is a few kilobytes to a few
hundred kilobytes on disk; a reader that trusts the declared sizes, or inflates without a cap,
asks for gigabytes.

- ``j2k_declares_huge``: three JPEG 2000 files of ~1 KB, each declaring 16384 x 16384 16-bit
  -> failed ("needs N GiB, budget M GiB"), nothing decoded.
- ``j2k_codestream_lies``: headers say 32 x 32, each frame's JPEG 2000 codestream says 4096 x
  4096 -> failed (the codestream declares more than the header), never decoded.
- ``rle_declares_huge``: the same with RLE Lossless -> failed (needs ... budget).
- ``uncompressed_declares_huge``: Explicit VR files declaring 16384 x 16384 with 2 KB of pixel
  data -> failed (needs ... budget, or the pixel data is too short), nothing allocated.
- ``deflated_bomb``: a Deflated Explicit VR Little Endian file whose dataset inflates to 150 MB
  (a private element of zeros before the image) -> skipped file (too large), inflation stopped
  at the ratio cap during the headers-only scan.
- ``deflated_valid``: a valid Deflated Explicit VR Little Endian series written by pydicom ->
  complete.
- ``nifti_gz_bomb``: a ``.nii.gz`` of 256 KB declaring 1024 x 1024 x 128 int16 of zeros ->
  failed (compressed more than the ratio cap allows), never inflated in full.
- ``nifti_huge_dims``: an uncompressed ``.nii`` whose header declares 32767^3 float32 with 4 KB
  of data -> failed (needs ... budget).

The builders register in ``bad_corpus``'s case table when ``bad_inputs`` imports this module;
``write_bad_inputs`` writes them.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from .bad_corpus import BOMB_BYTES
from .bad_corpus import Corpus as _Corpus
from .bad_corpus import case as _case
from .bad_corpus import edit as _edit
from .bad_nifti import _grid_affine, _nifti_header, _write_raw_nifti

HUGE_SIDE = 16384
HUGE_FILES = 3
LIE_SIDE = 4096
NIFTI_BOMB_SHAPE = (1024, 1024, 128)
NIFTI_HUGE_SHAPE = (32767, 32767, 32767)
_CHUNK = 4 * 1024 * 1024


def _declare_huge(c: _Corpus, case: str, transfer_syntax, pixel_data: bytes, encapsulated: bool) -> Path:
    """A valid 3-slice series rewritten to declare HUGE_SIDE^2 per slice around tiny pixel data."""
    paths = c.series(case, shape=(32, 32, HUGE_FILES))

    def change(ds) -> None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.Rows = ds.Columns = HUGE_SIDE
        ds.PixelData = encapsulate([pixel_data]) if encapsulated else pixel_data
        ds["PixelData"].VR = "OB" if encapsulated else "OW"
        ds["PixelData"].is_undefined_length = encapsulated

    _edit(paths, change)
    return paths[0].parent


@_case("j2k_declares_huge", "failed")
def _j2k_declares_huge(c: _Corpus) -> Path:
    # a JPEG 2000 codestream start (SOC, SIZ) whose SIZ says 16384 x 16384, then padding
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + (HUGE_SIDE).to_bytes(4, "big") * 2 + bytes(8)
    return _declare_huge(c, "j2k_declares_huge", JPEG2000Lossless, siz + bytes(600), True)


@_case("j2k_codestream_lies", "failed")
def _j2k_codestream_lies(c: _Corpus) -> Path:
    """Headers say 32 x 32; each frame is a real JPEG 2000 codestream of 4096 x 4096 zeros (a few
    hundred bytes), which a decoder would expand to 32 MiB before noticing the mismatch."""
    holder = pydicom.Dataset()
    holder.file_meta = pydicom.dataset.FileMetaDataset()
    holder.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    holder.Rows = holder.Columns = LIE_SIDE
    holder.SamplesPerPixel, holder.PhotometricInterpretation = 1, "MONOCHROME2"
    holder.BitsAllocated, holder.BitsStored, holder.HighBit, holder.PixelRepresentation = 16, 16, 15, 0
    holder.compress(JPEG2000Lossless, np.zeros((LIE_SIDE, LIE_SIDE), np.uint16))
    paths = c.series("j2k_codestream_lies", shape=(32, 32, HUGE_FILES))

    def change(ds) -> None:
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = holder.PixelData
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    _edit(paths, change)
    return paths[0].parent


@_case("rle_declares_huge", "failed")
def _rle_declares_huge(c: _Corpus) -> Path:
    # an RLE header with two segments (16-bit) and a few runs of zeros
    header = (2).to_bytes(4, "little") + (64).to_bytes(4, "little") + (96).to_bytes(4, "little") + bytes(52)
    runs = bytes([0x81, 0]) * 16
    return _declare_huge(c, "rle_declares_huge", RLELossless, header + runs + runs, True)


@_case("uncompressed_declares_huge", "failed")
def _uncompressed_declares_huge(c: _Corpus) -> Path:
    return _declare_huge(c, "uncompressed_declares_huge", pydicom.uid.ExplicitVRLittleEndian, bytes(2048), False)


@_case("deflated_bomb", "skipped file")
def _deflated_bomb(c: _Corpus) -> Path:
    """The dataset is deflated by hand: a private OB element of BOMB_BYTES zeros comes before
    the image elements, so even a header read has to inflate past it."""
    folder = c.folder("deflated_bomb")
    path = c.series("deflated_bomb", folder, shape=(32, 32, 1))[0]
    ds = pydicom.dcmread(path)
    path.unlink()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = _file_meta_bytes(ds)
    body = _explicit_dataset_bytes(ds)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    tag = (0x0009).to_bytes(2, "little") + (0x0010).to_bytes(2, "little")
    creator = tag + b"LO" + (6).to_bytes(2, "little") + b"BOMB  "
    element = (
        (0x0009).to_bytes(2, "little") + (0x1010).to_bytes(2, "little") + b"OB\0\0" + BOMB_BYTES.to_bytes(4, "little")
    )
    split = _after_group_8(body)
    parts = [squeeze.compress(body[:split] + creator + element)]
    zeros = bytes(_CHUNK)
    for _ in range(BOMB_BYTES // _CHUNK):
        parts.append(squeeze.compress(zeros))
    parts.append(squeeze.compress(bytes(BOMB_BYTES % _CHUNK) + body[split:]))
    parts.append(squeeze.flush())
    out = folder / "IM0001.dcm"
    out.write_bytes(meta + b"".join(parts))
    return folder


def _file_meta_bytes(ds) -> bytes:
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    return buf.getvalue()


def _explicit_dataset_bytes(ds) -> bytes:
    from io import BytesIO

    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    buf = BytesIO()
    fp = DicomFileLike(buf)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    clean = pydicom.Dataset()
    clean.update({k: v for k, v in ds.items()})
    clean.set_original_encoding(False, True)
    write_dataset(fp, clean)
    return buf.getvalue()


def _after_group_8(body: bytes) -> int:
    """Offset of the first element past group 0008 (where a group 0009 element belongs)."""
    pos = 0
    while pos + 8 <= len(body):
        group = int.from_bytes(body[pos : pos + 2], "little")
        if group > 0x0008:
            return pos
        vr = body[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            length = int.from_bytes(body[pos + 8 : pos + 12], "little")
            pos += 12 + length
        else:
            pos += 8 + int.from_bytes(body[pos + 6 : pos + 8], "little")
    return pos


@_case("deflated_valid", "complete")
def _deflated_valid(c: _Corpus) -> Path:
    return c.series("deflated_valid", transfer_syntax=DeflatedExplicitVRLittleEndian)[0].parent


@_case("nifti_gz_bomb", "failed")
def _nifti_gz_bomb(c: _Corpus) -> Path:
    hdr = _nifti_header("nifti_gz_bomb", NIFTI_BOMB_SHAPE, np.int16)
    hdr.set_sform(_grid_affine(), code="scanner")
    hdr["vox_offset"], hdr["magic"] = 352, b"n+1"
    path = c.folder("nifti_gz_bomb") / "bad_nifti_gz_bomb.nii.gz"
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)
    total = int(np.prod(NIFTI_BOMB_SHAPE)) * 2
    parts = [squeeze.compress(hdr.binaryblock + bytes(4))]
    zeros = bytes(_CHUNK)
    for _ in range(total // _CHUNK):
        parts.append(squeeze.compress(zeros))
    parts.append(squeeze.compress(bytes(total % _CHUNK)))
    parts.append(squeeze.flush())
    path.write_bytes(b"".join(parts))
    return path.parent


@_case("nifti_huge_dims", "failed")
def _nifti_huge_dims(c: _Corpus) -> Path:
    hdr = _nifti_header("nifti_huge_dims", NIFTI_HUGE_SHAPE)
    hdr.set_sform(_grid_affine(), code="scanner")
    path = c.folder("nifti_huge_dims") / "bad_nifti_huge_dims.nii"
    return _write_raw_nifti(path, hdr, np.zeros(1024, np.float32)).parent
