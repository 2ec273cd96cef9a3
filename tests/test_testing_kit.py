"""The head authors' kit (engine.testing, its pytest fixtures, ``mrfm new-head``) runs heads
through the real views -> predict -> checks -> mapping -> store path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import engine
import engine.testing as kit
from engine import plugins, schemas
from engine.cli import cli
from engine.geometry import voxel_centre_bounds

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mrfm-head-brightness"


def write_manifest(tmp_path: Path, name: str, outputs: list[dict], view: str = "global") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "name": name,
                "version": "0.1.0",
                "encoder": {"fingerprint": "any"},
                "inputs": {"view": view, "image": True, "features": []},
                "outputs": outputs,
            }
        )
    )
    return path


@pytest.fixture
def everything_head(tmp_path):
    """A head marking every view voxel as foreground, with a score: the simplest mapped output."""
    outputs = [
        {"name": "all", "kind": "mask", "dtype": "uint8", "labels": ["background", "all"]},
        {"name": "seen", "kind": "value", "dtype": "float32", "shape": [], "units": "voxels"},
    ]

    class Everything(engine.Head):
        manifest_path = write_manifest(tmp_path, "everything", outputs)

        def predict(self, batch):
            out = []
            for item in batch:
                probs = torch.zeros((2, *item.shape))
                probs[1] = 1.0
                out.append({"all": probs, "seen": float(np.prod(item.shape))})
            return out

    return Everything


@pytest.mark.parametrize("kind", ["axial", "oblique", "las"])
def test_run_head_returns_outputs_on_the_native_grid(everything_head, kind):
    result = kit.run_head(everything_head, kind)
    assert result.ok and result.head == "everything"
    assert result.volume.meta["synthetic"] == kind
    mask = result["all"]
    assert mask.shape == result.volume.shape and mask.dtype == np.uint8 and (mask == 1).all()
    assert float(result["seen"]) == float(np.prod(result.views["global"].shape))
    assert len(result.predicted) == len(result.inputs) == 1 and result.inputs[0].image is not None


def test_synthetic_volumes_hold_the_same_anatomy_in_every_orientation():
    centres = {}
    for kind in kit.SYNTHETIC_KINDS:
        volume = kit.synthetic_volume(kind, seed=3)
        truth = kit.synthetic_truth(volume.shape, volume.affine)
        ijk = np.argwhere(truth["bright"]).mean(axis=0)
        centres[kind] = volume.affine[:3, :3] @ ijk + volume.affine[:3, 3]
        assert volume.data[truth["bright"]].mean() > volume.data[truth["body"] & ~truth["bright"]].mean() > 50
    for kind, centre in centres.items():
        np.testing.assert_allclose(centre, kit.BRIGHT_CENTER_MM, atol=3.0, err_msg=kind)
    assert kit.synthetic_volume("axial").orientation != kit.synthetic_volume("sagittal").orientation


def test_a_failing_head_raises_with_the_reason_or_reports_it(tmp_path):
    class Nan(engine.Head):
        manifest_path = write_manifest(
            tmp_path, "nan", [{"name": "v", "kind": "value", "dtype": "float32", "shape": [], "units": "1"}]
        )

        def predict(self, batch):
            return [{"v": float("nan")} for _ in batch]

    with pytest.raises(kit.HeadRunError, match="finite"):
        kit.run_head(Nan)
    result = kit.run_head(Nan, check=False)
    assert not result.ok and "finite" in result.errors["nan"] and result.outputs == {}


def test_an_invalid_head_class_is_refused_before_running(tmp_path):
    class NoManifest(engine.Head):
        manifest_path = tmp_path / "missing.json"

        def predict(self, batch):
            return []

    with pytest.raises(kit.HeadRunError, match="missing.json"):
        kit.run_head(NoManifest)
    assert "nomanifest" not in plugins.get_head_classes()


def test_run_head_writes_the_store_and_reads_it_back(everything_head, tmp_path):
    result = kit.run_head(everything_head, "sagittal", store=tmp_path / "r.zarr")
    assert (result.stored["all"] == result["all"]).all()
    assert result.store_attrs["status"] == "complete"
    assert (
        engine.open_store(tmp_path / "r.zarr").read_output("synthetic-sagittal", "everything", "all").shape
        == result.volume.shape
    )


def test_a_nifti_path_runs_like_its_volume(everything_head, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    volume = kit.synthetic_volume("coronal")
    nibabel.save(nibabel.Nifti1Image(volume.data, volume.affine), str(tmp_path / "c.nii.gz"))
    result = kit.run_head(everything_head, tmp_path / "c.nii.gz")
    assert result["all"].shape == volume.shape
    np.testing.assert_allclose(result.volume.affine, volume.affine, atol=1e-4)


def test_the_pytest_fixtures_run_a_head(mrfm_run_head, mrfm_volume, everything_head):
    result = mrfm_run_head(everything_head)
    assert result.volume is mrfm_volume and result["all"].shape == mrfm_volume.shape


@pytest.mark.parametrize("mrfm_volume", [{"kind": "decubitus", "shape": (32, 36, 20), "seed": 1}], indirect=True)
def test_the_volume_fixture_takes_synthetic_arguments(mrfm_volume):
    assert mrfm_volume.shape == (32, 36, 20) and mrfm_volume.meta["synthetic"] == "decubitus"


# ---- every shipped head through the kit ---------------------------------------------------------
def check_well_formed(decl: dict, value, volume) -> None:
    """A mapped output obeys its declaration on the volume's native grid."""
    kind = decl["kind"]
    if kind == "mask":
        assert value.shape[-3:] == volume.shape and value.dtype == np.dtype(decl["dtype"])
        assert value.max() < max(len(decl["labels"]), 2)
    elif kind == "boxes":
        n = len(value["scores"])
        assert value["world"].shape == (n, 6) and value["voxel"].shape == (n, 6)
        lo, hi = (
            voxel_centre_bounds(volume.shape, volume.affine)[:3],
            voxel_centre_bounds(volume.shape, volume.affine)[3:],
        )
        assert (value["world"][:, :3] >= lo - 0.5 * max(volume.spacing)).all()
        assert (value["world"][:, 3:] <= hi + 0.5 * max(volume.spacing)).all()
        assert (value["world"][:, 3:] >= value["world"][:, :3]).all()
    else:
        arr = np.asarray(value)
        assert np.isfinite(arr).all() and arr.dtype == np.dtype(decl["dtype"])
        if kind == "scores":
            assert arr.shape == (len(decl["labels"]),)
        if "range" in decl:
            assert decl["range"][0] - 1e-5 <= arr.min() and arr.max() <= decl["range"][1] + 1e-5
        if decl.get("normalized"):
            assert abs(float(np.linalg.norm(arr)) - 1.0) < 1e-3


