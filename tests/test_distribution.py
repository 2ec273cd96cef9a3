"""The out-of-distribution flag: statistics of a model's training features, a threshold chosen on
held-out studies, and every series' ``distribution`` record in the store, the run summary, the
JSON log and ``mrfm inspect``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.distribution import DistributionModel, load_distribution
from engine.fitting.calibration import fit_statistics, ledoit_wolf
from engine.model import DEFAULT_MODEL_DIR, compute_fingerprint, load_model, read_card


def test_ledoit_wolf_matches_scikit_learn():
    sklearn_cov = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(0)
    for n, p in ((40, 10), (30, 64), (200, 16)):  # fewer rows than columns included
        x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p))
        cov, shrink = ledoit_wolf(x)
        ref_cov, ref_shrink = sklearn_cov.ledoit_wolf(x)
        assert shrink == pytest.approx(ref_shrink, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-12)


def test_threshold_keeps_the_asked_share_of_held_out_series_and_flags_far_ones():
    rng = np.random.default_rng(1)
    train, held = rng.normal(size=(300, 8)), rng.normal(size=(101, 8))
    stats, info = fit_statistics(train, held, keep=0.95)
    kept = np.mean([stats.score(v) <= stats.threshold for v in held])
    assert 0.95 <= kept < 0.97 and info["heldout_kept"] == pytest.approx(kept)
    # Mahalanobis distance against an independent computation
    v = rng.normal(size=8)
    d = v - stats.mean
    assert stats.score(v) == pytest.approx(float(np.sqrt(d @ stats.precision @ d)))
    far = stats.judge(np.full(8, 10.0))
    assert far["out_of_distribution"] is True and far["score"] > far["threshold"]
    assert stats.judge(np.full(8, np.nan))["out_of_distribution"] is True
    assert stats.judge(None) == {"score": None, "threshold": None, "out_of_distribution": None}


def test_a_card_naming_missing_statistics_is_an_error(tmp_path):
    card = {"encoder": {"embed_dim": 4}, "distribution": {"statistics": "distribution.safetensors", "threshold": 3.0}}
    with pytest.raises(FileNotFoundError, match="distribution statistics"):
        load_distribution(card, tmp_path)
    from safetensors.numpy import save_file

    save_file(
        {"mean": np.zeros(3, np.float32), "precision": np.eye(3, dtype=np.float32)},
        str(tmp_path / "distribution.safetensors"),
    )
    with pytest.raises(ValueError, match=r"'mean' \(8,\)"):
        load_distribution(card, tmp_path)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A copy of the embedded model calibrated on a small demo archive, an archive of another seed
    and the series no MR model should accept."""
    from engine.synthetic.foreign_inputs import write_foreign_archive

    root = tmp_path_factory.mktemp("ood")
    model = root / "model"
    shutil.copytree(
        DEFAULT_MODEL_DIR, model, ignore=shutil.ignore_patterns("__pycache__", "*.py", "distribution.safetensors")
    )
    card = json.loads((model / "model.json").read_text())
    card.pop("distribution", None)
    (model / "model.json").write_text(json.dumps(card))
    runner = CliRunner()
    for name, seed, studies in (("cal", 41, 8), ("other", 43, 2)):
        made = runner.invoke(cli, ["demo-archive", str(root / name), "--studies", str(studies), "--seed", str(seed)])
        assert made.exit_code == 0, made.output
    shutil.copytree(model, root / "bare")
    truth = write_foreign_archive(root / "foreign", per_case=2, seed=3)
    result = runner.invoke(
        cli,
        [
            "model",
            "calibrate",
            str(model),
            str(root / "cal" / "dicom"),
            "--json",
            "--cache-dir",
            str(root / "features"),
        ],
    )
    assert result.exit_code == 0, result.output
    return root, model, truth


