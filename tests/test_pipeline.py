"""End to end: archive -> loaders -> views -> encoder -> heads -> mapping -> Zarr store."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

import engine
from engine import plugins
from engine.discover import sanitise_key
from engine.geometry import apply_affine
from engine.pipeline import run
from engine.store import open_store
from engine.synthetic import derive_uid, make_grid, write_bad_inputs, write_demo_archive, write_dicom_series
from engine.synthetic.bad_inputs import BASIC_CASES
from engine.validate import validate_store

pytestmark = pytest.mark.slow
HEADS = ["classify", "regress", "segment", "localize", "ground", "retrieve"]
QUERIES = ["lesion in the brain", "fluid collection"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    manifest = write_demo_archive(root / "demo", studies=2, seed=3)
    bad = write_bad_inputs(root / "bad", seed=3, cases=BASIC_CASES)
    return root, manifest, bad


@pytest.fixture(scope="module")
def first_run(archive, tmp_path_factory):
    root, manifest, bad = archive
    out = tmp_path_factory.mktemp("out") / "results.zarr"
    events = []
    summary = run(
        [manifest.dicom_root, root / "bad"],
        out,
        heads=HEADS,
        backend="torch",
        workers=2,
        queries=QUERIES,
        on_event=events.append,
    )
    return out, summary, events


def test_every_demo_series_is_complete_with_every_declared_output(archive, first_run):
    _, manifest, _ = archive
    out, summary, _ = first_run
    store = open_store(out)
    grounded = set()
    for truth in manifest.series:
        key = sanitise_key(truth.series_uid)
        attrs = store.series_attrs(key)
        assert attrs is not None, f"{key} missing from the store"
        assert attrs["status"] == "complete", (key, attrs.get("reason"))
        geo = attrs["geometry"]
        # the loader may order axes differently from the writer; the world grid must be the same
        ours = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(geo["shape"], np.uint8), np.asarray(geo["affine"])))
        theirs = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(truth.shape, np.uint8), truth.affine_array))
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
        scores = store.read_output(key, "classify", "region")
        assert scores.shape == (4,) and np.isclose(scores.sum(), 1.0, atol=1e-4)
        mask = store.read_output(key, "segment", "anatomy")
        assert mask.shape == tuple(geo["shape"]) and mask.dtype == np.uint8
        emb = store.read_output(key, "retrieve", "embedding")
        assert np.isclose(np.linalg.norm(emb), 1.0, atol=1e-4)
        ground = store.read_output(key, "ground", "regions")
        queries = ground["queries"].tolist()
        assert queries, f"{key}: the grounding head stored no query"
        assert set(queries) <= set(QUERIES) and len(queries) == len(set(queries))
        assert len(ground["world"]) == len(ground["scores"]) == len(queries)  # one box per query
        grounded.update(queries)
        for head, output in (("localize", "lesions"), ("ground", "regions")):
            boxes = store.read_output(key, head, output)
            from engine.geometry import world_bounds

            bounds = world_bounds(tuple(geo["shape"]), np.asarray(geo["affine"]))
            assert (boxes["world"][:, :3] >= bounds[:3] - 1e-6).all() and (
                boxes["world"][:, 3:] <= bounds[3:] + 1e-6
            ).all()
        assert store.read_output(key, "regress", "lesion_volume").shape == ()
    assert summary.count("complete") == len(manifest.series)
    assert grounded == set(QUERIES)  # every query was grounded somewhere


def test_bad_input_is_recorded_on_its_series_and_costs_nothing_else(archive, first_run):
    _, _, bad = archive
    out, summary, events = first_run
    store = open_store(out)
    by_desc = {attrs.get("description"): attrs for _, attrs in store.iter_series()}
    assert by_desc["BAD MISSING_SLICE"]["status"] == "failed"
    assert "missing" in by_desc["BAD MISSING_SLICE"]["reason"].lower()
    assert by_desc["BAD MIXED_SIZE"]["status"] == "failed"
    assert by_desc["BAD TRUNCATED"]["status"] == "failed"
    # the reason says what is wrong, and names no path below the archive root
    assert (
        "truncated" in by_desc["BAD TRUNCATED"]["reason"] and "bad_truncated" not in by_desc["BAD TRUNCATED"]["reason"]
    )
    assert by_desc["BAD CT"]["status"] == "skipped" and "CT" in by_desc["BAD CT"]["reason"]
    assert any("not a DICOM or NIfTI file" in w for w in summary.warnings), summary.warnings
    assert summary.exit_code == 1
    kinds = [e["event"] for e in events]
    assert kinds[0] in ("warning", "scan") and kinds[-1] == "done"


def test_the_store_matches_its_schema(first_run):
    out, _, _ = first_run
    assert validate_store(out) == []
    index = zarr.open_group(str(out / "index"), mode="r")
    keys = index["series_key"][...]
    assert index["embedding"].shape == (len(keys), 64)
    run_attrs = open_store(out).runs()[first_run[1].run_id]
    assert run_attrs["backend"]["name"] and run_attrs["backend"]["reason"]
    assert run_attrs["model"]["fingerprint"].startswith("sha256:")


def test_resume_skips_complete_series_and_overwrite_redoes_them(archive, first_run, tmp_path):
    _, manifest, _ = archive
    out, first, _ = first_run
    store = open_store(out)
    key = sanitise_key(manifest.series[0].series_uid)
    written = store.series_attrs(key)["written"]
    again = run([manifest.dicom_root], out, heads=HEADS, backend="torch", workers=0, queries=QUERIES)
    assert again.count("resumed") == len(manifest.series) and again.count("complete") == 0
    assert open_store(out).series_attrs(key)["written"] == written
    # a subset of the heads already done is resumed too
    subset = run([manifest.dicom_root], out, heads=["classify"], backend="torch", workers=0)
    assert subset.count("resumed") == len(manifest.series)
    one = Path(manifest.root) / manifest.series[0].dicom_dir
    redone = run([one], out, heads=["classify"], backend="torch", workers=0, overwrite=True)
    assert redone.count("complete") == 1
    attrs = open_store(out).series_attrs(key)
    assert set(attrs["heads"]) == {"classify"}  # overwrite starts the series afresh
    assert validate_store(out) == []


def test_adding_a_head_keeps_the_outputs_already_written(archive, tmp_path):
    _, manifest, _ = archive
    one = Path(manifest.root) / manifest.series[0].dicom_dir
    key = sanitise_key(manifest.series[0].series_uid)
    out = tmp_path / "r.zarr"
    first = run([one], out, heads=["classify"], backend="torch", workers=0)
    region = open_store(out).read_output(key, "classify", "region")
    added = run([one], out, heads=["classify", "retrieve"], backend="torch", workers=0)
    assert added.count("complete") == 1
    store = open_store(out)
    heads = store.series_attrs(key)["heads"]
    assert set(heads) == {"classify", "retrieve"}
    # only the missing head ran: classify's record still names the run that wrote it
    assert heads["classify"]["run_id"] == first.run_id and heads["retrieve"]["run_id"] == added.run_id
    np.testing.assert_allclose(store.read_output(key, "classify", "region"), region, rtol=1e-6)
    assert store.read_output(key, "retrieve", "embedding").shape == (64,)
    # a head's parameters are part of its fingerprint: changing them redoes the series
    assert run([one], out, heads=["retrieve"], backend="torch", workers=0).count("resumed") == 1
    assert (
        run([one], out, heads=["localize"], backend="torch", workers=0, params={"localize": {"threshold": 0.9}}).count(
            "complete"
        )
        == 1
    )
    assert set(open_store(out).series_attrs(key)["heads"]) == {"classify", "retrieve", "localize"}
    assert validate_store(out) == []


class BrokenHead(engine.Head):
    manifest_path = (
        Path(__file__).resolve().parents[1]
        / "examples"
        / "mrfm-head-brightness"
        / "mrfm_head_brightness"
        / "manifest.json"
    )

    @classmethod
    def manifest(cls):
        return json.loads(cls.manifest_path.read_text()) | {"name": "broken"}

    def predict(self, batch):
        return [{"bright_fraction": 7.0, "cls_norm": 1.0} for _ in batch]  # outside its declared range


class BrokenPlugin:
    @engine.hookimpl
    def register_heads(self, register):
        register(BrokenHead)


def test_a_head_breaking_its_declaration_is_rejected_while_other_heads_are_written(archive, tmp_path):
    _, manifest, _ = archive
    plugin = BrokenPlugin()
    plugins.pm.register(plugin, name="broken-test")
    try:
        series_dir = Path(manifest.root) / manifest.series[0].dicom_dir
        summary = run([series_dir], tmp_path / "r.zarr", heads=["classify", "broken"], backend="torch", workers=0)
    finally:
        plugins.pm.unregister(plugin)
    store = open_store(tmp_path / "r.zarr")
    attrs = store.series_attrs(sanitise_key(manifest.series[0].series_uid))
    assert attrs["status"] == "failed"
    assert "head 'broken' output 'bright_fraction': values outside the declared range [0, 1]" in attrs["reason"]
    assert attrs["heads"]["broken"]["error"] and attrs["heads"]["classify"]["error"] is None
    assert store.read_output(sanitise_key(manifest.series[0].series_uid), "classify", "region").shape == (4,)
    assert summary.exit_code == 1


# ---- the mask round trip through the whole pipeline ---------------------------------------------
CENTER = np.array([10.0, -15.0, 20.0])
RADII = np.array([30.0, 22.0, 18.0])


class ThresholdHead(engine.Head):
    """Marks the bright synthetic structure in view space: it never sees an affine."""

    manifest_path = Path("threshold.json")

    @classmethod
    def manifest(cls):
        return {
            "name": "threshold",
            "version": "1",
            "encoder": {"fingerprint": "any"},
            "inputs": {"view": "tiles", "image": True, "features": []},
            "outputs": [{"name": "mask", "kind": "mask", "dtype": "uint8", "labels": ["background", "structure"]}],
        }

    def predict(self, batch):
        out = []
        for item in batch:
            img = item.image[0].numpy()
            fg = (img > (img.max() + img.min()) / 2).astype(np.float32)
            out.append({"mask": np.stack([1 - fg, fg])})
        return out


class ThresholdPlugin:
    @engine.hookimpl
    def register_heads(self, register):
        register(ThresholdHead)


@pytest.mark.parametrize(
    "orientation, flip",
    [("axial", ()), ("sagittal", ()), ("coronal", ()), ("oblique", ()), ("axial", ("slice", "row"))],
)
def test_a_view_space_mask_maps_back_to_the_native_structure(tmp_path, orientation, flip):
    shape, affine = make_grid(
        orientation, CENTER + [4, -3, 2], shape=(128, 112, 36), spacing=(1.2, 1.2, 3.0), flip=flip
    )
    idx = np.indices(shape).reshape(3, -1).T
    truth = ((((apply_affine(affine, idx) - CENTER) / RADII) ** 2).sum(1) <= 1).reshape(shape)
    write_dicom_series(
        tmp_path / "in",
        truth * 800.0 + 100.0,
        affine,
        study_uid=derive_uid("rt", "study"),
        series_uid=derive_uid("rt", orientation, *flip),
        description=orientation,
    )
    plugin = ThresholdPlugin()
    plugins.pm.register(plugin, name="threshold-test")
    try:
        run([tmp_path / "in"], tmp_path / "r.zarr", heads=["threshold"], backend="torch", workers=0)
    finally:
        plugins.pm.unregister(plugin)
    store = open_store(tmp_path / "r.zarr")
    ((key, attrs),) = list(store.iter_series())
    assert attrs["status"] == "complete", attrs.get("reason")
    mask = store.read_output(key, "threshold", "mask").astype(bool)
    # the structure computed directly on the native grid as loaded (the loader may reorder axes)
    shape, affine = tuple(attrs["geometry"]["shape"]), np.asarray(attrs["geometry"]["affine"])
    idx = np.indices(shape).reshape(3, -1).T
    truth = ((((apply_affine(affine, idx) - CENTER) / RADII) ** 2).sum(1) <= 1).reshape(shape)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice >= 0.95, dice


def test_a_store_inside_the_archive_is_not_read_as_input(archive, tmp_path):
    _, manifest, _ = archive
    import shutil

    folder = tmp_path / "archive"
    shutil.copytree(Path(manifest.root) / manifest.series[0].dicom_dir, folder / "series")
    first = run([folder], folder / "results.zarr", heads=["classify"], backend="torch", workers=0)
    second = run([folder], folder / "results.zarr", heads=["classify"], backend="torch", workers=0)
    assert first.count("complete") == 1 and second.count("resumed") == 1
    assert all("Zarr store" in w for w in second.warnings), second.warnings  # at most: the store was passed over


def test_an_archive_without_series_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(engine.UsageError, match="no DICOM or NIfTI series found"):
        run([tmp_path / "empty"], tmp_path / "r.zarr", heads=["classify"], backend="torch", workers=0)
    assert not (tmp_path / "r.zarr").exists()  # refused before anything was written


def test_the_ray_executor_without_ray_is_a_usage_error_saying_how_to_install(archive, tmp_path, monkeypatch):
    import sys

    from click.testing import CliRunner

    from engine.cli import cli

    _, manifest, _ = archive
    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the ray extra sees
    with pytest.raises(engine.UsageError, match=r"pip install 'mrfm\[ray\]'"):
        run([manifest.dicom_root], tmp_path / "r.zarr", heads=["classify"], backend="torch", executor="ray")
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(manifest.dicom_root),
            "--out",
            str(tmp_path / "r.zarr"),
            "--heads",
            "classify",
            "--backend",
            "torch",
            "--executor",
            "ray",
        ],
    )
    assert result.exit_code == 2 and "pip install 'mrfm[ray]'" in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r.zarr").exists()  # refused before anything was written


def test_every_series_records_what_processed_it(first_run):
    import socket

    out, summary, _ = first_run
    store = open_store(out)
    for _, attrs in store.iter_series():
        assert (attrs["executor"], attrs["node"], attrs["actor"]) == ("local", socket.gethostname(), "driver")
    record = store.runs()[summary.run_id]
    assert record["executor"]["name"] == "local" and record["config"]["executor"] == "local"
