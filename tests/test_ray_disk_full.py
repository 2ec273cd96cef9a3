"""A full disk under the Ray executor ends as under the local one: DiskFull (exit 3) naming the
store, the series in flight incomplete, the run interrupted, and a rerun that completes."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray executor is an optional extra ('.[ray]')")

from engine.errors import DiskFull  # noqa: E402
from engine.pipeline import run  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.synthetic import derive_uid, make_grid, write_dicom_series  # noqa: E402
from engine.validate import validate_store  # noqa: E402

pytestmark = pytest.mark.slow
HEADS = ["classify", "segment"]


def test_a_full_disk_under_ray_exits_3_and_a_rerun_completes(tmp_path, monkeypatch):
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process; the fault must reach fresh workers")
    archive = tmp_path / "archive"
    for n in range(2):
        _, affine = make_grid("axial", (0.0, 0.0, 10.0 * n), shape=(24, 24, 6), spacing=(4.0, 4.0, 4.0))
        write_dicom_series(
            archive / f"s{n}",
            300.0 + 400.0 * np.random.default_rng(n).random((24, 24, 6)),
            affine,
            study_uid=derive_uid(5, "ray-full", "study"),
            series_uid=derive_uid(5, "ray-full", n),
            description=f"T1 {n}",
        )
    out = tmp_path / "r.zarr"
    monkeypatch.setenv("MRFM_DISK_FULL_AT", "mid-series-write:2")  # set before Ray starts: its workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        with pytest.raises(DiskFull, match=f"no space left on the device holding {out}"):
            run([archive], out, heads=HEADS, backend="torch", executor="ray", ray_actors=1, batch_size=1)
    finally:
        ray.shutdown()
        monkeypatch.delenv("MRFM_DISK_FULL_AT")
    store = open_store(out)
    assert [r["status"] for r in store.recorded_runs().values()] == ["interrupted"]
    assert "incomplete" in [a["status"] for _, a in store.iter_series()]
    assert run([archive], out, heads=HEADS, backend="torch", workers=0).exit_code == 0
    assert validate_store(out, deep=True) == []
