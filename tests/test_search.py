"""Search over a store's index: ranking on constructed indexes, and search() on small stores."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zarr

from engine.errors import StoreError, UsageError
from engine.search import Hit, index_embeddings, rank, search

FINGERPRINT = "sha256:" + "ab" * 32


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def write_store(
    path, keys, embeddings, *, compressed=False, checksummed=False, model=None, studies=None, descriptions=None
):
    """A minimal store with the index layout the result store writes."""
    root = zarr.create_group(
        str(path), zarr_format=3, attributes={"model": model or {"path": None, "fingerprint": FINGERPRINT}}
    )
    index = root.create_group("index")
    n = len(keys)
    for name, values in (
        ("series_key", keys),
        ("study_uid", studies or [f"1.2.{i // 2}" for i in range(n)]),
        ("description", descriptions or [f"series {k}" for k in keys]),
    ):
        index.create_array(name, shape=(n,), dtype=str, chunks=(max(n, 1),))[...] = np.asarray(values, dtype=str)
    if embeddings is not None:
        emb = np.asarray(embeddings, dtype="<f4")
        arr = index.create_array(
            "embedding",
            shape=emb.shape,
            chunks=emb.shape,
            dtype="<f4",
            compressors="auto" if compressed else ([zarr.codecs.Crc32cCodec()] if checksummed else None),
        )
        arr[...] = emb
    return path


# ---- rank -----------------------------------------------------------------------------------


def test_rank_finds_known_nearest_neighbours_best_first():
    emb = np.eye(4, dtype=np.float32)
    idx, scores = rank(emb, [0.1, 0.2, 0.9, 0.5], k=3)
    assert idx.tolist() == [2, 3, 1]
    expected = np.array([0.9, 0.5, 0.2]) / np.linalg.norm([0.1, 0.2, 0.9, 0.5])
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_rank_normalises_the_query():
    rng = np.random.default_rng(0)
    emb = unit(rng.normal(size=(50, 8)))
    q = rng.normal(size=8)
    idx1, s1 = rank(emb, q, k=5)
    idx2, s2 = rank(emb, 37.0 * q, k=5)
    assert idx1.tolist() == idx2.tolist()
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
    assert (np.abs(s1) <= 1 + 1e-6).all()


def test_rank_matches_a_full_sort():
    rng = np.random.default_rng(1)
    emb = unit(rng.normal(size=(2000, 64)))
    q = rng.normal(size=64)
    idx, scores = rank(emb, q, k=25)
    full = emb @ (q / np.linalg.norm(q))
    assert idx.tolist() == np.argsort(-full, kind="stable")[:25].tolist()
    np.testing.assert_allclose(scores, full[idx], rtol=1e-5)


def test_rank_orders_ties_by_row_and_keeps_them_at_the_cut():
    emb = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [1, 0], [-1, 0]], dtype=np.float32)
    idx, scores = rank(emb, [1, 0], k=2)
    assert idx.tolist() == [1, 2]
    idx, _ = rank(emb, [1, 0], k=4)
    assert idx.tolist() == [1, 2, 4, 0]


def test_rank_with_k_larger_than_the_index_returns_everything():
    emb = unit([[1, 0], [0.6, 0.8], [0, 1]])
    idx, scores = rank(emb, [1, 0], k=10)
    assert idx.tolist() == [0, 1, 2]
    assert len(scores) == 3


def test_rank_excludes_rows():
    emb = unit([[1, 0], [0.9, 0.1], [0, 1]])
    idx, _ = rank(emb, [1, 0], k=10, exclude=0)
    assert idx.tolist() == [1, 2]
    idx, _ = rank(emb, [1, 0], k=1, exclude=[0, 1])
    assert idx.tolist() == [2]
    idx, scores = rank(emb, [1, 0], k=3, exclude=[0, 1, 2])
    assert len(idx) == 0 and len(scores) == 0


def test_rank_refuses_bad_queries():
    emb = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="zero"):
        rank(emb, [0, 0, 0], k=1)
    with pytest.raises(ValueError, match="dimensions"):
        rank(emb, [1, 0], k=1)


def test_rank_is_fast_for_100k_series(tmp_path):
    rng = np.random.default_rng(2)
    emb = unit(rng.normal(size=(100_000, 64)))
    q = rng.normal(size=64)
    rank(emb, q, k=10)
    start = time.perf_counter()
    idx, _ = rank(emb, q, k=10)
    assert time.perf_counter() - start < 0.5
    assert idx[0] == int(np.argmax(emb @ q))


# ---- search on a store ----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    emb = unit([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0.7, 0.7, 0, 0], [0, 0, 0, 1]])
    keys = ["s0", "s1", "s2", "s3", "s4"]
    return write_store(
        tmp_path / "r.zarr", keys, emb, descriptions=["T1 brain", "T2 brain", "PD knee", "FLAIR brain", "T1 spine"]
    )


def test_like_ranks_other_series_and_excludes_itself(store):
    hits = search(store, like="s0", k=3)
    assert [h.series_key for h in hits] == ["s1", "s3", "s2"]
    assert hits[0] == Hit("s1", pytest.approx(float(unit([0.9, 0.1, 0, 0])[0]), abs=1e-6), "1.2.0", "T2 brain")
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_index_embeddings_are_memory_mapped_when_stored_raw(store):
    arr = zarr.open_group(str(store), mode="r")["index/embedding"]
    assert isinstance(index_embeddings(store, arr), np.memmap)


def test_checksummed_embeddings_are_mapped_and_a_damaged_one_is_not_trusted(store, tmp_path):
    root = zarr.open_group(str(store), mode="r")
    emb, keys = root["index/embedding"][...], [str(k) for k in root["index/series_key"][...]]
    other = write_store(tmp_path / "k.zarr", keys, emb, checksummed=True)
    arr = zarr.open_group(str(other), mode="r")["index/embedding"]
    mapped = index_embeddings(other, arr)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, emb)
    chunk = other / "index" / "embedding" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="(?i)checksum"):
        index_embeddings(other, zarr.open_group(str(other), mode="r")["index/embedding"])


def test_compressed_embeddings_give_the_same_ranking(store, tmp_path):
    root = zarr.open_group(str(store), mode="r")
    emb = root["index/embedding"][...]
    keys = [str(k) for k in root["index/series_key"][...]]
    other = write_store(tmp_path / "c.zarr", keys, emb, compressed=True)
    arr = zarr.open_group(str(other), mode="r")["index/embedding"]
    assert not isinstance(index_embeddings(other, arr), np.memmap)
    ranked = [[(h.series_key, h.score) for h in search(s, like="s0", k=4)] for s in (other, store)]
    assert ranked[0] == ranked[1]


def test_search_refuses_ambiguous_or_unknown_requests(store, tmp_path):
    with pytest.raises(UsageError, match="exactly one"):
        search(store)
    with pytest.raises(UsageError, match="exactly one"):
        search(store, text="brain", like="s0")
    with pytest.raises(UsageError, match="not in the index"):
        search(store, like="nope")
    bare = write_store(tmp_path / "bare.zarr", ["a"], None)
    with pytest.raises(UsageError, match="retrieve"):
        search(bare, like="a")
    with pytest.raises(StoreError):
        search(tmp_path / "missing.zarr", like="a")


class FakeTower:
    """Maps each known text to a fixed vector, like a text tower would."""

    def __init__(self, table):
        self.table = table

    def encode(self, texts):
        return np.stack([self.table[t] for t in texts])


class FakeModel:
    def __init__(self, table, fingerprint=FINGERPRINT):
        self.fingerprint = fingerprint
        self._tower = FakeTower(table)

    def text_tower(self):
        return self._tower


def test_text_and_report_queries_go_through_the_text_tower(store, tmp_path):
    model = FakeModel(
        {"knee": np.array([0, 2.0, 0, 0], np.float32), "Findings: brain.": np.array([1, 0, 0, 0], np.float32)}
    )
    assert [h.series_key for h in search(store, text="knee", k=2, model=model)] == ["s2", "s3"]
    report = tmp_path / "report.txt"
    report.write_text("Findings: brain.\n")
    hits = search(store, report=report, k=2, model=model)
    assert [h.series_key for h in hits] == ["s0", "s1"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)


def test_text_search_refuses_a_model_that_did_not_embed_the_store(store):
    model = FakeModel({"knee": np.ones(4, np.float32)}, fingerprint="sha256:" + "cd" * 32)
    with pytest.raises(ValueError, match="embedded by model"):
        search(store, text="knee", model=model)


def test_text_search_with_the_default_model(tmp_path):
    import engine.model as model_mod

    try:
        model = model_mod.load_model(None)
        tower = model.text_tower()
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"default model unavailable: {exc}")
    if tower is None:
        pytest.skip("the default model has no text tower")
    texts = ["axial T2 brain with a lesion", "sagittal PD knee", "coronal T1 abdomen"]
    emb = tower.encode(texts).numpy()
    store = write_store(
        tmp_path / "m.zarr", ["b", "k", "a"], emb, model={"path": str(model.folder), "fingerprint": model.fingerprint}
    )
    for key, text in zip(["b", "k", "a"], texts):
        hits = search(store, text=text, k=3)
        assert hits[0].series_key == key and hits[0].score == pytest.approx(1.0, abs=1e-4)
