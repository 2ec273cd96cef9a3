"""`mrfm validate` catches each class of layout error it defines, naming the path."""

import shutil

import pytest
import zarr

from engine.pipeline import run
from engine.store import open_store
from engine.synthetic import write_demo_archive
from engine.validate import validate_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def valid_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    manifest = write_demo_archive(root / "archive", studies=1, seed=11)
    out = root / "r.zarr"
    run([manifest.dicom_root], out, heads=["classify", "segment", "localize", "retrieve"], backend="torch", workers=0)
    assert validate_store(out) == []
    return out


@pytest.fixture
def store(valid_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(valid_store, copy)
    return copy


def _first_key(path):
    return next(iter(open_store(path).iter_series()))[0]


def _group(path, *parts):
    return zarr.open_group(str(path.joinpath(*parts)), mode="r+")


def test_a_fresh_store_is_valid(valid_store):
    assert validate_store(valid_store) == []
    assert validate_store(valid_store, deep=True) == []


def test_a_damaged_chunk_is_named_by_deep_validation(store):
    key = _first_key(store)
    chunk = next(
        p
        for p in sorted((store / "series" / key / "segment" / "anatomy").rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    rel = chunk.relative_to(store).as_posix()
    assert f"/{rel}: checksum mismatch (the chunk's bytes are damaged)" in validate_store(store, deep=True)


def test_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "not a Zarr v3 group" in validate_store(tmp_path / "empty")[0]


def test_missing_root_attributes(store):
    g = zarr.open_group(str(store), mode="r+")
    attrs = dict(g.attrs)
    del attrs["mrfm"]
    g.attrs.clear()
    g.attrs.update(attrs)
    assert any(p.startswith("/ attrs") and "'mrfm' is a required property" in p for p in validate_store(store))


def test_unknown_status_and_missing_reason(store):
    key = _first_key(store)
    _group(store, "series", key).attrs.update({"status": "done"})
    problems = validate_store(store)
    assert any(f"/series/{key} attrs.status" in p and "'done' is not one of" in p for p in problems)
    _group(store, "series", key).attrs.update({"status": "failed", "reason": None})
    assert any(f"/series/{key} attrs.reason" in p for p in validate_store(store))


def test_series_from_an_unknown_run(store):
    key = _first_key(store)
    _group(store, "series", key).attrs.update({"run_id": "nope"})
    assert any("run 'nope' is not in the store" in p for p in validate_store(store))


def test_run_listed_but_missing(store):
    g = zarr.open_group(str(store), mode="r+")
    g.attrs.update({"runs": [*g.attrs["runs"], "ghost"]})
    assert "/runs/ghost: listed in root attrs but missing" in validate_store(store)


def test_mask_with_the_wrong_shape(store):
    key = _first_key(store)
    heads = _group(store, "series", key, "segment")
    attrs = dict(heads["anatomy"].attrs)
    del heads["anatomy"]
    a = heads.create_array("anatomy", shape=(4, 4, 4), dtype="uint8")
    a.attrs.update(attrs)
    assert any(f"/series/{key}/segment/anatomy: mask shape (4, 4, 4) differs" in p for p in validate_store(store))


def test_declared_output_missing(store):
    key = _first_key(store)
    del _group(store, "series", key, "classify")["region"]
    assert f"/series/{key}/classify/region: declared output missing" in validate_store(store)


def test_box_outside_the_series(store):
    key = _first_key(store)
    boxes = _group(store, "series", key, "localize", "lesions")
    for name in list(boxes.array_keys()):
        del boxes[name]
    boxes.create_array("world", shape=(1, 6), dtype="float64")[...] = [[0, 0, 0, 1e4, 1e4, 1e4]]
    boxes.create_array("voxel", shape=(1, 6), dtype="float64")[...] = [[0, 0, 0, 1, 1, 1]]
    boxes.create_array("scores", shape=(1,), dtype="float32")[...] = [0.9]
    assert any(
        p.endswith("/localize/lesions/world: a box lies outside the series' world bounds")
        for p in validate_store(store)
    )


def test_embedding_not_unit_norm(store):
    key = _first_key(store)
    emb = _group(store, "series", key, "retrieve")["embedding"]
    emb[...] = emb[...] * 2
    assert any("declared normalized but L2 norm" in p for p in validate_store(store))


def test_index_out_of_step_with_the_series(store):
    key = _first_key(store)
    _group(store, "series", key).attrs.update({"status": "skipped", "reason": "test"})
    problems = validate_store(store)
    assert any(p.startswith("/index/series_key:") and "not complete series" in p for p in problems)


def test_bad_series_key(store):
    key = _first_key(store)
    shutil.copytree(store / "series" / key, store / "series" / "bad key!")
    assert any("/series/bad key!: series key has characters" in p for p in validate_store(store))
