"""The brightness head through mrfm's real path (engine.testing): views -> predict -> checks."""

import pytest

import engine.testing as kit
import mrfm_head_brightness
from mrfm_head_brightness import BrightnessHead


def test_the_package_registers_the_head():
    assert kit.heads_of(mrfm_head_brightness) == [BrightnessHead]


@pytest.mark.parametrize("mrfm_volume", ["axial", "sagittal", "decubitus", "las"], indirect=True)
def test_bright_fraction_is_the_share_of_tissue_in_the_field_of_view(mrfm_run_head, mrfm_volume):
    result = mrfm_run_head(BrightnessHead)
    # tissue (body and bright sphere) lies above the series' mean, air below it
    tissue = kit.synthetic_truth(mrfm_volume.shape, mrfm_volume.affine)["body"].mean()
    assert float(result["bright_fraction"]) == pytest.approx(tissue, abs=0.03)
    assert float(result["cls_norm"]) > 0


def test_a_nifti_file_runs_like_a_volume(mrfm_run_head, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    volume = kit.synthetic_volume("oblique")
    path = tmp_path / "oblique.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume.data, volume.affine), str(path))
    from_file = mrfm_run_head(BrightnessHead, path)
    assert float(from_file["bright_fraction"]) == pytest.approx(
        float(mrfm_run_head(BrightnessHead, volume)["bright_fraction"]), abs=0.01
    )
