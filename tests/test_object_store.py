"""A result store on object storage: a real S3-compatible server (moto's server mode on a free
port) holds a store written and read through the same functions as a local one."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from engine.errors import StoreLocked  # noqa: E402
from engine.search import search  # noqa: E402
from engine.store import LOCK_NAME, OutputArray, ResultStore, now, open_store  # noqa: E402
from engine.validate import validate_store  # noqa: E402

FP = "sha256:" + "0" * 64
SHAPE = (70, 20, 10)
HEADS = {"segment": "anatomy", "retrieve": "embedding", "classify": "region"}


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def url(endpoint, monkeypatch, request):
    import boto3

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint),
    ):
        monkeypatch.setenv(name, value)
    bucket = f"b-{request.node.name.lower().replace('_', '-')[:40]}-{int(time.time() * 1000) % 100000}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/results.zarr"


def run_info() -> dict:
    return {
        "started": now(),
        "config": {"paths": ["a"], "heads": sorted(HEADS)},
        "model": {"name": "tiny", "fingerprint": FP},
        "heads": {h: {"version": "1"} for h in HEADS},
        "backend": {"name": "torch", "reason": "test"},
        "fingerprint": FP,
        "host": {"hostname": socket.gethostname(), "python": "3", "torch": "0"},
    }


def write(store: ResultStore, key: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=8).astype(np.float32)
    emb /= np.linalg.norm(emb)
    attrs = {
        "series_key": key,
        "study_uid": "1.2",
        "series_uid": key,
        "description": f"T1 {key}",
        "reader": "dicom",
        "source": {"first": "a#1", "count": 10},
        "run_id": "r1",
        "fingerprint": FP,
        "geometry": {
            "shape": list(SHAPE),
            "affine": np.eye(4).tolist(),
            "spacing": [1.0, 1.0, 1.0],
            "orientation": "axial",
        },
        "heads": {
            h: {"version": "1", "outputs": [o], "error": None, "fingerprint": FP, "run_id": "r1"}
            for h, o in HEADS.items()
        },
    }
    outs = [
        OutputArray(
            "segment",
            "1",
            {"name": "anatomy", "kind": "mask", "labels": ["bg", "a", "b"]},
            rng.integers(0, 3, SHAPE).astype(np.uint8),
        ),
        OutputArray(
            "retrieve", "1", {"name": "embedding", "kind": "embedding", "dtype": "float32", "normalized": True}, emb
        ),
        OutputArray(
            "classify",
            "1",
            {"name": "region", "kind": "scores", "dtype": "float32", "labels": ["x", "y"]},
            np.array([0.2, 0.8]),
        ),
    ]
    store.write_series(key, attrs, outs, "complete")
    return emb


@pytest.fixture
def written(url):
    store = ResultStore(url, mode="a")
    with store.lock("r1"):
        store.begin_run("r1", run_info())
        embs = {f"s{i}": write(store, f"s{i}", i) for i in range(3)}
        store.update_index()
        store.finish_run("r1", {"finished": now()})
    return url, embs


def test_a_store_on_s3_reads_back_like_a_local_one(written):
    url, embs = written
    store = open_store(url)
    assert store.remote and store.summary()["series"] == {"complete": 3}
    np.testing.assert_array_equal(store.read_output("s1", "retrieve", "embedding"), embs["s1"])
    assert validate_store(url) == [] and validate_store(url, deep=True) == []
    hits = search(url, like="s0", k=2)
    assert [h.series_key for h in hits] == sorted(embs.keys() - {"s0"}, key=lambda k: -float(embs[k] @ embs["s0"]))
    assert store.triage(["s0", "new"], {h: FP for h in HEADS}, verify="index") == {"s0": set(), "new": set(HEADS)}


def test_the_cli_reads_a_store_by_its_url(written):
    from click.testing import CliRunner

    from engine.cli import cli

    url, _ = written
    shown = CliRunner().invoke(cli, ["inspect", url])
    assert shown.exit_code == 0 and "complete 3" in shown.output, shown.output
    checked = CliRunner().invoke(cli, ["validate", url, "--deep"])
    assert checked.exit_code == 0 and "is valid" in checked.output, checked.output
    found = CliRunner().invoke(cli, ["search", url, "--like", "s0", "-k", "2"])
    assert found.exit_code == 0 and ("s1" in found.output or "s2" in found.output), found.output
    missing = CliRunner().invoke(cli, ["inspect", url.replace("results.zarr", "nothing.zarr")])
    assert missing.exit_code == 3 and "Traceback" not in missing.output, missing.output


def test_a_second_writer_is_refused_and_a_stale_remote_lock_is_broken(written, monkeypatch):
    url, _ = written
    first = ResultStore(url, mode="a")
    with first.lock("r2"):
        assert first.lock_holder()["run_id"] == "r2" and "heartbeat" in first.lock_holder()
        with pytest.raises(StoreLocked, match="in use by run r2"):
            ResultStore(url, mode="a").acquire_lock("r3")
    assert open_store(url).lock_holder() is None  # released
    # a lock from another machine whose heartbeat stopped is stale
    dead = ResultStore(url, mode="a")
    dead.root.store  # noqa: B018
    import json

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    record = {
        "host": "elsewhere",
        "pid": 1,
        "run_id": "gone",
        "started": now(),
        "token": "t",
        "heartbeat": time.time() - 3600,
    }
    sync(dead.root.store.set(LOCK_NAME, default_buffer_prototype().buffer.from_bytes(json.dumps(record).encode())))
    assert "stale lock of run gone" in open_store(url).lock_problem()
    with pytest.raises(StoreLocked):  # fresh heartbeat: refused
        record["heartbeat"] = time.time()
        sync(dead.root.store.set(LOCK_NAME, default_buffer_prototype().buffer.from_bytes(json.dumps(record).encode())))
        ResultStore(url, mode="a").acquire_lock("r4")
    record["heartbeat"] = time.time() - 3600
    sync(dead.root.store.set(LOCK_NAME, default_buffer_prototype().buffer.from_bytes(json.dumps(record).encode())))
    taker = ResultStore(url, mode="a")
    with taker.lock("r5"):
        assert taker.lock_holder()["run_id"] == "r5"


def test_a_damaged_object_is_detected_and_redone(written):
    url, _ = written
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket_path = url.removeprefix("s3://")
    chunk = f"{bucket_path}/series/s1/segment/anatomy/c/0/0/0"
    raw = bytearray(fs.cat_file(chunk))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(raw))
    fs.rm_file(f"{bucket_path}/series/s2/classify/region/c/0")
    problems = validate_store(url, deep=True)
    assert any(p.startswith("/series/s1/segment/anatomy/c/0/0/0: checksum mismatch") for p in problems), problems
    assert any(p.startswith("/series/s2/classify/region/c/0: chunk missing") for p in problems), problems
    store = ResultStore(url, mode="a")
    fps = {h: FP for h in HEADS}
    assert store.triage(["s0", "s1", "s2"], fps, verify="deep") == {"s0": set(), "s1": set(HEADS), "s2": set(HEADS)}
    with store.lock("r2"):
        store.begin_run("r2", run_info())
        write(store, "s1", 1)
        write(store, "s2", 2)
        store.update_index()
        store.finish_run("r2", {"finished": now()})
    assert validate_store(url, deep=True) == []
