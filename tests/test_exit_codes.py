"""What the user sees when something is wrong: a one-line error, no traceback, the documented
exit code (0 done, 1 some series failed, 2 usage, 3 store locked or unusable, 130 interrupted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.store import ResultStore, open_store
from engine.synthetic import derive_uid, make_grid, write_dicom_series

RUN = ["--heads", "classify", "--backend", "torch", "--workers", "0"]


def write_series(folder: Path, name: str, description: str | None = None) -> Path:
    _, affine = make_grid("axial", (0.0, 0.0, 0.0), shape=(24, 24, 6), spacing=(4.0, 4.0, 4.0))
    data = 300.0 + 400.0 * np.random.default_rng(len(name)).random((24, 24, 6))
    write_dicom_series(
        folder / name,
        data,
        affine,
        study_uid=derive_uid(1, "exit", "study"),
        series_uid=derive_uid(1, "exit", name),
        description=description or name.upper(),
    )
    return folder


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_series(tmp_path_factory.mktemp("exit") / "archive", "good")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_clean_error(result, code: int, *needles: str) -> None:
    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text and not (result.exception and not isinstance(result.exception, SystemExit)), text
    for needle in needles:
        assert needle in text, text


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--heads", "no-such-head"], "unknown head"),
        (["--backend", "no-such-backend"], "unknown backend"),
        (["--backend", "tensorrt"], "tensorrt"),
    ],
)
def test_bad_options_exit_2_with_the_reason(extra, needle, archive, tmp_path):
    args = ["run", str(archive), "--out", str(tmp_path / "r.zarr"), "--workers", "0", *extra]
    if "--backend" not in extra:
        args += ["--backend", "torch"]
    assert_clean_error(invoke(*args), 2, needle)
    assert not (tmp_path / "r.zarr" / "series").exists()  # nothing written for a usage error


def test_a_model_folder_without_a_model_exits_2(archive, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert_clean_error(
        invoke("run", str(archive), "--out", str(tmp_path / "r.zarr"), "--model", str(empty), *RUN), 2, "model.json"
    )


def test_an_out_path_that_cannot_hold_a_store_exits_2(archive, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(invoke("run", str(archive), "--out", str(blocker), *RUN), 2, "not a folder")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        assert_clean_error(invoke("run", str(archive), "--out", str(locked / "r.zarr"), *RUN), 2, "cannot create")


def test_an_archive_with_no_series_exits_2_and_says_what_was_skipped(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.dcm").write_text("not an image")
    assert_clean_error(
        invoke("run", str(empty), "--out", str(tmp_path / "r.zarr"), *RUN), 2, "no DICOM or NIfTI series"
    )


def test_a_locked_store_exits_3_naming_the_holder(archive, tmp_path):
    out = tmp_path / "r.zarr"
    store = ResultStore(out, mode="a")
    with store.lock("holder-run"):
        result = invoke("run", str(archive), "--out", str(out), *RUN)
    assert_clean_error(result, 3, str(os.getpid()), "holder-run")
    ok = invoke("run", str(archive), "--out", str(out), *RUN)  # the lock is gone with its holder
    assert ok.exit_code == 0, ok.output


def test_a_store_with_a_damaged_root_exits_3(archive, tmp_path):
    out = tmp_path / "r.zarr"
    assert invoke("run", str(archive), "--out", str(out), *RUN).exit_code == 0
    meta = out / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    for args in (["run", str(archive), "--out", str(out), *RUN], ["inspect", str(out)]):
        assert_clean_error(invoke(*args), 3, "zarr.json")


def test_one_failed_series_exits_1_and_the_good_one_is_complete(archive, tmp_path):
    mixed = tmp_path / "mixed"
    write_series(mixed, "good")
    bad = write_series(tmp_path / "tmp", "broken") / "broken"
    files = sorted(bad.iterdir())
    files[-1].write_bytes(files[-1].read_bytes()[:-300])  # truncated pixel data
    for f in files:
        (mixed / "broken").mkdir(exist_ok=True)
        (mixed / "broken" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "r.zarr"
    result = invoke("run", str(mixed), "--out", str(out), *RUN)
    assert result.exit_code == 1, result.output
    statuses = {a["description"]: (a["status"], a.get("reason")) for _, a in open_store(out).iter_series()}
    assert statuses["GOOD"][0] == "complete"
    assert statuses["BROKEN"][0] == "failed" and statuses["BROKEN"][1]


def test_rich_markup_in_data_is_printed_literally(tmp_path, monkeypatch):
    import engine.cli

    monkeypatch.setattr(engine.cli.console, "width", 240)  # one table row per series
    archive = write_series(tmp_path / "archive", "markup", description="T1 [/] [bold red]x[/bold red] [link=http://x]y")
    out = tmp_path / "r.zarr"
    result = invoke("run", str(archive), "--out", str(out), *RUN)
    assert result.exit_code == 0, result.output
    shown = invoke("inspect", str(out))
    assert shown.exit_code == 0, shown.output
    assert "T1 [/] [bold red]x[/bold red] [link=http://x]y" in shown.output
    scanned = invoke("scan", str(archive))
    assert scanned.exit_code == 0 and "[/]" in scanned.output


def test_a_rerun_that_leaves_a_failed_head_failed_says_so(archive, tmp_path, monkeypatch):
    import contrib_heads.regress as regress

    out = tmp_path / "r.zarr"
    args = ["run", str(archive), "--out", str(out), "--backend", "torch", "--workers", "0"]

    def broken(self, batch):
        raise RuntimeError("regress is broken today")

    with monkeypatch.context() as m:
        m.setattr(regress.RegressHead, "predict", broken)
        first = invoke(*args, "--heads", "classify,regress")
    assert first.exit_code == 1 and "regress is broken today" in first.output
    # only the head that passed: nothing to redo, but the series is still failed, and exit 1 says so
    again = invoke(*args, "--heads", "classify")
    assert again.exit_code == 1, again.output
    events = [json.loads(line) for line in again.output.splitlines() if line.startswith('{"time"')]
    [series] = [e for e in events if e["event"] == "series"]
    assert series["status"] == "failed" and series["reason"].startswith(
        "still failed (head(s) regress not selected in this run)"
    )
    [(_, attrs)] = list(open_store(out).iter_series())
    assert attrs["status"] == "failed"
    # the failed head, now working, is redone alone and the series becomes complete
    fixed = invoke(*args, "--heads", "classify,regress")
    assert fixed.exit_code == 0, fixed.output
    [(_, attrs)] = list(open_store(out).iter_series())
    assert attrs["status"] == "complete" and attrs["heads"]["regress"]["error"] is None


def test_loaders_scale_with_the_measured_load_to_inference_ratio():
    from engine.pipeline import workers_for

    assert workers_for(1.0, 0.01, cores=16) == 15  # a fast GPU encoder: every spare core loads
    assert workers_for(1.0, 0.25, cores=16) == 4
    assert workers_for(0.1, 1.0, cores=16) == 1  # a slow CPU encoder: one loader keeps up
    assert workers_for(5.0, 0.01, cores=2) == 0  # two cores: the encoder needs both


def test_a_head_over_its_budget_fails_alone_and_the_run_goes_on(archive, tmp_path, monkeypatch):
    import time as _time

    import contrib_heads.regress as regress

    def slow(self, batch):
        _time.sleep(3)
        return []

    monkeypatch.setattr(regress.RegressHead, "predict", slow)
    out = tmp_path / "r.zarr"
    t = _time.monotonic()
    result = invoke(
        "run",
        str(archive),
        "--out",
        str(out),
        "--backend",
        "torch",
        "--workers",
        "0",
        "--heads",
        "classify,regress",
        "--head-budget",
        "regress=0.5",
    )
    assert _time.monotonic() - t < 30
    assert result.exit_code == 1, result.output
    [(_, attrs)] = list(open_store(out).iter_series())
    assert "exceeded its time budget of 0.5 s" in attrs["heads"]["regress"]["error"]
    assert attrs["heads"]["classify"]["error"] is None and attrs["heads"]["classify"]["outputs"]
    bad = invoke("run", str(archive), "--out", str(out), "--heads", "regress", "--head-budget", "regress")
    assert_clean_error(bad, 2, "HEAD=SECONDS")


def test_run_exports_each_series_as_it_completes(archive, tmp_path):
    import nibabel as nib

    out = tmp_path / "r.zarr"
    result = invoke(
        "run",
        str(archive),
        "--out",
        str(out),
        "--backend",
        "torch",
        "--workers",
        "0",
        "--heads",
        "classify,segment",
        "--export",
        "nifti",
        "--export",
        "table",
    )
    assert result.exit_code == 0, result.output
    [(key, attrs)] = list(open_store(out).iter_series())
    [nii] = list((tmp_path / "r.zarr-nifti").rglob("*.nii.gz"))
    img = nib.load(str(nii))
    assert np.array_equal(np.asarray(img.dataobj), open_store(out).read_output(key, "segment", "anatomy"))
    np.testing.assert_allclose(img.affine, np.asarray(attrs["geometry"]["affine"]), atol=1e-4)
    assert list((tmp_path / "r.zarr-table").glob("scores.parquet"))
    bad = invoke("run", str(archive), "--out", str(out), "--export", "no-such-format", *RUN)
    assert_clean_error(bad, 2, "unknown export format")
