"""How a result store's costs grow with its size: writes N synthetic series groups (N = 1k, 10k,
...; realistic small outputs, no model) and measures, per N, files and bytes per series, time to
write a series, resume triage and index update for 100 new series, inspect and search latency.

    python examples/store_scale.py --sizes 1000,10000 --out /tmp/scale

Series past the first --sample are written by copying a written group (same files, new key and
attributes) so that 10^5 series fit in minutes; every measured write and every 100 new series
goes through ResultStore.write_series. The table says which figures were measured how.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from engine.search import search
from engine.store import OutputArray, ResultStore, open_store
from engine.store_index import _Row
from engine.store_cli import store_stats

FP = "sha256:" + "1" * 64
HEADS = {
    "segment": ["anatomy"],
    "classify": ["region"],
    "localize": ["lesions"],
    "regress": ["lesion_volume"],
    "retrieve": ["embedding"],
}
SHAPE = (64, 64, 32)
DIM = 64


def attrs(key: str, run_id: str) -> dict:
    return {
        "series_key": key,
        "study_uid": f"1.2.{key}",
        "series_uid": key,
        "description": "T1 brain",
        "reader": "dicom",
        "source": {"first": "a#1", "count": 32},
        "run_id": run_id,
        "fingerprint": FP,
        "geometry": {
            "shape": list(SHAPE),
            "affine": np.diag([1.0, 1.0, 2.0, 1.0]).tolist(),
            "spacing": [1.0, 1.0, 2.0],
            "orientation": "axial",
        },
        "heads": {
            h: {"version": "1", "outputs": o, "error": None, "fingerprint": FP, "run_id": run_id}
            for h, o in HEADS.items()
        },
    }


def outputs(rng: np.random.Generator) -> list[OutputArray]:
    mask = np.zeros(SHAPE, np.uint8)
    c = rng.integers(10, 50, 3)
    mask[c[0] - 8 : c[0] + 8, c[1] - 8 : c[1] + 8, max(c[2] - 20, 0) : c[2] - 4] = rng.integers(1, 4)
    emb = rng.normal(size=DIM).astype(np.float32)
    boxes = {
        "world": np.tile([1.0, 1, 1, 9, 9, 9], (3, 1)),
        "voxel": np.tile([1.0, 1, 1, 9, 9, 9], (3, 1)),
        "scores": rng.random(3).astype(np.float32),
        "labels": np.array(["lesion"] * 3),
    }
    return [
        OutputArray("segment", "1", {"name": "anatomy", "kind": "mask", "labels": ["bg", "a", "b", "c"]}, mask),
        OutputArray(
            "classify",
            "1",
            {"name": "region", "kind": "scores", "dtype": "float32", "labels": list("abcdefgh")},
            rng.random(8).astype(np.float32),
        ),
        OutputArray("localize", "1", {"name": "lesions", "kind": "boxes", "labels": ["lesion"]}, boxes),
        OutputArray(
            "regress",
            "1",
            {"name": "lesion_volume", "kind": "value", "dtype": "float32", "units": "ml"},
            np.float32(rng.random()),
        ),
        OutputArray(
            "retrieve",
            "1",
            {"name": "embedding", "kind": "embedding", "dtype": "float32", "normalized": True},
            emb / np.linalg.norm(emb),
        ),
    ]


def clone(template: Path, dest: Path, key: str) -> None:
    """A copy of a written series group under another key (the fast path past the sample)."""
    shutil.copytree(template, dest)
    meta = json.loads((dest / "zarr.json").read_text())
    meta["attributes"].update({"series_key": key, "series_uid": key, "study_uid": f"1.2.{key}"})
    (dest / "zarr.json").write_text(json.dumps(meta))


def build(path: Path, n: int, sample: int, rng: np.random.Generator) -> dict:
    store = ResultStore(path, mode="a")
    store.begin_run("r0", {"started": "x", "model": {"fingerprint": FP}})
    keys = [f"s{i:07d}" for i in range(n)]
    t = time.perf_counter()
    for key in keys[:sample]:
        store.write_series(key, attrs(key, "r0"), outputs(rng), "complete")
    write_s = (time.perf_counter() - t) / min(sample, n)
    template = path / "series" / keys[0]
    t = time.perf_counter()
    for key in keys[sample:]:
        clone(template, path / "series" / key, key)
        store._index_rows[key] = _Row(
            "complete", f"1.2.{key}", "T1 brain", {h: FP for h in HEADS}, embeddings={"retrieve/embedding": _unit(rng)}
        )
    clone_s = (time.perf_counter() - t) / max(n - sample, 1)
    for key in keys[:sample]:  # rows of the written sample: the same, from the groups
        store._index_rows[key].embeddings = {"retrieve/embedding": store.read_output(key, "retrieve", "embedding")}
    t = time.perf_counter()
    rows = store._index_rows
    store._resolve_embeddings(rows, "retrieve/embedding", [])
    store._write_index(rows, "retrieve/embedding", [])
    store._index_rows = {}
    store.finish_run("r0", {"finished": "x"})
    return {"write_s": write_s, "clone_s": clone_s, "index_build_s": time.perf_counter() - t}


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(path: Path, n: int, rng: np.random.Generator) -> dict:
    fps = {h: FP for h in HEADS}
    new = [f"new{i:04d}" for i in range(100)]
    store = ResultStore(path, mode="a")
    with store.lock("r1"):
        store.begin_run("r1", {"started": "x", "model": {"fingerprint": FP}})
        triage_new = timed(lambda: store.triage(new, fps, verify="deep"))
        old = [f"s{i:07d}" for i in rng.choice(n, 100, replace=False)]
        triage_old = timed(lambda: store.triage(old, fps, verify="index"))
        t = time.perf_counter()
        for key in new:
            store.write_series(key, attrs(key, "r1"), outputs(rng), "complete")
        write_new = (time.perf_counter() - t) / len(new)
        t = time.perf_counter()
        store.update_index()
        update = time.perf_counter() - t
        store.finish_run("r1", {"finished": "x"})
    inspect = timed(lambda: open_store(path).summary())
    search_s = timed(lambda: search(path, like="s0000001", k=10))
    assert [h.series_key for h in search(path, like="new0001", k=1)]
    stats = store_stats(str(path), sample=20)
    return {
        "triage_new_100": triage_new,
        "triage_stored_100": triage_old,
        "write_new": write_new,
        "index_update_100": update,
        "inspect": inspect,
        "search": search_s,
        "files_per_series": stats["per_series"]["files"],
        "bytes_per_series": stats["per_series"]["bytes"],
        "index": stats["index"],
    }


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--sample", type=int, default=200, help="series written through write_series per size")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mrfm-store-scale"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        path = args.out / f"n{n}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        rng = np.random.default_rng(n)
        t = time.perf_counter()
        built = build(path, n, min(args.sample, n), rng)
        m = measure(path, n, rng)
        rows.append({"n": n, **built, **m, "store_bytes": du(path), "build_total_s": time.perf_counter() - t})
        print(json.dumps(rows[-1], default=str), flush=True)
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    print(table(rows, args.sample))


def table(rows: list[dict], sample: int) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    head = (
        "| series | files/series | store MB | write ms/series (measured) | triage 100 new ms | triage 100 stored (index) ms "
        "| index update 100 new ms | inspect ms | search ms |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['files_per_series']} | {r['store_bytes'] / 1e6:.1f} | {ms(r['write_s'])} | "
            f"{ms(r['triage_new_100'])} | {ms(r['triage_stored_100'])} | {ms(r['index_update_100'])} | "
            f"{ms(r['inspect'])} | {ms(r['search'])} |"
        )
    lines.append(
        f"\nwrite ms/series: mean of the first {sample} series written with ResultStore.write_series into the store; "
        "the rest are copies of a written group (clone_s per series in the JSON lines). Triage, index update, "
        "inspect (open + summary) and search (open + like, k=10) are best of 3 (update: one run), on a warm page cache."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
