"""Small nodes encoded by engine.zarr_nodes read back through zarr itself, with zarr's metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from engine.zarr_nodes import SMALL_BYTES, small_array_kwargs, store_codecs
from engine.zarr_nodes import array_documents, group_document

VALUES = {
    "boxes": np.arange(12, dtype=np.float64).reshape(2, 6) / 7,
    "scores": np.asarray([0.25, -1.5, np.inf], dtype=np.float32),
    "scalar": np.float32(3.5),
    "ints": np.asarray([[1, -2], [3, 2**40]], dtype=np.int64),
    "bytes": np.arange(5, dtype=np.uint8),
    "none": np.zeros((0, 6), dtype=np.float64),
    "labels": np.asarray(["lesion", "", "Läsion ∅ 病変"]),
    "no_labels": np.asarray([], dtype=str),
    "big": np.tile(np.linspace(0, 1, 512, dtype=np.float32), 64),  # >= SMALL_BYTES: zstd
}


def write(root, name: str, value: np.ndarray, attrs=None) -> None:
    value = np.asarray(value)
    compress = value.dtype.kind == "U" or value.nbytes >= SMALL_BYTES
    for key, raw in array_documents(name, value, store_codecs(compress), attrs).items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)


@pytest.mark.parametrize("name", sorted(VALUES))
def test_an_array_reads_back_through_zarr_with_zarrs_own_metadata(tmp_path, name):
    value = np.asarray(VALUES[name])
    (tmp_path / "zarr.json").write_bytes(group_document({"a": 1}))
    write(tmp_path, name, value, {"kind": "scores", "labels": ["x"]})
    arr = zarr.open_group(tmp_path, mode="r")[name]
    got = arr[...]
    assert got.shape == value.shape
    if value.dtype.kind == "U":
        assert [str(s) for s in np.asarray(got).ravel()] == [str(s) for s in value.ravel()]
    else:
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)
    assert dict(arr.attrs) == {"kind": "scores", "labels": ["x"]}

    # the metadata is what zarr writes for the same array through its own API
    zarr.open_group(tmp_path / "ref.zarr", mode="w").create_array(name, **small_array_kwargs(value, None))
    ours = json.loads((tmp_path / name / "zarr.json").read_bytes())
    theirs = json.loads((tmp_path / "ref.zarr" / name / "zarr.json").read_bytes())
    ours.pop("attributes"), theirs.pop("attributes")
    assert ours == theirs


def test_the_chunk_carries_a_crc32c_of_its_bytes_and_damage_is_caught(tmp_path):
    write(tmp_path, "s", VALUES["scores"])
    chunk = tmp_path / "s" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(tmp_path / "s", mode="r")[...]


def test_an_empty_array_has_no_chunk_and_a_scalar_has_one(tmp_path):
    write(tmp_path, "none", VALUES["none"])
    write(tmp_path, "scalar", VALUES["scalar"])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "none/zarr.json",
        "scalar/c",
        "scalar/zarr.json",
    ]
