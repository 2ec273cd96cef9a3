"""The Ray executor on a local Ray instance with two CPUs: the same store as the local executor,
provenance naming the workers, atomically published series groups, a killed worker that loses
no series, and the same exit codes."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zarr
from engine.zarr_text import read_text

ray = pytest.importorskip("ray")

from click.testing import CliRunner  # noqa: E402

from engine.cli import cli  # noqa: E402
from engine.pipeline import run  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.synthetic import write_demo_archive  # noqa: E402
from engine.synthetic.bad_inputs import BASIC_CASES, write_bad_inputs  # noqa: E402
from engine.validate import validate_store  # noqa: E402

pytestmark = pytest.mark.slow
HEADS = ["classify", "segment", "retrieve"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray instance for the module: starting one costs seconds."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_demo_archive(tmp_path_factory.mktemp("ray") / "demo", studies=1, seed=21).dicom_root


@pytest.fixture(scope="module")
def local_store(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "local.zarr"
    summary = run([archive], out, heads=HEADS, backend="torch", workers=0)
    assert summary.exit_code == 0
    return out


def arrays(path) -> dict[str, np.ndarray]:
    """Every array under series/, by path."""
    out: dict[str, np.ndarray] = {}

    def walk(group: zarr.Group, prefix: str) -> None:
        for name, arr in group.arrays():
            out[f"{prefix}/{name}"] = np.asarray(arr[...])
        for name, sub in group.groups():
            walk(sub, f"{prefix}/{name}")

    walk(zarr.open_group(str(path), mode="r")["series"], "series")
    return out


def assert_same_arrays(ours, reference) -> None:
    a, b = arrays(ours), arrays(reference)
    assert sorted(a) == sorted(b)
    for name, ref in b.items():
        got = a[name]
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        if ref.dtype.kind == "f":
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=name)
        else:  # masks, labels, queries: bitwise
            assert np.array_equal(got, ref), name


def test_ray_writes_the_local_executors_store_and_names_its_workers(archive, local_store, tmp_path, monkeypatch):
    out = tmp_path / "ray.zarr"
    # each output write pauses, so a reader polling the store sees the groups while they are written
    monkeypatch.setenv("MRFM_PAUSE_AT", "mid-series-write:0.3")
    seen: dict[str, set[str]] = {}
    broken: list[str] = []
    finished = threading.Event()

    def poll() -> None:
        while not finished.is_set():
            if (out / "series").exists():
                store = open_store(out)
                for key, attrs in store.iter_series():
                    seen.setdefault(key, set()).add(attrs.get("status"))
                    if attrs.get("status") == "complete" and store.check_series(key):
                        broken.append(f"{key}: complete but {store.check_series(key)}")
            time.sleep(0.05)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        summary = run([archive], out, heads=HEADS, backend="torch", executor="ray", ray_actors=2, batch_size=1)
    finally:
        finished.set()
        reader.join()
    assert summary.exit_code == 0 and summary.count("complete") == len(seen) == 2
    assert_same_arrays(out, local_store)
    assert validate_store(out, deep=True) == []
    # a group is written under its key marked incomplete and published by its status, last
    assert all("incomplete" in statuses for statuses in seen.values()), seen
    assert broken == []

    store = open_store(out)
    record = store.runs()[summary.run_id]
    assert record["executor"]["name"] == "ray" and record["config"]["executor"] == "ray"
    workers = {(w["node"], w["actor"]) for w in record["executor"]["ran_on"]}
    assert workers and sum(w["series"] for w in record["executor"]["ran_on"]) == 2
    for _, attrs in store.iter_series():
        assert attrs["executor"] == "ray" and (attrs["node"], attrs["actor"]) in workers
    for _, attrs in open_store(local_store).iter_series():
        assert attrs["executor"] == "local" and attrs["actor"] == "driver"
    index = zarr.open_group(str(out / "index"), mode="r")
    assert sorted(read_text(index["series_key"]).tolist()) == sorted(k for k, _ in store.iter_series())

    again = run([archive], out, heads=HEADS, backend="torch", executor="ray")
    assert again.count("resumed") == 2 and again.exit_code == 0  # resume is the driver's, whatever the executor


def test_a_worker_killed_mid_run_loses_no_series(archive, local_store, tmp_path, monkeypatch):
    out = tmp_path / "killed.zarr"
    # the actor process dies, as kill -9 would, on its second series write: one inference actor
    # sees both series, so one dies mid-run and its batch is retried on the restarted actor
    monkeypatch.setenv("MRFM_KILL_AT", "between-series:2")
    summary = run([archive], out, heads=HEADS, backend="torch", executor="ray", ray_actors=1, batch_size=1)
    monkeypatch.delenv("MRFM_KILL_AT")
    ran_on = open_store(out).runs()[summary.run_id]["executor"]["ran_on"]
    assert len({w["actor"] for w in ran_on}) == 1 and len({w["pid"] for w in ran_on}) == 2, ran_on  # restarted once
    if summary.count("complete") < 2:  # a series the retries did not finish is left for resume
        summary = run([archive], out, heads=HEADS, backend="torch", executor="ray")
    assert summary.exit_code == 0
    assert all(a["status"] == "complete" for _, a in open_store(out).iter_series())
    assert_same_arrays(out, local_store)
    assert validate_store(out, deep=True) == []


def test_one_bad_series_exits_1_from_a_job_file(archive, tmp_path):
    bad = tmp_path / "bad"
    write_bad_inputs(bad, seed=21, cases=BASIC_CASES)
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "archives": [str(archive), str(bad)],
                "out": str(tmp_path / "r.zarr"),
                "heads": ["classify"],
                "backend": "torch",
                "executor": "ray",
            }
        )
    )
    result = CliRunner().invoke(cli, ["run", "--job", str(job), "--log-json"])
    assert result.exit_code == 1, result.output
    store = open_store(tmp_path / "r.zarr")
    by_desc = {a.get("description"): a for _, a in store.iter_series()}
    assert by_desc["BAD TRUNCATED"]["status"] == "failed" and "truncated" in by_desc["BAD TRUNCATED"]["reason"]
    assert by_desc["BAD CT"]["status"] == "skipped"
    assert sum(a["status"] == "complete" for a in by_desc.values()) == 2
    assert all(a["executor"] == "ray" for a in by_desc.values())
    assert validate_store(tmp_path / "r.zarr") == []


def test_ray_workers_write_into_an_s3_bucket(archive, local_store, monkeypatch):
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        # MRFM_* settings travel to the workers; the Ray instance was started without AWS settings
        monkeypatch.setenv(
            "MRFM_STORAGE_OPTIONS", json.dumps({"endpoint_url": endpoint, "key": "test", "secret": "test"})
        )
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint, key="test", secret="test").mkdir("results")
        url = "s3://results/ray.zarr"
        summary = run([archive], url, heads=HEADS, backend="torch", executor="ray", batch_size=2)
        assert summary.exit_code == 0 and summary.count("complete") == 2
        assert validate_store(url, deep=True) == []
        store, reference = open_store(url), open_store(local_store)
        for key, attrs in store.iter_series():
            assert attrs["executor"] == "ray"
            assert np.array_equal(
                store.read_output(key, "segment", "anatomy"), reference.read_output(key, "segment", "anatomy")
            )
            np.testing.assert_allclose(
                store.read_output(key, "retrieve", "embedding"),
                reference.read_output(key, "retrieve", "embedding"),
                rtol=0,
                atol=1e-5,
            )
        assert run([archive], url, heads=HEADS, backend="torch", executor="ray").count("resumed") == 2
    finally:
        server.stop()
