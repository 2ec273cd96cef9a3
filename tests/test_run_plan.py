"""One shape for a run's options: command-line flags, a job file and Python keyword arguments
give the same RunPlan, and every mistake is a usage error before anything loads."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.errors import UsageError
from engine.run_plan import RunPlan, make_plan

JOB = {
    "archives": ["a", "b.zip"],
    "out": "r.zarr",
    "heads": ["classify", "segment"],
    "backend": "torch",
    "precision": "bf16",
    "batch_size": 2,
    "workers": 0,
    "overwrite": True,
    "queries": ["lesion"],
    "params": {"ground": {"top_k": 3}},
    "record_paths": True,
    "budgets": {"segment": 2.5},
    "default_budget": 9.0,
    "exports": ["nifti", "dicom-seg"],
    "export_dir": "exports",
    "to": "dimse://PACS@localhost:104",
    "executor": "local",
    "force": True,
    "max_series_bytes": "512MiB",
    "where": {"Modality": "MR"},
    "ae_title": "ME",
    "move": True,
    "move_port": 4242,
}
FLAGS = [
    "a",
    "b.zip",
    "--out",
    "r.zarr",
    "--heads",
    "classify,segment",
    "--backend",
    "torch",
    "--precision",
    "bf16",
    "--batch-size",
    "2",
    "--workers",
    "0",
    "--overwrite",
    "--query",
    "lesion",
    "--record-paths",
    "--head-budget",
    "segment=2.5",
    "--default-head-budget",
    "9",
    "--export",
    "nifti",
    "--export",
    "dicom-seg",
    "--export-dir",
    "exports",
    "--to",
    "dimse://PACS@localhost:104",
    "--executor",
    "local",
    "--force",
    "--max-series-bytes",
    "512MiB",
    "--where",
    "Modality=MR",
    "--ae-title",
    "ME",
    "--move",
    "--move-port",
    "4242",
]


def plan_of(args: list[str], monkeypatch) -> RunPlan:
    """The plan ``mrfm run ARGS`` would execute (the run itself is not started)."""
    seen: list[RunPlan] = []

    def execute(plan, on_event=None):
        seen.append(plan)
        raise UsageError("stop here")

    monkeypatch.setattr("engine.pipeline.execute_plan", execute)
    result = CliRunner().invoke(cli, ["run", *args])
    assert seen, result.output
    return seen[0]


@pytest.fixture
def paths_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b.zip").write_bytes(b"")
    return tmp_path


def test_flags_a_job_file_and_keyword_arguments_make_the_same_plan(paths_exist, monkeypatch):
    (paths_exist / "job.json").write_text(json.dumps(JOB))
    kwargs = {
        **{k: v for k, v in JOB.items() if k not in ("to", "where")},
        "export_to": JOB["to"],
        "where": ["Modality=MR"],
    }
    from_python = make_plan(**kwargs)
    assert plan_of(FLAGS, monkeypatch) == dataclasses.replace(from_python, params={})  # per-head params: job files only
    assert plan_of(["--job", "job.json"], monkeypatch) == from_python
    assert make_plan("job.json") == from_python
    assert from_python.max_series_bytes == 512 * 2**20 and from_python.sources.where == (("Modality", "MR"),)
    assert from_python.sources.ae_title == "ME" and from_python.sources.move and from_python.sources.move_port == 4242
    assert pickle.loads(pickle.dumps(from_python)) == from_python  # it travels to workers
    with pytest.raises(AttributeError):
        from_python.out = "elsewhere"  # type: ignore[misc]


def test_a_flag_overrides_the_job_file_and_a_flag_left_out_does_not(paths_exist, monkeypatch):
    (paths_exist / "job.json").write_text(json.dumps(JOB))
    plan = plan_of(
        ["--job", "job.json", "--backend", "onnxruntime", "--heads", "retrieve", "--out", "other.zarr"], monkeypatch
    )
    assert (plan.backend, plan.heads, plan.out) == ("onnxruntime", ("retrieve",), "other.zarr")
    # defaults of flags not given (--ae-title MRFM, --precision fp32, --batch-size 4) leave the job's values
    assert (plan.sources.ae_title, plan.precision, plan.batch_size, plan.archives) == ("ME", "bf16", 2, ("a", "b.zip"))
    plain = plan_of(["a", "--out", "r.zarr"], monkeypatch)
    assert (plain.backend, plain.heads, plain.sources.ae_title, plain.precision, plain.batch_size) == (
        "auto",
        None,
        "MRFM",
        "fp32",
        4,
    )


def test_the_job_file_knows_every_run_option():
    schema = json.loads((__import__("pathlib").Path(__file__).parents[1] / "schemas" / "job.schema.json").read_text())
    names = {
        "archive": "archives",
        "queries": "queries",
        "head_budgets": "budgets",
        "default_head_budget": "default_budget",
        "export_to": "to",
    }
    command_line_only = {"job", "log_json", "report_dir"}  # the job itself, and how progress is shown
    run = cli.get_command(None, "run")
    options = {names.get(p.name, p.name) for p in run.params if p.name not in command_line_only}
    assert options <= set(schema["properties"]), options - set(schema["properties"])


@pytest.mark.parametrize(
    "job, needle",
    [
        ({"archives": ["a"], "out": "r.zarr", "heads": []}, "names no head"),
        ({"archives": [], "out": "r.zarr"}, "give at least one ARCHIVE"),
        ({"archives": ["a"], "out": "r.zarr", "to": "dimse://P@h:1"}, "--to dimse://P@h:1: name what to send"),
        ({"archives": ["a"], "out": "s3://bucket/r.zarr", "exports": ["nifti"]}, "give --export-dir"),
        ({"archives": ["a"], "out": "r.zarr", "where": {"NoSuchKeyword": "x"}}, "not a DICOM attribute keyword"),
        ({"archives": ["a"], "out": "r.zarr", "max_series_bytes": "lots"}, "lots"),
    ],
)
def test_a_bad_job_is_a_usage_error_naming_the_option(paths_exist, job, needle):
    with pytest.raises(UsageError) as err:
        make_plan(job)
    assert needle in str(err.value)
    (paths_exist / "job.json").write_text(json.dumps(job))
    result = CliRunner().invoke(cli, ["run", "--job", "job.json"])
    assert result.exit_code == 2 and "Traceback" not in result.output and needle in " ".join(result.output.split()), (
        result.output
    )


def test_keyword_arguments_are_checked_like_flags():
    for bad, needle in (
        ({"batch_size": 0}, "--batch-size"),
        ({"workers": -1}, "--workers"),
        ({"precision": "fp8"}, "--precision"),
        ({"executor": "slurm"}, "--executor slurm"),
        ({"heads": []}, "names no head"),
    ):
        with pytest.raises(UsageError, match=needle):
            make_plan(archives=["a"], out="r.zarr", **bad)
    with pytest.raises(TypeError, match="colour"):
        make_plan(archives=["a"], out="r.zarr", colour="blue")
