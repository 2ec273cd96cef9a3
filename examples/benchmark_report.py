"""Seconds per series of the HTML report alone, and what its images cost on disk.

    python examples/benchmark_report.py STORE            # an existing store (path or URL)
    python examples/benchmark_report.py                  # a 2-study demo archive run first (all heads but ground)

Prints the cold report (every montage drawn, sources read from the archive), a warm rerun
(nothing changed: the page only) and bytes per image.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import engine
from engine.report import write_report


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mrfm-report-bench-"))
    if len(sys.argv) > 1:
        store = sys.argv[1]
    else:
        from engine.synthetic import write_demo_archive

        write_demo_archive(work / "archive", studies=2, seed=0)
        store = str(work / "r.zarr")
        engine.run(
            [work / "archive" / "dicom"],
            store,
            heads=["segment", "classify", "localize", "regress", "retrieve"],
            backend="torch",
            workers=0,
        )
    t = time.perf_counter()
    cold = write_report(store, work / "report")
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    warm = write_report(store, work / "report")
    warm_s = time.perf_counter() - t
    images = sorted((work / "report" / "img").glob("*.png"))
    sizes = [p.stat().st_size for p in images]
    n = max(cold.series, 1)
    print(
        f"series {cold.series} ({', '.join(f'{k} {v}' for k, v in sorted(cold.counts.items()))}), images {cold.images}"
    )
    print(f"cold report: {cold_s:.2f} s, {cold_s / n:.3f} s per series ({cold.drawn} montages drawn)")
    print(f"warm rerun:  {warm_s:.2f} s, {warm_s / n:.3f} s per series ({warm.drawn} drawn)")
    if sizes:
        print(
            f"image bytes: mean {sum(sizes) / len(sizes) / 1024:.1f} KiB, max {max(sizes) / 1024:.1f} KiB; "
            f"index.html {(work / 'report' / 'index.html').stat().st_size / 1024:.1f} KiB"
        )
        print(f"1,000 series at this mean: {sum(sizes) / len(sizes) * 1000 / 2**20:.0f} MiB of images")
    print(f"report: {work / 'report' / 'index.html'}")


if __name__ == "__main__":
    main()
