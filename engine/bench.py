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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click

STAGES = ("discover", "load", "views", "encode", "heads", "map_back", "write")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_QUERY = "lesion in the brain"


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory of this process and of its finished children (loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": round(own, 1), "children": round(children, 1)}


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class _Clock:
    """Accumulates seconds per stage; ``wrap`` times every call of a function."""

    def __init__(self) -> None:
        self.seconds = {s: 0.0 for s in STAGES}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed


# --------------------------------------------------------------------------- set-up


def _setup(
    heads: list[str] | None, backend: str, batch_size: int, queries: list[str]
) -> tuple[Any, Any, dict[str, Any], Any]:
    """Model, encoder backend, loaded heads and text features, as a run sets them up."""
    from .executors.stages import (
        prepare_run,
    )  # bench is a tool beside the run path; it loads what each measurement needs

    mdl, enc, _, loaded, text, _ = prepare_run(None, backend, "fp32", batch_size, heads, {}, queries)
    return mdl, enc, loaded, text


def _archive(studies: int, archive: str | Path | None, workdir: Path) -> tuple[Path, list[Path]]:
    """The DICOM root to run on and one folder per series (for the per-series baselines)."""
    if archive is not None:
        from .discover import scan  # bench is a tool beside the run path; it loads what each measurement needs

        root = Path(archive)
        folders = sorted(
            {ref.sources[0].path.parent for ref in scan([root]).series if ref.sources and ref.sources[0].member is None}
        )
        return root, folders
    from .synthetic import (
        write_demo_archive,
    )  # bench is a tool beside the run path; it loads what each measurement needs

    manifest = write_demo_archive(workdir / "archive", studies=studies, seed=0)
    return manifest.dicom_root, [manifest.root / s.dicom_dir for s in manifest.series]


# --------------------------------------------------------------------------- stages


def time_stages(
    root: Path, heads: list[str] | None, backend: str, batch_size: int, queries: list[str], workdir: Path
) -> dict[str, Any]:
    """Each stage on its own, serially, over every MR series under ``root``."""
    from .discover import load, scan  # bench is a tool beside the run path; it loads what each measurement needs
    from .inference import Inference  # bench is a tool beside the run path; it loads what each measurement needs
    from .executors.stages import (
        series_attrs,
    )  # bench is a tool beside the run path; it loads what each measurement needs
    from .prepare import Prepared  # bench is a tool beside the run path; it loads what each measurement needs
    from .store import ResultStore  # bench is a tool beside the run path; it loads what each measurement needs
    from .views import make_views  # bench is a tool beside the run path; it loads what each measurement needs

    mdl, enc, loaded, text = _setup(heads, backend, batch_size, queries)
    clock = _Clock()
    inference = Inference(enc, loaded, text, batch_size)
    enc.encode = clock.wrap("encode", enc.encode)
    for head in loaded.values():
        head.predict = clock.wrap("heads", head.predict)
    inference._finish = clock.wrap("map_back", inference._finish)  # output checks + mapping to the native grid

    with clock.stage("discover"):
        refs = [r for r in scan([root]).series if r.modality == "MR" and not r.problems]
    preps = []
    for ref in refs:
        with clock.stage("load"):
            volume = load(ref)
        with clock.stage("views"):
            views = make_views(volume, mdl.preprocessing, inference.view_kinds())
        preps.append((ref, Prepared(ref.key, volume.shape, volume.affine, dict(volume.meta), views)))
    results = []
    for i in range(0, len(preps), batch_size):
        chunk = preps[i : i + batch_size]
        results.extend(zip(chunk, inference.run([p for _, p in chunk])))
    getattr(inference, "close", lambda: None)()
    store = ResultStore(workdir / "stages.zarr", mode="a")
    for (ref, prep), res in results:
        attrs = series_attrs(ref, "bench", "bench", prep)
        attrs["heads"] = {
            name: {
                "version": h.spec["version"],
                "outputs": [d["name"] for d in h.spec["outputs"]],
                "error": res.errors.get(name),
                "fingerprint": "bench",
                "run_id": "bench",
            }
            for name, h in loaded.items()
        }
        with clock.stage("write"):
            store.write_series(ref.key, attrs, res.outputs, "complete")
    with clock.stage("write"):
        _index(store)
    n = len(refs)
    stages = {
        s: {"seconds": round(t, 4), "series_per_s": round(n / t, 3) if t > 0 else None}
        for s, t in clock.seconds.items()
    }
    return {"series": n, "stages": stages}


def _index(store: Any) -> None:
    """The end-of-run index update: incremental where the store offers it."""
    update = getattr(store, "update_index", None)
    update() if update is not None else store.rebuild_index()


# --------------------------------------------------------------------------- end to end


def run_mrfm(
    root: Path,
    out: Path,
    heads: list[str] | None,
    backend: str,
    batch_size: int,
    workers: int | None,
    queries: list[str],
) -> dict[str, Any]:
    from .pipeline import run  # bench is a tool beside the run path; it loads what each measurement needs

    t = time.perf_counter()
    summary = run(
        [root],
        out,
        heads=heads,
        backend=backend,
        batch_size=batch_size,
        workers=workers,
        overwrite=True,
        queries=queries,
    )
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "series": summary.count("complete"),
        "failed": summary.count("failed"),
        "stages": {k: round(v, 3) for k, v in summary.stages.items()},
        "workers": getattr(summary, "workers", 0) or 0,
    }


