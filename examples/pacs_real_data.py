"""PACS in and out on real series, against a throwaway Orthanc (Debian's orthanc + orthanc-dicomweb).

1. Runs over DICOMweb and DIMSE equal runs from disk on the same files: dcm2niix's validation
   series (``dcm_qa_ts``: one Siemens mosaic in nine transfer syntaxes; ``dcm_qa_enh``: Philips and
   Siemens XA10 Enhanced MR) and pydicom's MR test files (MR_small in several syntaxes). The nine
   syntaxes of one acquisition share their UIDs, so each goes to the PACS in its own round.
   Masks must match bitwise, floats within 1e-5.
2. SEG and SR sent back with STOW-RS and with C-STORE, each listed by Orthanc's QIDO-RS under the
   source study (SEG/SR removed between the two routes, so each route shows its own).
3. The listener: Orthanc sends a study (POST /modalities/mrfm/store); the time until it is written,
   against idle + run time.
4. Failures through the command line: server unreachable, association refused, server gone in the
   middle of a run; exit code, the lines printed, any traceback, what the store kept, the rerun.

Usage: python examples/pacs_real_data.py [--shared ../shared/data] [--workdir DIR] [--failures-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import zarr  # noqa: E402

import engine  # noqa: E402
from orthanc_server import Orthanc, free_port  # noqa: E402

HEADS = ["classify", "segment"]
MRFM = [sys.executable, "-m", "engine"]


def rounds(shared: Path) -> list[list[tuple[str, Path]]]:
    """Groups of (label, file); within a group every series has UIDs of its own."""
    from pydicom.data import get_testdata_file

    ts = sorted((shared / "dcm_qa_ts" / "In").glob("*.dcm"), key=lambda p: int(p.stem))
    small = [
        n
        for n in (
            "MR_small.dcm",
            "MR_small_implicit.dcm",
            "MR_small_bigendian.dcm",
            "MR_small_RLE.dcm",
            "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_jp2klossless.dcm",
            "MR_small_expb.dcm",
        )
    ]
    small_paths = [(n, get_testdata_file(n)) for n in small]
    out = []
    for i, f in enumerate(ts):
        group = [(f"dcm_qa_ts/{f.name}", f)]
        if i < len(small_paths) and small_paths[i][1]:
            group.append((f"pydicom/{small_paths[i][0]}", Path(small_paths[i][1])))
        out.append(group)
    enh = [("dcm_qa_enh/Philips/IM_0027_fMAP.dcm", shared / "dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm")]
    enh += [
        (f"dcm_qa_enh/Siemens/XA10/{p.name}", p) for p in sorted((shared / "dcm_qa_enh/In/Siemens/XA10").glob("*.dcm"))
    ]
    out[0] += [(label, p) for label, p in enh if p.exists()]
    return out


def arrays(group, prefix=""):
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            yield prefix + name, node[...]
        else:
            yield from arrays(node, prefix + name + "/")


def compare(disk: Path, other: Path) -> dict[str, dict]:
    """Per series: both statuses, geometry equal, masks (integer arrays) bitwise, largest float difference."""
    a, b = zarr.open_group(disk, mode="r")["series"], zarr.open_group(other, mode="r")["series"]
    rows = {}
    for key in sorted(set(a.group_keys()) | set(b.group_keys())):
        if key not in a or key not in b:
            rows[key] = {
                "status": (a[key].attrs["status"] if key in a else "-", b[key].attrs["status"] if key in b else "-"),
                "equal": False,
            }
            continue
        sa, sb = a[key], b[key]
        xa, xb = dict(arrays(sa)), dict(arrays(sb))
        ints = [n for n, x in xa.items() if x.dtype.kind != "f"]
        floats = [n for n, x in xa.items() if x.dtype.kind == "f"]
        masks_equal = xa.keys() == xb.keys() and all(np.array_equal(xa[n], xb[n]) for n in ints)
        diff = max(
            (float(np.max(np.abs(xa[n].astype(np.float64) - xb[n]))) if xa[n].size else 0.0 for n in floats if n in xb),
            default=0.0,
        )
        same_geometry = sa.attrs.get("geometry") == sb.attrs.get("geometry")
        rows[key] = {
            "status": (sa.attrs["status"], sb.attrs["status"]),
            "masks_bitwise": masks_equal,
            "int_arrays": len(ints),
            "float_arrays": len(floats),
            "max_float_diff": diff,
            "geometry": same_geometry,
            "equal": masks_equal and diff <= 1e-5 and same_geometry and sa.attrs["status"] == sb.attrs["status"],
            "reason": sa.attrs.get("reason") or "",
        }
    return rows


def upload(server: Orthanc, files: list[Path]) -> set[str]:
    """Orthanc's ids of the series the files went into."""
    ids = set()
    for f in files:
        answer = server.request("POST", "/instances", Path(f).read_bytes(), "application/dicom")
        ids.add(answer["ParentSeries"])
    return ids


