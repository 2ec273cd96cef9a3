"""Throughput of a DICOMweb run against a run from disk, on the same series, in one script.

Writes a demo archive, loads it into a throwaway Orthanc (Debian's orthanc + orthanc-dicomweb),
runs the same heads once from disk and once over DICOMweb (QIDO-RS + WADO-RS) into fresh stores,
and prints series per second for each and their ratio. Usage:

    python examples/bench_pacs.py [--series 20] [--heads classify] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import engine  # noqa: E402
from orthanc_server import Orthanc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=20)
    ap.add_argument("--heads", default="classify")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mrfm-bench-pacs-"))
    from engine.synthetic import write_demo_archive

    studies = 1
    while True:  # the smallest demo archive with enough series
        manifest = write_demo_archive(work / f"archive{studies}", studies=studies, seed=11)
        refs = engine.scan([manifest.dicom_root]).series
        if len(refs) >= args.series:
            break
        studies += max(1, (args.series - len(refs)) // 2)
    refs = sorted(refs, key=lambda r: r.key)[: args.series]
    server = Orthanc.start(work / "orthanc")
    try:
        files = [s.path for r in refs for s in r.sources]
        server.upload(files)
        disk_root = work / "disk-series"  # exactly the uploaded series, for the run from disk
        for f in files:
            dest = disk_root / f.relative_to(manifest.dicom_root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
        heads = args.heads.split(",")
        uids = [r.series_uid for r in refs]
        t = time.perf_counter()
        disk = engine.run([disk_root], work / "disk.zarr", heads=heads, backend="torch")
        t_disk = time.perf_counter() - t
        t = time.perf_counter()
        web = engine.run([server.dicomweb], work / "web.zarr", heads=heads, backend="torch")
        t_web = time.perf_counter() - t
    finally:
        server.stop()
    n_disk = sum(r.status == "complete" and r.key in {engine.sanitise_key(u) for u in uids} for r in web.results)
    print(f"series: {len(refs)} ({len(files)} files) heads: {args.heads}")
    print(
        f"disk:     {disk.count('complete')} complete in {t_disk:.1f} s = {disk.count('complete') / t_disk:.3f} series/s"
    )
    print(f"dicomweb: {web.count('complete')} complete in {t_web:.1f} s = {web.count('complete') / t_web:.3f} series/s")
    print(
        f"dicomweb / disk throughput: {(web.count('complete') / t_web) / (disk.count('complete') / t_disk):.2f}"
        f" (same {n_disk} series both ways; end to end, model set-up included)"
    )


if __name__ == "__main__":
    main()