def monai_available() -> bool:
    try:
        import monai  # noqa: F401
    except ImportError:
        return False
    return True


def run_monai(
    folders: list[Path],
    heads: list[str] | None,
    backend: str,
    batch_size: int,
    workers: int,
    queries: list[str],
    setup: tuple | None = None,
) -> dict[str, Any]:
    """The same series through MONAI transforms and a DataLoader, then the same encoder and the
    global-view heads (a MONAI user has no tiles view; tiles heads are left out and listed).

    Timed like ``mrfm run``: from nothing loaded (model, heads, text features) to the last
    prediction, unless ``setup`` hands them in."""
    import torch  # optional: MONAI is the comparison baseline, installed with the bench extra
    from monai.data import (
        DataLoader,
        Dataset,
    )  # optional: MONAI is the comparison baseline, installed with the bench extra
    from monai.transforms import (
        Compose,
        EnsureChannelFirst,
        LoadImage,
        NormalizeIntensity,
        Orientation,  # optional: MONAI is the comparison baseline, installed with the bench extra
        ResizeWithPadOrCrop,
        ScaleIntensityRangePercentiles,
        Spacing,
    )

    t = time.perf_counter()
    mdl, enc, loaded, text = setup or _setup(heads, backend, batch_size, queries)
    pre = mdl.preprocessing
    lo, hi = pre.get("intensity", {}).get("clip_percentiles", [0.5, 99.5])
    transform = Compose(
        [
            LoadImage(reader="PydicomReader", image_only=True),
            EnsureChannelFirst(),
            Orientation(axcodes="RAS"),
            Spacing(pixdim=tuple(pre["spacing"]), mode="bilinear"),
            ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True),
            NormalizeIntensity(),
            ResizeWithPadOrCrop(spatial_size=tuple(pre["input_size"])),
        ]
    )
    used = {n: h for n, h in loaded.items() if h.spec["inputs"]["view"] == "global"}
    loader = DataLoader(Dataset([str(f) for f in folders], transform), batch_size=batch_size, num_workers=workers)
    n = 0
    with torch.inference_mode():
        for batch in loader:
            images = torch.as_tensor(batch).float()
            feats = enc.encode(images)
            for head in used.values():
                head.predict([_head_input(head, f"s{n + i}", images[i], f, text) for i, f in enumerate(feats)])
            n += len(feats)
    return {
        "seconds": time.perf_counter() - t,
        "series": n,
        "heads": sorted(used),
        "left_out": sorted(set(loaded) - set(used)),
    }


def _head_input(head: Any, key: str, image: Any, features: Any, text: Any) -> Any:
    """What a head declares, built by hand as a MONAI user would (no valid region or view info)."""
    from .features import HeadInput  # bench is a tool beside the run path; it loads what each measurement needs

    inputs = head.spec["inputs"]
    return HeadInput(
        key,
        image if inputs.get("image") else None,
        features.only(inputs["features"]),
        text if "text" in inputs["features"] else None,
        tuple(int(n) for n in image.shape[-3:]),
    )