def section(title: str) -> None:
    print(f"\n== {title}")


def equality(server: Orthanc, work: Path) -> tuple[Path, list[tuple[str, Path]]]:
    section("1. DICOMweb and DIMSE runs against runs from disk (masks bitwise, floats <= 1e-5)")
    print(
        f"{'files':<46} {'syntax':<28} {'status disk/web/dimse':<30} {'masks':<6} {'max |dF| web':>12} {'dimse':>9} equal"
    )
    groups = rounds(Path(ARGS.shared))
    last = None
    all_equal = True
    for n, group in reversed(list(enumerate(groups))):  # round 0 last: it stays in the PACS for 2-4
        folder = work / f"round{n}"
        disk_root = folder / "disk"
        for label, f in group:
            dest = disk_root / label
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
        disk = folder / "disk.zarr"
        engine.run([disk_root], disk, heads=HEADS, backend="torch")
        ids = upload(server, [f for _, f in group])
        web, dimse = folder / "web.zarr", folder / "dimse.zarr"
        engine.run([server.dicomweb], web, heads=HEADS, backend="torch")
        engine.run([server.dimse], dimse, heads=HEADS, backend="torch")
        cw, cd = compare(disk, web), compare(disk, dimse)
        by_uid = {}
        for label, f in group:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            by_uid.setdefault(engine.sanitise_key(str(ds.SeriesInstanceUID)), []).append(
                (label, ds.file_meta.TransferSyntaxUID.name)
            )
        for key in sorted(set(cw) | set(cd)):
            labels = by_uid.get(key, [(key, "?")])
            name = labels[0][0] + (f" (+{len(labels) - 1} files)" if len(labels) > 1 else "")
            w, d = cw.get(key, {}), cd.get(key, {})
            status = f"{w.get('status', ('-',))[0]}/{w.get('status', ('-', '-'))[1]}/{d.get('status', ('-', '-'))[1]}"
            ok = w.get("equal") and d.get("equal")
            all_equal &= bool(ok)
            print(
                f"{name:<46} {labels[0][1][:28]:<28} {status:<30} {str(w.get('masks_bitwise') and d.get('masks_bitwise')):<6} "
                f"{w.get('max_float_diff', float('nan')):>12.2e} {d.get('max_float_diff', float('nan')):>9.2e} {ok}"
                + (f"  ({w.get('reason')[:90]})" if w.get("reason") else "")
            )
        if n:
            for series_id in ids:
                server.request("DELETE", f"/series/{series_id}")
        else:
            last = (disk, group)
    print(f"every series equal: {all_equal}")
    return last[0], last[1]


