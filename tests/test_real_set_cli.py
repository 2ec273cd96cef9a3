"""``mrfm evaluate`` on a real set (a folder holding real_set.json) scores it, not the synthetic way."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from engine.cli import cli
from engine.fitting.real_set import SET_FILE
from engine.vocabulary import REGIONS


def test_evaluate_scores_a_real_set_with_figures_beside_targets(tmp_path):
    root = tmp_path / "real"
    (root / "nifti").mkdir(parents=True)
    idx = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in (40, 48, 36)], indexing="ij"), -1) * 4.0
    head = (((idx / [70.0, 85.0, 70.0]) ** 2).sum(-1) < 1).astype(np.float32)
    nib.save(nib.Nifti1Image(head * 500 + 5, np.diag([4.0, 4.0, 4.0, 1.0])), str(root / "nifti" / "head.nii.gz"))
    (root / SET_FILE).write_text(
        json.dumps(
            {
                "series": [
                    {
                        "path": "nifti/head.nii.gz",
                        "source": "an ellipsoid head",
                        "region": "brain",
                        "contrast": "T1",
                        "healthy": True,
                    }
                ],
                "missing": [],
            }
        )
    )
    out = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(root),
            "--store",
            str(tmp_path / "r.zarr"),
            "--json",
            str(tmp_path / "r.json"),
            "--markdown",
            str(tmp_path / "r.md"),
        ],
    )
    assert out.exit_code == 0, out.output
    result = json.loads((tmp_path / "r.json").read_text())
    row = result["series"][0]
    assert row["status"] == "complete" and row["region"] in REGIONS and 0 <= row["head_dice"] <= 1
    assert result["figures"]["region_accuracy"] == float(row["region"] == "brain")
    assert "median Dice" in (tmp_path / "r.md").read_text() and "real set figures" in out.output