def compare_end_to_end(
    root: Path,
    folders: list[Path],
    heads: list[str] | None,
    backend: str,
    batch_size: int,
    workers: int | None,
    repeats: int,
    workdir: Path,
    queries: list[str],
) -> dict[str, Any]:
    """mrfm and the MONAI baseline on the same series, interleaved, medians of ``repeats``."""
    label = ",".join(heads) if heads else "all"
    report: dict[str, Any] = {"heads": label}
    mrfm_runs, monai_runs = [], []
    baseline = monai_available()
    loader_workers = workers or 0
    for r in range(repeats):
        mrfm_runs.append(
            run_mrfm(root, workdir / f"e2e-{label}-{r}.zarr", heads, backend, batch_size, workers, queries)
        )
        if workers is None:  # the loader processes mrfm chose on this machine, so both load alike
            loader_workers = mrfm_runs[-1]["workers"]
        if baseline:  # set up from nothing each time, as each mrfm run does
            monai_runs.append(run_monai(folders, heads, backend, batch_size, loader_workers, queries))
    m = _median([x["seconds"] for x in mrfm_runs])
    n = mrfm_runs[-1]["series"] + mrfm_runs[-1]["failed"]
    last = mrfm_runs[-1]
    report["mrfm"] = {
        "seconds_median": round(m, 3),
        "series": n,
        "series_per_s": round(n / m, 3),
        "run_timings": last["stages"],
        "write_share": round(last["stages"].get("write", 0.0) / last["seconds"], 3),
    }
    if not baseline:
        report["monai"] = {"status": "not installed"}
        return report
    b = _median([x["seconds"] for x in monai_runs])
    bn = monai_runs[-1]["series"]
    report["monai"] = {
        "status": "ok",
        "seconds_median": round(b, 3),
        "series": bn,
        "series_per_s": round(bn / b, 3),
        "heads": monai_runs[-1]["heads"],
        "left_out": monai_runs[-1]["left_out"],
        "loader_workers": loader_workers,
    }
    report["speedup"] = round((n / m) / (bn / b), 3)  # series/s of mrfm over the baseline's
    return report


# --------------------------------------------------------------------------- dcm2niix


def dcm2niix_binary() -> str | None:
    found = shutil.which("dcm2niix") or str(Path(sys.executable).with_name("dcm2niix"))
    return found if Path(found).exists() else None


def validation_series(data: Path = SHARED_DATA) -> list[tuple[str, list[Path]]]:
    """The dcm2niix validation series beside the project: each mosaic file of dcm_qa_ts, the
    Philips enhanced file and the Siemens XA10 run of dcm_qa_enh."""
    out: list[tuple[str, list[Path]]] = []
    ts = data / "dcm_qa_ts" / "In"
    for f in sorted(ts.glob("*.dcm"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
        out.append((f"dcm_qa_ts/{f.name}", [f]))
    for name in ("Philips", "Siemens/XA10"):
        files = sorted((data / "dcm_qa_enh" / "In" / name).glob("*.dcm"))
        if files:
            out.append((f"dcm_qa_enh/{name}", files))
    return out


def compare_dcm2niix(series: list[tuple[str, list[Path]]], repeats: int, workdir: Path) -> dict[str, Any]:
    """mrfm scan + load against dcm2niix's whole conversion (``-z n``: NIfTI + JSON sidecar),
    one folder per series, interleaved, medians of ``repeats``."""
    exe = dcm2niix_binary()
    if exe is None:
        return {"status": "not installed"}
    from .discover import load, scan  # bench is a tool beside the run path; it loads what each measurement needs

    rows = []
    for name, files in series:
        folder = workdir / "dcm" / name.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, folder / f.name)

        def ours() -> None:
            for ref in scan([folder]).series:  # noqa: B023 (called within this iteration)
                load(ref)

        def theirs() -> None:
            out = Path(tempfile.mkdtemp(dir=workdir))
            subprocess.run([exe, "-z", "n", "-o", str(out), str(folder)], check=True, capture_output=True)  # noqa: B023 (as above)
            shutil.rmtree(out)

        ours(), theirs()  # warm file cache and imports for both
        a, b = [], []
        for _ in range(repeats):
            for fn, acc in ((ours, a), (theirs, b)):
                t = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t)
        rows.append(
            {
                "series": name,
                "files": len(files),
                "mrfm_ms": round(_median(a) * 1e3, 1),
                "dcm2niix_ms": round(_median(b) * 1e3, 1),
                "ratio": round(_median(a) / _median(b), 3),
            }
        )
    return {"status": "ok", "flags": "-z n", "series": rows}


# --------------------------------------------------------------------------- memory at scale