def export_back(server: Orthanc, disk: Path, work: Path) -> None:
    section("2. SEG and SR back to the PACS, listed by QIDO-RS under the source study")
    studies = {
        a["study_uid"]: a["series_uid"]
        for _, s in zarr.open_group(disk, mode="r")["series"].groups()
        for a in [s.attrs.asdict()]
        if a["status"] == "complete"
    }
    print(
        f"{'route':<10} {'format':<10} {'exit':<5} {'sent':<6} {'studies with it listed (QIDO)':<32} origin in Orthanc"
    )
    for route, url in (("STOW-RS", server.dicomweb), ("C-STORE", server.dimse)):
        for fmt, modality in (("dicom-seg", "SEG"), ("dicom-sr", "SR")):
            out = work / f"export-{route}-{fmt}"
            res = subprocess.run(
                [*MRFM, "export", str(disk), "--format", fmt, "--out", str(out), "--to", url],
                capture_output=True,
                text=True,
            )
            listed = [st for st in studies if server.qido(f"/studies/{st}/series?Modality={modality}")]
            sent = sum(len(v) for rec in _manifests(out) for v in rec.get("sent", {}).values())
            origins = set()
            for st in listed:
                for s in server.qido(f"/studies/{st}/series?Modality={modality}"):
                    uid = s["0020000E"]["Value"][0]
                    for inst in server.request("POST", "/tools/lookup", uid.encode(), "text/plain"):
                        for i in server.get(f"/series/{inst['ID']}/instances"):
                            origins.add(server.get(f"/instances/{i['ID']}/metadata/Origin").decode())
            print(
                f"{route:<10} {modality:<10} {res.returncode:<5} {sent:<6} {len(listed)}/{len(studies):<30} {', '.join(sorted(origins))}"
            )
            for line in (res.stdout + res.stderr).splitlines():
                if line.strip().startswith("failed"):
                    print(f"{'':<10} {'':<10} not exported: {' '.join(line.split()[1:])[:160]}")
        for modality in ("SEG", "SR"):  # so the next route shows its own
            for s in server.qido(f"/series?Modality={modality}"):
                for found in server.request("POST", "/tools/lookup", s["0020000E"]["Value"][0].encode(), "text/plain"):
                    server.request("DELETE", f"/series/{found['ID']}")


def _manifests(folder: Path) -> list[dict]:
    out = []
    for p in folder.rglob("*.json"):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for fmt in (data.get("formats") or {}).values() if isinstance(data, dict) else []:
            out += [rec for rec in (fmt.get("series") or {}).values() if isinstance(rec, dict)]
    return out


def listener(server: Orthanc, port: int, disk: Path, work: Path) -> None:
    from engine.listen import listen

    section("3. The listener receives a study Orthanc sends and writes it")
    out, done, events = work / "listened.zarr", threading.Event(), []

    def on_event(e):
        events.append((time.monotonic(), e))
        if e.get("event") == "study":
            done.set()

    idle = 2.0
    t = threading.Thread(
        target=listen,
        args=(port, out),
        kwargs=dict(
            ae_title="MRFM",
            heads=HEADS,
            idle_seconds=idle,
            spool=work / "listen-spool",
            on_event=on_event,
            should_stop=done.is_set,
            backend="torch",
        ),
        daemon=True,
    )
    t.start()
    while not any(e.get("event") == "listening" for _, e in events):
        time.sleep(0.05)
    study_uid = next(
        a["study_uid"]
        for _, s in zarr.open_group(disk, mode="r")["series"].groups()
        for a in [s.attrs.asdict()]
        if a["status"] == "complete"
    )
    study = server.request("POST", "/tools/lookup", study_uid.encode(), "text/plain")[0]["ID"]
    t0 = time.monotonic()
    server.request("POST", "/modalities/mrfm/store", study.encode())
    t_sent = time.monotonic()
    t.join(600)
    t_done = next(ts for ts, e in events if e.get("event") == "study")
    run_s = next(e["seconds"] for _, e in events if e.get("event") == "done")
    rows = compare(disk, out)
    same = all(r["equal"] for k, r in rows.items() if k in zarr.open_group(out, mode="r")["series"])
    print(
        f"study {study_uid[:24]}…: Orthanc's C-STORE took {t_sent - t0:.1f} s; written {t_done - t_sent:.1f} s after the "
        f"last instance (idle {idle:.0f} s + run {run_s:.1f} s = {idle + run_s:.1f} s); "
        f"within idle + run + 1 s: {t_done - t_sent <= idle + run_s + 1.0}; equal to the disk run: {same}"
    )


def cli_run(args: list[str]) -> tuple[int, list[str], bool]:
    res = subprocess.run([*MRFM, *args], capture_output=True, text=True)
    text = res.stdout + res.stderr
    return res.returncode, [ln for ln in text.splitlines() if ln.strip()], "Traceback" in text


