"""Per-format export time on a result store, and the tables read back by pandas.

    python examples/export_timing.py [STORE] [--studies 6] [--formats dicom-seg,dicom-sr,nifti,ome-zarr,table]

Without STORE, writes a demo archive (6 studies: 14 DICOM series) and runs the segment,
classify, localize and retrieve heads into a fresh store first. Each format is exported twice
into a fresh folder: the first run writes everything, the second shows the resume check's cost.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from engine.export import export


def _store(tmp: Path, studies: int) -> Path:
    from engine.pipeline import run
    from engine.synthetic import write_demo_archive

    write_demo_archive(tmp / "archive", studies=studies, seed=0)
    t0 = time.perf_counter()
    summary = run(
        [tmp / "archive" / "dicom"],
        tmp / "r.zarr",
        heads=["segment", "classify", "localize", "retrieve"],
        backend="torch",
        workers=0,
    )
    print(f"store: {len(summary.results)} series in {time.perf_counter() - t0:.1f}s")
    return tmp / "r.zarr"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", type=Path)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--formats", default="dicom-seg,dicom-sr,nifti,ome-zarr,table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or _store(Path(tmp), args.studies)
        out = Path(tmp) / "export"
        print(f"{'format':<10} {'series':>6} {'files':>6} {'first s':>8} {'s/series':>9} {'resume s':>9}  outcome")
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            first = export(store, fmt, out)  # one folder: the SR references the SEG exported before it
            t1 = time.perf_counter()
            again = export(store, fmt, out)
            t2 = time.perf_counter()
            n = max(1, len(first.results))
            files = sum(len(r.files) for r in first.results) + len(first.files)
            outcome = ", ".join(f"{c} {s}" for s, c in sorted(first.counts.items()))
            print(
                f"{fmt:<10} {len(first.results):>6} {files:>6} {t1 - t0:>8.2f} {(t1 - t0) / n:>9.3f} {t2 - t1:>9.2f}  {outcome}"
                f" | resume: {', '.join(f'{c} {s}' for s, c in sorted(again.counts.items()))}"
            )
        if "table" in args.formats:
            import pandas as pd

            for kind in ("scores", "boxes", "embeddings"):
                path = out / f"{kind}.parquet"
                if path.exists():
                    df = pd.read_parquet(path)
                    print(
                        f"{kind}.parquet: {len(df)} rows, {df['series_uid'].nunique()} series, columns {list(df.columns)[:12]}"
                    )


if __name__ == "__main__":
    main()