def rss_at_scale(counts: list[int], heads: list[str], backend: str, workdir: Path) -> dict[str, Any]:
    """Peak RSS of a run at each study count, each in a fresh process (peak RSS only grows);
    the archive is written by another process first, so its generation is not counted."""
    rows = []
    for n in counts:
        root = workdir / f"scale-{n}"
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from engine.synthetic import write_demo_archive; "
                "write_demo_archive(Path(sys.argv[1]), studies=int(sys.argv[2]), seed=0)",
                str(root),
                str(n),
            ],
            check=True,
        )
        code = (
            "import json, sys; from engine.bench import peak_rss_mib, run_mrfm; from pathlib import Path; "
            "r = run_mrfm(Path(sys.argv[1]) / 'dicom', Path(sys.argv[1]) / 'out.zarr', sys.argv[2].split(','), sys.argv[3], 4, None, []); "
            "print(json.dumps({**r, 'rss': peak_rss_mib()}))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(root), ",".join(heads), backend],
            check=True,
            capture_output=True,
            text=True,
        )
        rec = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "studies": n,
                "series": rec["series"],
                "seconds": round(rec["seconds"], 2),
                "peak_rss_mib": rec["rss"]["self"],
                "children_peak_rss_mib": rec["rss"]["children"],
            }
        )
        shutil.rmtree(root, ignore_errors=True)
    report: dict[str, Any] = {"heads": heads, "runs": rows}
    if len(rows) >= 2 and rows[0]["peak_rss_mib"]:
        report["ratio_last_to_first"] = round(rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3)
    return report


# --------------------------------------------------------------------------- the whole bench


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
        root, folders = _archive(studies, archive, work)
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


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"mrfm bench — {report['archive']['source']}, backend {report['backend']}",
        "",
        "stage        seconds   series/s",
    ]
    for name in STAGES:
        s = report["stages"][name]
        lines.append(
            f"{name:<12} {s['seconds']:>7.3f}   {s['series_per_s'] if s['series_per_s'] is not None else '-':>8}"
        )
    e = report["end_to_end"]
    lines += [
        "",
        f"end to end: {e['series']} series in {e['seconds_median']:.2f} s = {e['series_per_s']:.3f} series/s; "
        f"slowest stage {e['slowest_stage']}; overlap efficiency {e['overlap_efficiency']:.2f}",
        f"run timings (s): {e['run_timings']}",
        f"writing: {e['write_cost_share']:.1%} of the end-to-end time (the write stage alone over end to end); "
        f"the writer thread was busy {e['write_share']:.1%} of the run's wall time, waiting for shared cores included",
    ]
    for cmp in report.get("monai", []):
        b = cmp["monai"]
        if b.get("status") != "ok":
            lines.append(f"MONAI baseline ({cmp['heads']}): {b.get('status')}")
            continue
        left = f"; left out of the baseline: {', '.join(b['left_out'])}" if b["left_out"] else ""
        lines.append(
            f"MONAI baseline ({cmp['heads']} heads): mrfm {cmp['mrfm']['series_per_s']:.3f} series/s vs MONAI "
            f"{b['series_per_s']:.3f} series/s = {cmp['speedup']:.2f}x (medians of repeats, interleaved{left})"
        )
    d = report.get("dcm2niix")
    if d is not None:
        if d.get("status") != "ok":
            lines.append(f"dcm2niix: {d.get('status')}")
        else:
            lines += [
                "",
                f"DICOM scan+load vs dcm2niix {d['flags']} (whole conversion), medians, interleaved",
                "series                   files   mrfm ms  dcm2niix ms   ratio",
            ]
            for r in d["series"]:
                lines.append(
                    f"{r['series']:<24} {r['files']:>5} {r['mrfm_ms']:>9} {r['dcm2niix_ms']:>12} {r['ratio']:>7.2f}"
                )
    rss = report["peak_rss_mib"]
    lines.append(f"\npeak RSS: this process {rss['self']:.0f} MiB, largest child {rss['children']:.0f} MiB")
    sc = report.get("rss_scale")
    if sc:
        for r in sc["runs"]:
            lines.append(
                f"  {r['studies']:>4} studies ({r['series']} series, {sc['heads']}): peak RSS {r['peak_rss_mib']:.0f} MiB "
                f"(children {r['children_peak_rss_mib']:.0f} MiB), {r['seconds']} s"
            )
        if "ratio_last_to_first" in sc:
            lines.append(
                f"  peak RSS ratio {sc['runs'][-1]['studies']} vs {sc['runs'][0]['studies']} studies: {sc['ratio_last_to_first']:.2f}x"
            )
    return "\n".join(lines)


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
