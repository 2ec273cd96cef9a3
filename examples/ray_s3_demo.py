"""The demo archive through the Ray executor into an S3 bucket, compared with the local executor.

    python examples/ray_s3_demo.py [OUTDIR] [--studies 6] [--heads classify,segment,...]

Needs ``pip install -e '.[ray,dev]'`` (Ray, moto's server, s3fs). Writes the demo archive, runs
``mrfm run`` with the local executor into ``OUTDIR/local.zarr``, starts an S3-compatible server
(moto's server mode, on a free local port) with a fresh bucket, runs ``mrfm run --executor ray``
(a Ray instance started here, two inference actors) into ``s3://BUCKET/results.zarr``, then compares every array of the
two stores (masks and labels bitwise, floats within 1e-5), prints which executor, nodes and
actors each series record names, and runs ``mrfm inspect``, ``mrfm search`` and ``mrfm validate``
on the ``s3://`` URL. Credentials and the endpoint reach s3fs the usual way, through
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def mrfm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "engine", *args], env=env, capture_output=True, text=True)
    print(f"$ mrfm {' '.join(args)}   -> exit {proc.returncode}")
    return proc


def arrays(url: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    import zarr

    out: dict[str, np.ndarray] = {}

    def walk(group, prefix: str) -> None:
        for name, arr in group.arrays():
            out[f"{prefix}/{name}"] = np.asarray(arr[...])
        for name, sub in group.groups():
            walk(sub, f"{prefix}/{name}")

    walk(zarr.open_group(url, mode="r", storage_options=storage_options)["series"], "series")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--heads", default="", help="comma-separated heads (default: every installed head)")
    parser.add_argument("--ray-actors", type=int, default=2, help="inference actors (each loads the model and heads)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mrfm-ray-s3-"))
    heads = ["--heads", args.heads] if args.heads else []
    archive = out / "demo"
    if not (archive / "dicom").exists():
        mrfm("demo-archive", str(archive), "--studies", str(args.studies))
    env = {**os.environ, "COLUMNS": "160"}
    t0 = time.perf_counter()
    local = mrfm(
        "run", str(archive / "dicom"), "--out", str(out / "local.zarr"), "--overwrite", "--log-json", *heads, env=env
    )
    print(f"local executor: {time.perf_counter() - t0:.1f} s")

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's request log

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
        )
        bucket = f"mrfm-demo-{int(time.time())}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/results.zarr"
        t0 = time.perf_counter()
        remote = mrfm(
            "run",
            str(archive / "dicom"),
            "--out",
            url,
            "--executor",
            "ray",
            "--ray-actors",
            str(args.ray_actors),
            "--log-json",
            *heads,
            env=env,
        )
        print(f"ray executor into {url} (S3 server {endpoint}): {time.perf_counter() - t0:.1f} s")
        if local.returncode or remote.returncode:
            print(local.stderr[-2000:], remote.stderr[-2000:])
            return 1

        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        ours, reference = arrays(url, options), arrays(str(out / "local.zarr"))
        worst, bitwise, floats = 0.0, 0, 0
        assert sorted(ours) == sorted(reference), set(ours) ^ set(reference)
        for name, ref in reference.items():
            got = ours[name]
            assert got.shape == ref.shape and got.dtype == ref.dtype, name
            if ref.dtype.kind == "f":
                worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max(initial=0.0)))
                floats += 1
            else:
                assert np.array_equal(got, ref), name
                bitwise += 1
        print(
            f"arrays: {len(reference)} in each store; {bitwise} integer/text arrays (masks, labels, queries) bitwise equal; "
            f"{floats} float arrays, max |ray - local| = {worst:.2e}"
        )

        import zarr

        root = zarr.open_group(url, mode="r", storage_options=options)
        workers = {
            (g.attrs.get("executor"), g.attrs.get("node"), g.attrs.get("actor")) for _, g in root["series"].groups()
        }
        print("series records name (executor, node, actor):", sorted(workers))
        for command in (
            ["inspect", url],
            ["search", url, "knee MRI with joint effusion", "-k", "3"],
            ["validate", url, "--deep"],
        ):
            proc = mrfm(*command, env=env)
            print("\n".join(line for line in proc.stdout.splitlines()[:24]))
            if proc.returncode:
                print(proc.stderr[-1500:])
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
