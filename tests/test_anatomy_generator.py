"""The anatomy-based generator: label maps from template files, appearance randomised per image.

The assets here are small stand-ins written by the test (a brain of GM shell, WM core and
ventricles in a head; AAL quadrants), laid out as ``engine.default_model.assets`` expects, so the
tests need no download; the real templates go through the same code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.default_model import assets as assets_mod
from engine.errors import UsageError
from engine.synthetic import label_anatomy
from engine.synthetic.anatomy_archive import study_regions, write_anatomy_archive
from engine.synthetic.manifest import ArchiveManifest
from engine.synthetic.randomised import draw_acquisition, draw_study, render_series
from engine.vocabulary import LABEL_NAMES, REGIONS, TISSUE_CLASSES, TISSUE_TO_LABEL

AAL_ROWS = ["1 Frontal_Sup_L 2101", "2 Frontal_Sup_R 2102", "3 Occipital_Sup_L 5101", "4 Occipital_Sup_R 5102"]


def _save(path: Path, data: np.ndarray, spacing: float = 2.5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(data.shape) - 1) / 2
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture(scope="module")
def fake_assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    shape = (56, 64, 56)
    idx = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"), -1) * 2.5
    r = np.sqrt(((idx / np.array([70.0, 85.0, 75.0])) ** 2).sum(-1))  # 1 at the head's surface
    ventricles = np.sqrt(((idx - [0, 0, 8]) ** 2 / np.array([10.0, 25.0, 8.0]) ** 2).sum(-1)) < 1
    brain = (r < 0.78) & ~ventricles
    wm = ((r < 0.6) & ~ventricles).astype(np.float32) * 255
    gm = (brain & (r >= 0.6)).astype(np.float32) * 255
    t1 = np.where(brain, np.where(wm > 0, 110.0, 80.0), 0).astype(np.float32)
    for key, data in (("mni_t1", t1), ("mni_gm", gm), ("mni_wm", wm)):
        _save(root / assets_mod.FILES[key], data)
    head = np.where(r < 1, 90.0, 0.0) + np.where((r > 0.8) & (r < 0.9), -80.0, 0.0)  # scalp with a dark skull
    colin = np.where(r < 0.78, np.where(r < 0.6, 120.0, 75.0), head) * ~ventricles + ventricles * 20.0
    _save(root / assets_mod.FILES["colin"], colin.astype(np.float32))
    _save(root / assets_mod.FILES["colin_brain"], np.where(r < 0.78, colin, 0).astype(np.float32))
    aal = (1 + (idx[..., 0] > 0) + 2 * (idx[..., 1] < 0)).astype(np.int16) * (r < 0.78)
    _save(root / assets_mod.FILES["aal"], aal.astype(np.int16))
    (root / assets_mod.FILES["aal_names"]).write_text("\n".join(AAL_ROWS) + "\n")
    for key in ("harvard_oxford", "jhu"):
        _save(root / assets_mod.FILES[key], aal.astype(np.int16))
    label_anatomy.mni152.cache_clear()
    label_anatomy.colin27.cache_clear()
    return root


def test_missing_assets_are_a_usage_error_naming_the_fetch_command(tmp_path):
    with pytest.raises(UsageError, match="python -m engine.default_model.assets fetch"):
        write_anatomy_archive(tmp_path / "a", 2, assets=tmp_path / "empty")
    assert not (tmp_path / "a").exists()  # nothing written before the check


def test_templates_give_every_tissue_class_and_lobe_names(fake_assets):
    for anatomy in label_anatomy.brain_templates(fake_assets):
        present = {anatomy.classes[v] for v in np.unique(anatomy.data)}
        assert {"background", "scalp", "csf", "grey matter", "white matter"} <= present, anatomy.name
        left_front = anatomy.center_mm + [-25, 30, 0]  # RAS: -x is the patient's left
        assert anatomy.location(left_front) == "left frontal lobe"
        assert anatomy.location(anatomy.center_mm + [25, -40, 0]) == "right occipital lobe"


def _by_tissue(image, tissues, name):
    value = next(k for k, v in TISSUE_CLASSES.items() if v == name)
    return float(np.median(image[tissues == value]))


def test_contrast_follows_physics_and_labels_fold_from_tissues(fake_assets):
    anatomy = label_anatomy.mni152(str(fake_assets))
    rng = np.random.default_rng(5)
    draw = draw_study(anatomy, rng, n_lesions=1)
    assert draw.lesions and draw.lesions[0].location.endswith(("frontal lobe", "occipital lobe"))
    seen = {}
    for kind in ("T1", "T2", "FLAIR", "EPI"):
        acq = draw_acquisition(draw, kind, rng)
        image, labels, tissues = render_series(draw, acq, rng)
        assert image.shape == labels.shape == tissues.shape == acq.shape
        assert set(np.unique(labels)) <= set(LABEL_NAMES) and set(np.unique(tissues)) <= set(TISSUE_CLASSES)
        assert np.array_equal(labels, np.vectorize(TISSUE_TO_LABEL.get)(tissues).astype(np.uint8))
        seen[kind] = (image, tissues, acq)
    t1, t1_tissue, _ = seen["T1"]
    t2, t2_tissue, _ = seen["T2"]
    assert _by_tissue(t1, t1_tissue, "CSF") < _by_tissue(t1, t1_tissue, "white matter")
    assert _by_tissue(t2, t2_tissue, "CSF") > _by_tissue(t2, t2_tissue, "white matter")
    assert min(seen["EPI"][2].spacing[:2]) >= 2.5 > max(seen["T1"][2].spacing[:2])  # EPI is low resolution


def test_same_seed_same_image(fake_assets):
    anatomy = label_anatomy.colin27(str(fake_assets))
    out = []
    for _ in range(2):
        rng = np.random.default_rng(11)
        draw = draw_study(anatomy, rng)
        out.append(render_series(draw, draw_acquisition(draw, "PD", rng), rng))
    assert all(np.array_equal(a, b) for a, b in zip(*out))


def test_archive_has_the_demo_layout_and_consistent_truth(fake_assets, tmp_path):
    from engine.discover import load, scan

    assert set(study_regions(4)) == set(REGIONS) and study_regions(8, 0.5).count("brain") == 4
    manifest = write_anatomy_archive(tmp_path / "arch", 2, seed=3, assets=fake_assets, brain_share=0.5)
    again = ArchiveManifest.load(tmp_path / "arch" / "ground_truth" / "manifest.json")
    assert [s.region for s in again.studies] == ["brain", "knee"] == study_regions(2, 0.5)
    refs = {r.series_uid: r for r in scan([manifest.dicom_root]).series}
    assert set(refs) == {s.series_uid for s in manifest.series}
    for truth in manifest.series:
        labels = nib.load(str(manifest.root / truth.label_map))
        tissues = nib.load(str(manifest.root / truth.label_map.replace("_labels", "_tissues")))
        volume = load(refs[truth.series_uid])
        assert volume.shape[:3] == labels.shape == tissues.shape
        assert np.allclose(volume.affine, labels.affine, atol=1e-3)  # the truth sits on the image's own grid
        lab = np.asarray(labels.dataobj)
        assert np.array_equal(lab, np.vectorize(TISSUE_TO_LABEL.get)(np.asarray(tissues.dataobj)).astype(np.uint8))
        study = next(s for s in manifest.studies if s.study_uid == truth.study_uid)
        if not study.lesions:
            assert not (lab == 4).any()
        data = np.asarray(volume.data)
        assert data[lab == 0].mean() < data[lab > 0].mean()  # anatomy is where the labels say


def test_mrfm_run_imports_neither_generator_nor_recipe(tmp_path):
    _save(tmp_path / "in" / "vol.nii.gz", np.random.default_rng(0).random((24, 24, 16)).astype(np.float32) * 100, 2.0)
    code = (
        "import sys\n"
        "from engine.cli import cli\n"
        f"try:\n    cli.main(['run', {str(tmp_path / 'in')!r}, '--out', {str(tmp_path / 'r.zarr')!r}, '--heads', 'classify'])\n"
        "except SystemExit as e:\n    print('exit', e.code)\n"
        "print([m for m in sys.modules if m.startswith(('engine.synthetic', 'engine.fitting', 'engine.default_model.'))])\n"
    )
    out = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        .stdout.strip()
        .splitlines()
    )
    assert out[-2] == "exit 0" and out[-1] == "[]"
