"""What ``mrfm bench`` measures of mrfm itself: each stage timed on its own over the same series
(discover, load, views, encode, heads, map back, write), a whole run end to end, and peak
resident memory, in this process or, at scale, in a fresh one per study count. Each
measurement loads what it needs when it runs, so that ``mrfm --help`` does not."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

STAGES = ("discover", "load", "views", "encode", "heads", "map_back", "write")
DEFAULT_QUERY = "lesion in the brain"


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory of this process and of its finished children (loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": round(own, 1), "children": round(children, 1)}


def median(values: list[float]) -> float:
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


def setup_run(
    heads: list[str] | None, backend: str, batch_size: int, queries: list[str]
) -> tuple[Any, Any, dict[str, Any], Any]:
    """Model, encoder backend, loaded heads and text features, as a run sets them up."""
    from .executors.stages import (  # bench is a tool beside the run path; it loads what each measurement needs
        prepare_run,
    )

    mdl, enc, _, loaded, text, _ = prepare_run(None, backend, "fp32", batch_size, heads, {}, queries)
    return mdl, enc, loaded, text


def bench_archive(studies: int, archive: str | Path | None, workdir: Path) -> tuple[Path, list[Path]]:
    """The DICOM root to run on and one folder per series (for the per-series baselines)."""
    if archive is not None:
        from .discover import scan  # bench is a tool beside the run path; it loads what each measurement needs

        root = Path(archive)
        folders = sorted(
            {ref.sources[0].path.parent for ref in scan([root]).series if ref.sources and ref.sources[0].member is None}
        )
        return root, folders
    from .synthetic import (  # bench is a tool beside the run path; it loads what each measurement needs
        write_demo_archive,
    )

    manifest = write_demo_archive(workdir / "archive", studies=studies, seed=0)
    return manifest.dicom_root, [manifest.root / s.dicom_dir for s in manifest.series]


def time_stages(
    root: Path, heads: list[str] | None, backend: str, batch_size: int, queries: list[str], workdir: Path
) -> dict[str, Any]:
    """Each stage on its own, serially, over every MR series under ``root``."""
    from .discover import load, scan  # bench is a tool beside the run path; it loads what each measurement needs
    from .inference import Inference  # bench is a tool beside the run path; it loads what each measurement needs
    from .executors.stages import (  # bench is a tool beside the run path; it loads what each measurement needs
        series_attrs,
    )
    from .prepare import Prepared  # bench is a tool beside the run path; it loads what each measurement needs
    from .store import ResultStore  # bench is a tool beside the run path; it loads what each measurement needs
    from .views import make_views  # bench is a tool beside the run path; it loads what each measurement needs

    mdl, enc, loaded, text = setup_run(heads, backend, batch_size, queries)
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