def test_calibrate_writes_statistics_without_changing_the_fingerprint(calibrated):
    root, model, _ = calibrated
    bare = root / "bare"
    before = compute_fingerprint(read_card(bare), bare)
    card = read_card(model)  # validates against the model card schema
    section = card["distribution"]
    assert (
        section["fit"]["heldout_kept"] >= 0.98
        and section["fit"]["train_series"] + section["fit"]["heldout_series"] == section["fit"]["series"]
    )
    assert compute_fingerprint(card, model) == before == load_model(model).fingerprint
    stats = load_distribution(card, model)
    assert stats.threshold == pytest.approx(section["threshold"], rel=1e-6)
    assert 0 < section["shrinkage"] < 1


def test_every_series_records_its_distribution_and_flags_reach_summary_log_and_inspect(calibrated, tmp_path):
    root, model, truth = calibrated
    out = tmp_path / "r.zarr"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(root / "other" / "dicom"),
            str(root / "foreign"),
            "--out",
            str(out),
            "--model",
            str(model),
            "--heads",
            "classify,segment",
            "--backend",
            "torch",
            "--workers",
            "0",
            "--log-json",
        ],
    )
    assert result.exit_code == 0, result.output
    from engine.store import open_store

    store = open_store(out)
    flagged = {}
    for key, attrs in store.iter_series():
        dist = attrs["distribution"]
        assert set(dist) == {"score", "threshold", "out_of_distribution"}
        assert dist["out_of_distribution"] == (dist["score"] is None or dist["score"] > dist["threshold"])
        flagged[attrs["series_uid"]] = dist["out_of_distribution"]
        # heads still answer on a flagged series, and what they wrote carries the flag
        assert attrs["status"] == "complete" and set(attrs["heads"]) == {"classify", "segment"}
        for head in attrs["heads"].values():
            assert head["out_of_distribution"] == dist["out_of_distribution"]
        import zarr

        arr = zarr.open_array(store=store.root.store, path=f"series/{key}/segment/anatomy", mode="r")
        assert arr.attrs["out_of_distribution"] == dist["out_of_distribution"]
    # statistics from 8 studies are rough; the shipped default's figure is measured on far more
    foreign = [flagged[uid] for uid in truth]
    assert np.mean(foreign) >= 0.75, f"foreign series not flagged: {[c for u, c in truth.items() if not flagged[u]]}"
    n_flagged = sum(flagged.values())
    assert f"out of distribution {n_flagged}" in result.output
    events = (
        [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")] if result.stderr_bytes else []
    )
    if events:
        done = [e for e in events if e["event"] == "done"][0]
        assert done["out_of_distribution"] == n_flagged
    run = next(iter(store.runs().values()))
    assert run["counts"]["out_of_distribution"] == n_flagged
    inspected = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert list(json.loads(inspected.output)["out_of_distribution"].values()) == [n_flagged]
    shown = CliRunner().invoke(cli, ["inspect", str(out)])
    assert f"out of distribution {n_flagged}" in shown.output


def test_a_model_without_statistics_records_null_and_says_so_once(calibrated, tmp_path):
    root, _, _ = calibrated
    bare = root / "bare"
    out = tmp_path / "r.zarr"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(root / "other" / "dicom"),
            "--out",
            str(out),
            "--model",
            str(bare),
            "--heads",
            "classify",
            "--backend",
            "torch",
            "--workers",
            "0",
            "--log-json",
        ],
    )
    assert result.exit_code == 0, result.output
    from engine.store import open_store

    store = open_store(out)
    records = [a["distribution"] for _, a in store.iter_series()]
    assert records and all(r == {"score": None, "threshold": None, "out_of_distribution": None} for r in records)
    warnings = next(iter(store.runs().values()))["warnings"]
    assert sum("no distribution statistics" in w for w in warnings) == 1


def test_the_shipped_default_carries_statistics():
    card = read_card(DEFAULT_MODEL_DIR)
    stats = load_distribution(card, DEFAULT_MODEL_DIR)
    assert isinstance(stats, DistributionModel) and card["distribution"]["fit"]["heldout_kept"] >= 0.95


def test_mrfm_run_imports_no_generator_recipe_or_fitting_code():
    code = (
        "import sys, engine.pipeline, engine.inference, engine.cli, engine.distribution; "
        "print([m for m in sys.modules if m.startswith(('engine.fitting', 'engine.synthetic', 'engine.default_model.'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
