"""The tools ``mrfm bench`` compares mrfm with, on the same series: a MONAI pipeline built the way a
MONAI user would (LoadImage, EnsureChannelFirst, Orientation RAS, Spacing,
ScaleIntensityRangePercentiles, NormalizeIntensity, ResizeWithPadOrCrop, DataLoader, then the same
encoder and heads), and the ``dcm2niix`` binary's whole conversion against mrfm's scan + load.
Contenders run interleaved, medians of repeats; an absent tool reports ``not installed``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench_stages import median, run_mrfm, setup_run

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
    from monai.data import (  # optional: MONAI is the comparison baseline, installed with the bench extra
        DataLoader,
        Dataset,
    )
    from monai.transforms import (  # optional: MONAI is the comparison baseline, installed with the bench extra
        Compose,
        EnsureChannelFirst,
        LoadImage,
        NormalizeIntensity,
        Orientation,
        ResizeWithPadOrCrop,
        ScaleIntensityRangePercentiles,
        Spacing,
    )

    t = time.perf_counter()
    mdl, enc, loaded, text = setup or setup_run(heads, backend, batch_size, queries)
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
    m = median([x["seconds"] for x in mrfm_runs])
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
    b = median([x["seconds"] for x in monai_runs])
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
                "mrfm_ms": round(median(a) * 1e3, 1),
                "dcm2niix_ms": round(median(b) * 1e3, 1),
                "ratio": round(median(a) / median(b), 3),
            }
        )
    return {"status": "ok", "flags": "-z n", "series": rows}
