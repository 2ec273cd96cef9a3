"""Decoding is bounded: a per-series memory budget checked against declared sizes before any
decode or inflate, streamed inflation with a size and a ratio cap, Deflated DICOM read right,
and small text inputs (--report, --job) read only when they are small regular files."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from engine import memory_budget
from engine.bounded_read import MAX_RATIO, RATIO_MIN_BYTES, inflate, read_text_file
from engine.discover import load, scan
from engine.errors import UsageError
from engine.memory_budget import GIB, MIB, OverBudget, parse_size
from engine.synthetic import derive_uid, make_grid, write_dicom_series
from engine.synthetic.bad_inputs import write_bad_inputs

ROOT = Path(__file__).resolve().parents[1]


# ---- sizes and the default ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GiB", 2 * GIB),
        ("512 MiB", 512 * MIB),
        ("1.5G", int(1.5 * GIB)),
        ("3000000", 3_000_000),
        ("2GB", 2_000_000_000),
        (4 * MIB, 4 * MIB),
    ],
)
def test_sizes_parse_in_binary_and_decimal_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2 parsecs", "-1GiB", "100", True])
def test_bad_sizes_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_default_budget_is_two_gib_or_a_quarter_of_memory():
    memory = memory_budget.available_memory()
    expected = 2 * GIB if memory is None else min(2 * GIB, memory // 4)
    assert memory_budget.default_max_series_bytes() == max(memory_budget.MIN_BUDGET, expected)


# ---- streamed inflation ---------------------------------------------------------------------------


def _gzip_of_zeros(n: int) -> bytes:
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1024 * 1024)
    parts = [squeeze.compress(chunk) for _ in range(n // len(chunk))]
    return b"".join(parts) + squeeze.flush()


def test_inflation_stops_at_the_ratio_cap_without_holding_the_bomb():
    bomb = _gzip_of_zeros(256 * MIB)  # ~250 KB, ~1000:1
    tracemalloc.start()
    with pytest.raises(OverBudget, match=f"more than {MAX_RATIO}:1"):
        inflate(io.BytesIO(bomb), limit=4 * GIB, what="bomb.gz")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < RATIO_MIN_BYTES * 2.5  # stopped near the ratio threshold, never near 256 MiB


def test_inflation_stops_at_the_size_cap_with_the_budget_in_the_message():
    data = np.random.default_rng(0).integers(0, 255, 3 * MIB, dtype=np.uint8).tobytes()  # incompressible
    with pytest.raises(OverBudget, match=r"inflating needs more than 0.00195 GiB, budget 0.00195 GiB"):
        inflate(io.BytesIO(gzip.compress(data)), limit=2 * MIB, what="big.gz")


def test_inflation_returns_the_same_bytes_as_gzip_for_concatenated_members_and_stops_at_want():
    a, b = b"first member " * 1000, b"second member " * 1000
    blob = gzip.compress(a) + gzip.compress(b)
    assert inflate(io.BytesIO(blob), limit=GIB, what="x") == gzip.decompress(blob)
    assert inflate(io.BytesIO(blob), limit=GIB, what="x", want=100) == (a + b)[:100]
    with pytest.raises(EOFError):
        inflate(io.BytesIO(blob[: len(blob) // 3]), limit=GIB, what="x")


# ---- Deflated Explicit VR Little Endian ------------------------------------------------------------


def _twin_series(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    data = 100.0 + 900.0 * rng.random((24, 20, 6))
    _, affine = make_grid("oblique", (3.0, -5.0, 12.0), shape=data.shape, spacing=(1.2, 1.1, 3.0))
    out = []
    for ts in ("explicit", "1.2.840.10008.1.2.1.99"):
        folder = tmp_path / ("deflated" if ts != "explicit" else "explicit")
        write_dicom_series(
            folder,
            data,
            affine,
            study_uid=derive_uid(7, "st"),
            series_uid=derive_uid(7, ts),
            transfer_syntax=ts,
            rescale=(0.5, -20.0),
        )
        out.append(folder)
    return out[0], out[1]


def test_deflated_series_loads_bitwise_equal_to_its_uncompressed_twin(tmp_path):
    explicit, deflated = _twin_series(tmp_path)
    plain, squeezed = scan([explicit]), scan([deflated])
    assert not squeezed.skipped and len(squeezed.series) == 1
    ref = squeezed.series[0]
    assert ref.problems == [] and ref.meta["transfer_syntax"] == "1.2.840.10008.1.2.1.99"
    a, b = load(plain.series[0]), load(ref)
    assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
    assert np.array_equal(a.affine, b.affine)


def test_deflated_bomb_is_skipped_during_scan_with_its_reason(tmp_path):
    cases = write_bad_inputs(tmp_path, seed=0, cases=["deflated_bomb"])
    tracemalloc.start()
    result = scan([cases["deflated_bomb"]])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.series == [] and result.files_seen == 1
    [skipped] = result.skipped
    assert skipped.kind == "too-large" and "decompression bomb" in skipped.reason
    assert peak < 3 * RATIO_MIN_BYTES  # the 150 MB dataset was never held


def test_deflated_file_inflating_past_the_budget_is_skipped_during_scan_with_the_budget(tmp_path):
    data = np.random.default_rng(1).random((1024, 1024, 1)) * 4000  # 2 MiB stored, incompressible
    _, affine = make_grid("axial", (0.0, 0.0, 0.0), shape=data.shape, spacing=(0.5, 0.5, 3.0))
    write_dicom_series(
        tmp_path / "big",
        data,
        affine,
        study_uid=derive_uid(1, "st"),
        series_uid=derive_uid(1, "se"),
        transfer_syntax="1.2.840.10008.1.2.1.99",
    )
    result = scan([tmp_path / "big"], max_series_bytes=MIB)
    assert result.series == []
    [skipped] = result.skipped
    assert skipped.kind == "too-large" and "budget 0.000977 GiB" in skipped.reason
    assert len(scan([tmp_path / "big"], max_series_bytes=64 * MIB).series) == 1


# ---- declared sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["j2k_declares_huge", "rle_declares_huge", "uncompressed_declares_huge", "nifti_huge_dims"]
)
def test_a_series_declaring_more_than_the_budget_fails_before_decoding(tmp_path, case):
    folder = write_bad_inputs(tmp_path, seed=0, cases=[case])[case]
    [ref] = scan([folder]).series
    assert ref.needs_bytes > 2 * GIB
    assert any("budget" in p for p in ref.problems)
    tracemalloc.start()
    with pytest.raises(OverBudget, match=r"needs [0-9.e+]+ GiB.*, budget [0-9.]+ GiB"):
        load(ref)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * MIB


def test_a_compressed_file_declaring_far_more_than_it_holds_fails_even_within_the_budget(tmp_path):
    folder = write_bad_inputs(tmp_path, seed=0, cases=["j2k_declares_huge"])["j2k_declares_huge"]
    [ref] = scan([folder], max_series_bytes="64GiB").series
    with pytest.raises(Exception, match=f"more than {MAX_RATIO}:1"):
        load(ref)


def test_nifti_gz_bomb_fails_at_the_ratio_cap_and_a_zipped_one_is_scanned_from_its_header(tmp_path):
    import zipfile

    folder = write_bad_inputs(tmp_path, seed=0, cases=["nifti_gz_bomb"])["nifti_gz_bomb"]
    [ref] = scan([folder], max_series_bytes="4GiB").series  # within the budget: the ratio cap must stop it
    assert ref.dims == (1024, 1024, 128) and ref.needs_bytes < 4 * GIB
    with pytest.raises(OverBudget, match="decompression bomb"):
        load(ref)
    member = next(folder.iterdir())
    with zipfile.ZipFile(tmp_path / "z.zip", "w", zipfile.ZIP_STORED) as zf:
        zf.write(member, member.name)
    tracemalloc.start()
    [zref] = scan([tmp_path / "z.zip"], max_series_bytes="4GiB").series
    with pytest.raises(OverBudget):
        load(zref)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3 * RATIO_MIN_BYTES


def test_a_zipped_nifti_gz_loads_equal_to_the_file(tmp_path):
    import zipfile

    import nibabel as nib

    data = np.random.default_rng(3).random((12, 10, 5, 2)).astype(np.float32)
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.write(path, "img.nii.gz")
    on_disk, zipped = load(scan([path]).series[0]), load(scan([tmp_path / "a.zip"]).series[0])
    assert np.array_equal(on_disk.data, data[..., 0]) and np.array_equal(zipped.data, data[..., 0])


# ---- small text inputs -------------------------------------------------------------------------------


def test_text_inputs_must_be_small_regular_files(tmp_path):
    good = tmp_path / "report.txt"
    good.write_bytes("lesion in the left frontal lobe \xff".encode("latin-1"))
    assert read_text_file(good, what="report").startswith("lesion")
    with pytest.raises(UsageError, match="not a regular file"):
        read_text_file("/dev/zero", what="report")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(UsageError, match="more than"):
        read_text_file(big, what="report", limit=1024)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_cli_refuses_dev_zero_as_report_or_job_with_exit_2_and_no_traceback(tmp_path):
    for args in (["search", str(tmp_path / "nostore.zarr"), "--report", "/dev/zero"], ["run", "--job", "/dev/zero"]):
        done = _cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "not a regular file" in done.stderr and "Traceback" not in done.stderr


def test_job_file_max_series_bytes_is_validated(tmp_path):
    from engine.schemas import validate

    validate("job", {"archives": ["a"], "out": "o", "max_series_bytes": "512MiB"}, "job")
    validate("job", {"archives": ["a"], "out": "o", "max_series_bytes": 2 * GIB}, "job")
    with pytest.raises(ValueError):
        validate("job", {"archives": ["a"], "out": "o", "max_series_bytes": "a lot"}, "job")
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps({"archives": [str(tmp_path)], "out": str(tmp_path / "o.zarr"), "max_series_bytes": "1KiB"})
    )
    done = _cli("run", "--job", str(job))
    assert done.returncode == 2 and "at least 1 MiB" in done.stderr and "Traceback" not in done.stderr


def test_a_file_declaring_a_billion_frames_is_scanned_without_listing_them(tmp_path):
    import pydicom

    folder = write_bad_inputs(tmp_path, seed=0, cases=["uncompressed_declares_huge"])["uncompressed_declares_huge"]
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.NumberOfFrames, ds.Rows, ds.Columns = 10**9, 512, 512
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR
    ds.save_as(first)
    for other in sorted(folder.iterdir())[1:]:
        other.unlink()
    [ref] = scan([folder]).series
    assert ref.needs_bytes > 10**9 * 512 * 512 * 2
    with pytest.raises(OverBudget, match="needs"):
        load(ref)


def test_a_codestream_declaring_more_than_the_header_is_refused_before_decoding(tmp_path):
    folder = write_bad_inputs(tmp_path, seed=0, cases=["j2k_codestream_lies"])["j2k_codestream_lies"]
    [ref] = scan([folder]).series
    tracemalloc.start()
    with pytest.raises(Exception, match=r"declares 4096 x 4096 x 1 samples, the header 32 x 32 x 1"):
        load(ref)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * MIB  # a decode would have filled 32 MiB


def test_codestream_sizes_are_read_from_jpeg_and_jpeg2000_headers():
    from engine.dicom.codestream import codestream_size

    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + (640).to_bytes(4, "big") + (480).to_bytes(4, "big") + bytes(16)
    siz += bytes(8) + (1).to_bytes(2, "big")  # XTsiz, YTsiz, XTOsiz, YTOsiz, then Csiz
    assert codestream_size(siz) == (480, 640, 1)
    sof = (
        b"\xff\xd8"
        + b"\xff\xe0\x00\x04ab"
        + b"\xff\xc3\x00\x0b\x10"
        + (300).to_bytes(2, "big")
        + (200).to_bytes(2, "big")
        + b"\x01"
    )
    assert codestream_size(sof) == (300, 200, 1)
    assert codestream_size(b"\x02\x00\x00\x00") is None
