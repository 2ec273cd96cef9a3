"""The command line as a user drives it: demo archive, scan, run, inspect, validate, search."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli

pytestmark = pytest.mark.slow


def test_scan_lists_series_with_orientation_and_problems(cli_workspace):
    result = CliRunner().invoke(
        cli, ["scan", str(cli_workspace / "archive" / "dicom"), str(cli_workspace / "bad"), "--json"]
    )
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    from engine.discover import sanitise_key
    from engine.synthetic import ArchiveManifest

    truth = {sanitise_key(t.series_uid): t.orientation for t in ArchiveManifest.load(cli_workspace / "archive").series}
    scanned = {s["key"]: s["orientation"] for s in found["series"] if s["key"] in truth}
    assert scanned == truth
    by_desc = {s["description"]: s for s in found["series"]}
    assert any("missing slice" in p for p in by_desc["BAD MISSING_SLICE"]["problems"])
    assert any("not a DICOM" in w for w in found["warnings"])
    table = CliRunner().invoke(cli, ["scan", str(cli_workspace / "bad")])
    assert table.exit_code == 0 and "axial" in table.stdout and "missing" in table.stdout


def test_run_logs_json_lines_and_exits_1_when_a_series_failed(cli_store, cli_workspace, tmp_path):
    out, result = cli_store
    assert result.exit_code == 1, result.output
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "done" and events[-1]["failed"] == 3 and events[-1]["skipped"] == 1
    assert any(e["event"] == "series" and e["status"] == "failed" and "missing" in e["reason"] for e in events)
    assert "failed" in result.stdout and "complete" in result.stdout  # the summary table
    copy = tmp_path / "r.zarr"  # the shared store stays as the first run left it
    shutil.copytree(out, copy)
    again = CliRunner().invoke(
        cli,
        [
            "run",
            str(cli_workspace / "archive" / "dicom"),
            "--out",
            str(copy),
            "--heads",
            "classify,retrieve",
            "--backend",
            "torch",
            "--workers",
            "0",
            "--log-json",
        ],
    )
    assert again.exit_code == 0 and "resumed" in again.stdout


def test_inspect_validate_and_search_read_the_store(cli_store):
    out, _ = cli_store
    inspected = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert inspected.exit_code == 0
    info = json.loads(inspected.stdout)
    assert info["series"]["failed"] == 3 and info["index"]["count"] == info["series"]["complete"] > 0
    assert CliRunner().invoke(cli, ["validate", str(out)]).exit_code == 0
    found = CliRunner().invoke(cli, ["search", str(out), "knee MRI", "-k", "3"])
    assert found.exit_code == 0 and "top 3" in found.stdout
    assert CliRunner().invoke(cli, ["search", str(out)]).exit_code == 2  # no query: usage error


def test_a_job_file_drives_a_run_and_bad_jobs_are_refused(cli_workspace, tmp_path):
    job = {
        "archives": [str(cli_workspace / "archive" / "dicom")],
        "out": str(tmp_path / "j.zarr"),
        "heads": ["classify"],
        "backend": "torch",
        "workers": 0,
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert CliRunner().invoke(cli, ["run", "--job", str(tmp_path / "job.json")]).exit_code == 0
    (tmp_path / "bad.json").write_text(json.dumps({"archives": "not-a-list"}))
    bad = CliRunner().invoke(cli, ["run", "--job", str(tmp_path / "bad.json")])
    assert (
        bad.exit_code == 2 and "job.schema.json" in bad.output and "'not-a-list' is not of type 'array'" in bad.output
    )


def test_usage_errors_exit_2():
    assert CliRunner().invoke(cli, ["run"]).exit_code == 2
    assert CliRunner().invoke(cli, ["run", ".", "--out", "x.zarr", "--precision", "fp8"]).exit_code == 2


def test_heads_and_plugins_list_what_is_installed():
    heads = CliRunner().invoke(cli, ["heads"])
    assert heads.exit_code == 0
    for name in ("classify", "regress", "segment", "localize", "ground", "retrieve"):
        assert name in heads.stdout
    plugins = CliRunner().invoke(cli, ["plugins", "--json"])
    rows = {p["name"]: p for p in json.loads(plugins.stdout)}
    assert "register_readers" in rows["plugins.readers"]["hooks"] and rows["plugins.readers"]["default"]


def test_the_example_reader_consumes_the_store_with_plain_zarr(cli_store):
    out, _ = cli_store
    script = Path(__file__).resolve().parents[1] / "examples" / "read_store.py"
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, check=True)
    assert "classify/region=" in done.stdout and "failed (" in done.stdout
