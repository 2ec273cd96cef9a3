"""``mrfm bench``: where a run's time goes, and how mrfm compares with a MONAI pipeline and dcm2niix.

From one invocation, on a generated demo archive (or a given one):

- per-stage throughput, each stage timed on its own over the same series in this process
  (discover, load, views, encode, heads, map back, write);
- end-to-end series/s of ``engine.pipeline.run`` and overlap efficiency = end-to-end / slowest
  stage (1.0: the pipeline runs at the speed of its slowest stage), the run's own timings, the
  write share of the run and peak RSS;
- end to end against a baseline built the way a MONAI user would (LoadImage, EnsureChannelFirst,
  Orientation RAS, Spacing, ScaleIntensityRangePercentiles, NormalizeIntensity,
  ResizeWithPadOrCrop, DataLoader, then the same encoder and heads), contenders interleaved,
  medians of repeats, for the chosen heads and for every global-view head;
- DICOM scan + load against the ``dcm2niix`` binary's whole conversion for the same series.

Sections whose tool is absent report ``{"status": "not installed"}``. Ratios are from one run
on one machine; the absolute times are only meaningful next to each other.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click

from .bench_stages import bench_archive

# measurement (engine.bench_stages), the tools compared with (engine.bench_baselines) and the
# printed text (engine.bench_report) have their own modules; their public names import from here too
from .bench_baselines import SHARED_DATA as SHARED_DATA
from .bench_baselines import compare_dcm2niix as compare_dcm2niix
from .bench_baselines import compare_end_to_end as compare_end_to_end
from .bench_baselines import dcm2niix_binary as dcm2niix_binary
from .bench_baselines import monai_available as monai_available
from .bench_baselines import run_monai as run_monai
from .bench_baselines import validation_series as validation_series
from .bench_report import format_report as format_report
from .bench_stages import DEFAULT_QUERY as DEFAULT_QUERY
from .bench_stages import STAGES as STAGES
from .bench_stages import peak_rss_mib as peak_rss_mib
from .bench_stages import rss_at_scale as rss_at_scale
from .bench_stages import run_mrfm as run_mrfm
from .bench_stages import time_stages as time_stages


def run_bench(
    studies: int = 2,
    archive: str | Path | None = None,
    heads: list[str] | None = None,
    *,
    all_heads: bool = True,
    backend: str = "torch",
    batch_size: int = 4,
    workers: int | None = None,
    repeats: int = 3,
    baselines: bool = True,
    dicom: list[tuple[str, list[Path]]] | None = None,
    scale: list[int] | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its report (see the module docstring; ``format_report``
    prints it). ``dicom``: (name, files) series for the dcm2niix comparison (default: the
    validation series beside the project, when present)."""
    heads = list(heads or ["classify"])
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        work = Path(tmp)
        root, folders = bench_archive(studies, archive, work)
        queries = [DEFAULT_QUERY]
        report: dict[str, Any] = {
            "archive": {
                "source": str(archive) if archive else f"demo archive, {studies} studies",
                "series_folders": len(folders),
            },
            "backend": backend,
        }
        # warm-up: imports, weights and backend set-up are not what is measured
        run_mrfm(folders[0] if archive is None else root, work / "warm.zarr", heads, backend, batch_size, 0, queries)
        staged = time_stages(root, heads, backend, batch_size, queries, work)
        report["stages"] = staged["stages"]
        e2e = compare_end_to_end(
            root, folders, heads, backend, batch_size, workers, repeats if baselines else 1, work, queries
        )
        rate = e2e["mrfm"]["series_per_s"]
        slowest = min(
            (s for s in STAGES if report["stages"][s]["series_per_s"]),
            key=lambda s: report["stages"][s]["series_per_s"],
        )
        report["end_to_end"] = {
            "series": e2e["mrfm"]["series"],
            "series_per_s": rate,
            "seconds_median": e2e["mrfm"]["seconds_median"],
            "slowest_stage": slowest,
            "overlap_efficiency": round(rate / report["stages"][slowest]["series_per_s"], 3),
            "run_timings": e2e["mrfm"]["run_timings"],
            "write_share": e2e["mrfm"]["write_share"],
            # what writing costs the run: the write stage's own time (every series group and the
            # index, serially, nothing else running) over the end-to-end time of the same series.
            # The writer thread's wall time (write_share) also counts waiting for the cores that
            # loading and inference share with it.
            "write_cost_share": round(report["stages"]["write"]["seconds"] / e2e["mrfm"]["seconds_median"], 3),
        }
        report["monai"] = [e2e] if baselines else [{"heads": ",".join(heads), "monai": {"status": "skipped"}}]
        if baselines and all_heads:
            every = compare_end_to_end(root, folders, None, backend, batch_size, workers, repeats, work, queries)
            report["monai"].append(every)
            shared = every["monai"].get("heads")
            if every["monai"].get("left_out") and shared:
                # the same heads on both sides: the baseline has no tiled (sliding-window) path
                report["monai"].append(
                    compare_end_to_end(root, folders, shared, backend, batch_size, workers, repeats, work, queries)
                )
        if baselines:
            series = dicom if dicom is not None else validation_series()
            report["dcm2niix"] = (
                compare_dcm2niix(series, repeats, work) if series else {"status": "no validation series found"}
            )
        report["peak_rss_mib"] = peak_rss_mib()
        if scale:
            report["rss_scale"] = rss_at_scale(scale, heads, backend, work)
    return report


@click.command("bench")
@click.option("--studies", default=2, show_default=True, help="Studies in the generated demo archive.")
@click.option(
    "--archive", type=click.Path(exists=True), default=None, help="Bench this archive instead of a generated one."
)
@click.option(
    "--heads", default="classify", show_default=True, help="Heads for the stage timings and the first comparison."
)
@click.option("--all-heads/--no-all-heads", default=True, show_default=True, help="Also compare with every head.")
@click.option("--backend", default="torch", show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--workers", type=int, default=None, help="Loader processes (default: the pipeline's choice).")
@click.option("--repeats", default=3, show_default=True, help="Repeats per contender (medians are reported).")
@click.option("--no-baselines", is_flag=True, help="Skip the MONAI and dcm2niix comparisons.")
@click.option(
    "--dicom",
    "dicom",
    multiple=True,
    type=click.Path(exists=True),
    help="A folder holding one DICOM series for the dcm2niix comparison (repeatable; default: the validation series).",
)
@click.option(
    "--scale", default=None, help="Study counts for the peak-RSS comparison, e.g. 10,100 (each run in a fresh process)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(
    studies: int,
    archive: str | None,
    heads: str,
    all_heads: bool,
    backend: str,
    batch_size: int,
    workers: int | None,
    repeats: int,
    no_baselines: bool,
    dicom: tuple[str, ...],
    scale: str | None,
    as_json: bool,
) -> None:
    """Per-stage throughput, end to end, and mrfm against MONAI and dcm2niix on the same series."""
    series = [(Path(d).name, sorted(p for p in Path(d).rglob("*") if p.is_file())) for d in dicom] if dicom else None
    report = run_bench(
        studies,
        archive,
        [h for h in heads.split(",") if h],
        all_heads=all_heads,
        backend=backend,
        batch_size=batch_size,
        workers=workers,
        repeats=repeats,
        baselines=not no_baselines,
        dicom=series,
        scale=[int(n) for n in scale.split(",")] if scale else None,
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


bench_command = bench

if __name__ == "__main__":
    bench()