def failures(work: Path) -> None:
    section("4. Unreachable, refusing and vanishing servers (command line)")
    from engine.synthetic import write_demo_archive

    print(f"{'case':<34} {'exit':<5} {'lines':<6} {'traceback':<10} message / outcome")
    closed = free_port()
    for case, url in (
        ("DICOMweb server unreachable", f"dicomweb+http://127.0.0.1:{closed}/dicom-web"),
        ("DIMSE peer unreachable", f"dimse://ORTHANC@127.0.0.1:{closed}"),
    ):
        out = work / f"unreach-{len(url)}.zarr"
        code, lines, tb = cli_run(["run", url, "--out", str(out), "--heads", "classify", "--backend", "torch"])
        print(
            f"{case:<34} {code:<5} {len(lines):<6} {str(tb):<10} {lines[0] if lines else ''} (store written: {out.exists()})"
        )
    # the middle-of-run case needs more series than the loaders fetch ahead (four, and one batch):
    # a demo archive, run one series a batch
    archive = write_demo_archive(work / "demo", studies=4, seed=7).dicom_root
    server = Orthanc.start(work / "orthanc-b")
    try:
        server.upload(sorted(archive.rglob("*.dcm")))
        out = work / "refused.zarr"
        code, lines, tb = cli_run(
            [
                "run",
                f"dimse://NOT-ORTHANC@127.0.0.1:{server.dicom_port}",
                "--out",
                str(out),
                "--heads",
                "classify",
                "--backend",
                "torch",
            ]
        )
        print(
            f"{'association refused (wrong AE)':<34} {code:<5} {len(lines):<6} {str(tb):<10} {lines[0] if lines else ''} "
            f"(store written: {out.exists()})"
        )
        disk = work / "demo-disk.zarr"
        engine.run([archive], disk, heads=["classify"], backend="torch")
        for name, url_of in (("DICOMweb", lambda: server.dicomweb), ("DIMSE", lambda: server.dimse)):
            out = work / f"midrun-{name}.zarr"
            proc = subprocess.Popen(
                [
                    *MRFM,
                    "run",
                    url_of(),
                    "--out",
                    str(out),
                    "--heads",
                    "classify",
                    "--backend",
                    "torch",
                    "--batch-size",
                    "1",
                    "--log-json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            err_lines = []
            for line in proc.stderr:
                err_lines.append(line)
                if '"event": "series"' in line and server.proc.poll() is None:
                    server.stop()  # the PACS goes away once the first series is written
            stdout = proc.stdout.read()
            proc.wait()
            events = [json.loads(ln) for ln in err_lines if ln.startswith("{")]
            failed = [e["reason"] for e in events if e.get("event") == "series" and e["status"] == "failed"]
            done = next((e for e in events if e.get("event") == "done"), {})
            tb = "Traceback" in stdout + "".join(err_lines)
            code_v, _, _ = cli_run(["validate", str(out)])
            server._launch(server.proc.args[0])  # same ports, same storage
            code2, lines2, tb2 = cli_run(
                ["run", url_of(), "--out", str(out), "--heads", "classify", "--backend", "torch"]
            )
            same = all(r["equal"] for r in compare(disk, out).values() if r["status"][0] == "complete")
            print(
                f"{name + ' server gone mid-run':<34} {proc.returncode:<5} {'-':<6} {str(tb):<10} "
                f"complete {done.get('complete')}, failed {done.get('failed')}: …{(failed or ['-'])[0][-120:]}"
            )
            print(f"{'  … store after it':<34} {code_v:<5} {'':<6} {'':<10} mrfm validate exit {code_v}")
            print(
                f"{'  … rerun, server back':<34} {code2:<5} {len(lines2):<6} {str(tb2):<10} "
                f"{next((ln for ln in lines2 if ln.startswith('complete ')), lines2[-1] if lines2 else '')[:110]}; "
                f"equal to the disk run: {same}"
            )
    finally:
        server.stop()


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shared", default=str(ROOT.parent.parent / "shared" / "data"), help="folder holding dcm_qa_ts and dcm_qa_enh"
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--failures-only", action="store_true", help="only part 4")
    ARGS = ap.parse_args()
    if not (Path(ARGS.shared) / "dcm_qa_ts").is_dir():
        sys.exit(f"{ARGS.shared}: no dcm_qa_ts here; give --shared")
    work = ARGS.workdir or Path(tempfile.mkdtemp(prefix="mrfm-pacs-real-"))
    port = free_port()
    server = Orthanc.start(work / "orthanc", modalities={"mrfm": ("MRFM", port)})
    try:
        if ARGS.failures_only:
            return failures(work)
        disk, _ = equality(server, work)
        export_back(server, disk, work)
        listener(server, port, disk, work)
    finally:
        server.stop()
    failures(work)


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