@pytest.mark.parametrize("name", ["classify", "regress", "segment", "localize", "ground", "retrieve"])
def test_every_contrib_head_runs_through_the_kit(name):
    registered = plugins.get_head_classes()[name]
    result = kit.run_head(name, "axial", queries=["bright lesion on the left"])
    manifest = registered.obj.manifest()
    assert set(result.outputs) == {o["name"] for o in manifest["outputs"]}
    for decl in manifest["outputs"]:
        check_well_formed(decl, result[decl["name"]], result.volume)


# ---- packages written by mrfm new-head, and the example package ---------------------------------
def run_package_tests(folder: Path) -> subprocess.CompletedProcess:
    """The package's own tests, in a fresh interpreter, with the package importable as if installed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]), "MRFM_LOAD_PLUGINS": ""}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "engine.pytest_plugin", "-p", "no:cacheprovider", str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_new_head_writes_a_valid_package_whose_tests_pass(tmp_path):
    made = CliRunner().invoke(cli, ["new-head", "demo-bright", "--dir", str(tmp_path)])
    assert made.exit_code == 0, made.output
    folder = tmp_path / "demo-bright"
    assert f"next: pip install -e '{folder}[test]' && pytest {folder}" in made.output  # [test] brings pytest
    manifest = json.loads((folder / "mrfm_head_demo_bright" / "manifest.json").read_text())
    assert schemas.errors("head", manifest) == [] and manifest["name"] == "demo-bright"
    assert manifest["encoder"]["fingerprint"] == "any"
    pyproject = (folder / "pyproject.toml").read_text()
    assert '[project.entry-points.mrfm]\ndemo-bright = "mrfm_head_demo_bright"' in pyproject
    done = run_package_tests(folder)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_new_head_refuses_a_bad_name_or_a_used_folder(tmp_path):
    bad = CliRunner().invoke(cli, ["new-head", "Bad Name", "--dir", str(tmp_path)])
    assert bad.exit_code == 2 and "lower case" in bad.output and "Traceback" not in bad.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    used = CliRunner().invoke(cli, ["new-head", "taken", "--dir", str(tmp_path)])
    assert used.exit_code == 2 and "not empty" in used.output
    assert (tmp_path / "taken" / "file").read_text() == "mine"


def test_the_example_package_passes_its_kit_tests():
    done = run_package_tests(EXAMPLE)
    assert done.returncode == 0, done.stdout + done.stderr
