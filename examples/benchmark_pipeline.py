"""How much the streaming pipeline gains from overlapping loading with inference and writing.

    python examples/benchmark_pipeline.py [--studies 6] [--workers 0 2] [--heads classify,segment,retrieve]

Runs the same archive into fresh stores with each worker count, in one process, and prints
series/s and the ratio to serial loading (workers=0), plus peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from engine.pipeline import run
from engine.synthetic import write_demo_archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--heads", default="classify,segment,retrieve")
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_demo_archive(Path(tmp) / "archive", studies=args.studies, seed=0)
        n = len(manifest.series)
        # warm-up: imports, weights and backend set-up are not what is measured
        run(
            [Path(tmp) / "archive" / manifest.series[0].dicom_dir],
            Path(tmp) / "warm.zarr",
            heads=args.heads.split(","),
            backend=args.backend,
            workers=0,
        )
        rates = {}
        for workers in args.workers:
            t = time.perf_counter()
            summary = run(
                [manifest.dicom_root],
                Path(tmp) / f"w{workers}.zarr",
                heads=args.heads.split(","),
                backend=args.backend,
                workers=workers,
            )
            seconds = time.perf_counter() - t
            rates[workers] = n / seconds
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in summary.stages.items())
            print(
                f"workers={workers}: {n} series in {seconds:.1f} s = {rates[workers]:.2f} series/s "
                f"({summary.count('complete')} complete, backend {summary.backend}; {stages})"
            )
        base = rates[args.workers[0]]
        for workers, rate in rates.items():
            print(f"workers={workers}: {rate / base:.2f}x of workers={args.workers[0]}")
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
