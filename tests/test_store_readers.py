"""Readers of a result store: ``mrfm show``, the HTML report (opened in Chromium where it is
installed), the series table of ``--format table`` joined in DuckDB, and a second, independent
Zarr v3 implementation reading every array.

One store serves them all: a demo study (axial, sagittal, coronal, oblique), a real series from
dcm2niix's QA set where ../shared/data holds it, and broken inputs that fail with reasons. It is
written by ``mrfm run --report``, so the report a run keeps is the one the browser opens.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import engine
from engine.cli import cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = SHARED / "dcm_qa_ts" / "In" / "1.dcm"
HEADS = "segment,classify,localize,regress,retrieve"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(store, report dir, archive root, click result) of one ``mrfm run --report``."""
    from engine.synthetic import write_demo_archive
    from engine.synthetic.bad_inputs import BASIC_CASES, write_bad_inputs

    root = tmp_path_factory.mktemp("readers")
    write_demo_archive(root / "archive" / "demo", studies=1, seed=3)
    write_bad_inputs(root / "archive" / "bad", seed=3, cases=BASIC_CASES)
    if REAL.is_file():
        (root / "archive" / "real").mkdir()
        shutil.copy(REAL, root / "archive" / "real" / "1.dcm")
    store, report = root / "r.zarr", root / "report"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(root / "archive"),
            "--out",
            str(store),
            "--heads",
            HEADS,
            "--backend",
            "torch",
            "--workers",
            "0",
            "--log-json",
            "--report",
            str(report),
        ],
    )
    assert result.exit_code == 1, result.output  # the broken inputs fail; the rest completes
    return store, report, root / "archive", result


def _series(store):
    st = engine.open_store(store)
    return st, dict(st.iter_series())


# ---- the report ---------------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, dict[str, str]] = {}
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-series-uid" in a:
            self.series[a["data-series-key"]] = a
        if tag == "img":
            self.images.append(a["src"])
        for name in ("src", "href"):
            if a.get(name):
                self.links.append(a[name])


def test_the_run_keeps_a_report_of_every_series(workspace):
    from PIL import Image

    store, report, archive, _ = workspace
    st, series = _series(store)
    text = (report / "index.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert set(page.series) == set(series)
    assert {k: a["data-series-uid"] for k, a in page.series.items()} == {
        k: a.get("series_uid") or k for k, a in series.items()
    }
    statuses = {a["status"] for a in series.values()}
    assert {"complete", "failed"} <= statuses
    for key, attrs in series.items():
        assert page.series[key]["data-status"] == attrs["status"]
        if attrs["status"] == "failed":
            import html

            assert html.escape(attrs["reason"], quote=True) in text, key
    complete = [k for k, a in series.items() if a["status"] == "complete"]
    # one montage per mask of each complete series (the segment head's), each a small PNG
    assert len(page.images) == len(complete)
    for src in page.images:
        path = report / src
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG" and img.width > 100 and img.height > 50
        assert path.stat().st_size < 80_000, src
    # nothing leaves the folder: only relative links and in-page anchors
    assert all(not re.match(r"^[a-z][a-z0-9+.-]*:", link) for link in page.links), page.links
    assert str(archive) not in text  # files are named by archive and position (archive#12), never by path


def test_a_second_report_draws_only_what_changed(workspace, tmp_path):
    from engine.report import write_report

    store, report, _, _ = workspace
    first = write_report(store, tmp_path / "rep")
    assert first.drawn == first.images > 0 and first.counts.get("failed")
    again = write_report(store, tmp_path / "rep")
    assert again.drawn == 0 and again.images == first.images
    # the run's own report and this one list the same series
    assert (tmp_path / "rep" / "index.html").read_text().count("data-series-uid") == (
        report / "index.html"
    ).read_text().count("data-series-uid")


def test_slices_are_shown_on_the_closest_RAS_grid_as_nibabel_reorients():
    import nibabel as nib

    from engine.report_images import canonical, to_ras

    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7)).astype(np.float32)
    rot = np.array([[0.0, 0.0, -2.0], [-1.5, 0.0, 0.0], [0.0, 3.0, 0.0]])  # sagittal-like, flipped axes
    oblique = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, -1.0]]) @ np.diag([1.0, 2.0, 1.5])
    for m in (np.diag([-1.0, -1.0, 2.0]), rot, oblique):
        affine = np.eye(4)
        affine[:3, :3] = m
        affine[:3, 3] = [10.0, -20.0, 5.0]
        ornt, spacing = canonical(affine, data.shape)
        ref = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
        np.testing.assert_array_equal(to_ras(data, ornt), np.asarray(ref.dataobj))
        np.testing.assert_allclose(spacing, ref.header.get_zooms()[:3], rtol=1e-6)


def test_the_lesion_is_drawn_where_it_is_in_its_colour():
    """A block labelled 1 on a flipped, anisotropic grid lands in the axial panel where its world
    position says (patient's right on the left, anterior up), tinted in its label colour."""
    from engine.report_images import _panel_size, canonical, montage

    shape = (20, 30, 10)
    affine = np.array([[-2.0, 0, 0, 40.0], [0, -1.0, 0, 15.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1.0]])
    image = np.full(shape, 100.0, np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[3:6, 20:24, 4:6] = 1
    img = montage(image, affine, shape, [(mask, [(0, 0, 0), (255, 0, 0)])], [])
    # independent of the drawing code: world centre of the block and the grid's world extent
    centre = (affine @ np.array([4.0, 21.5, 4.5, 1.0]))[:3]
    corners = np.array(
        [
            affine @ np.array([i, j, k, 1.0])
            for i in (-0.5, shape[0] - 0.5)
            for j in (-0.5, shape[1] - 0.5)
            for k in (-0.5, shape[2] - 0.5)
        ]
    )[:, :3]
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    w, h = _panel_size("axial", shape, canonical(affine, shape)[1])
    top = (img.height - h) // 2
    col = (hi[0] - centre[0]) / (hi[0] - lo[0]) * w  # x = R: right on the left
    row = (hi[1] - centre[1]) / (hi[1] - lo[1]) * h  # y = A: anterior up
    r, g, b = np.asarray(img)[top + int(row), int(col)].astype(int)
    assert r > g + 60 and r > b + 60, (r, g, b)
    assert abs(row - (h - 4)) > 10 and abs(col - (w - 4)) > 10
    r2, g2, b2 = np.asarray(img)[top + h - 4, w - 4].astype(int)
    assert r2 == g2 == b2  # grey away from it


@pytest.fixture(scope="module")
def chromium():
    """The system Chromium (Debian's chromium-headless-shell or chromium) and Playwright, or a skip."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        found = shutil.which(name) or next(
            (
                str(p)
                for p in (Path("/usr/lib/chromium") / "chrome-headless-shell", Path("/usr/lib/chromium/chromium"))
                if p.is_file()
            ),
            None,
        )
        if found:
            return found
    pytest.skip(
        "no Chromium here (apt-get install chromium-headless-shell; .ci/run installs it where apt is available)"
    )


def test_the_report_opens_in_chromium_with_every_series_and_its_images(workspace, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    store, report, _, _ = workspace
    _, series = _series(store)
    errors, requests = [], []
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        # a fresh profile folder (Playwright passes it as --user-data-dir)
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, args=args, headless=True
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((report / "index.html").as_uri(), wait_until="load")
            uids = page.eval_on_selector_all("[data-series-uid]", "els => els.map(e => e.dataset.seriesKey)")
            decoded = page.evaluate("""async () => {
                const imgs = [...document.images];
                imgs.forEach(i => { i.loading = 'eager'; });
                return Promise.all(imgs.map(i => i.decode().then(() => [i.naturalWidth, i.naturalHeight], () => [0, 0])));
            }""")
        finally:
            browser.close()
    assert not errors, errors
    assert sorted(uids) == sorted(series)
    n_complete = sum(a["status"] == "complete" for a in series.values())
    assert len(decoded) == n_complete and all(w > 100 and h > 50 for w, h in decoded), decoded
    assert requests and all(u.startswith("file://") for u in requests), [
        u for u in requests if not u.startswith("file://")
    ]


# ---- mrfm show ---------------------------------------------------------------------------------
def test_show_one_series_scores_boxes_and_mask_volumes(workspace):
    store, _, _, _ = workspace
    st, series = _series(store)
    key = next(k for k, a in series.items() if a["status"] == "complete")
    res = CliRunner().invoke(cli, ["show", str(store), key])
    assert res.exit_code == 0, res.output
    region = st.read_output(key, "classify", "region")
    labels = st.root["series"][key]["classify"]["region"].attrs["labels"]
    best = int(np.argmax(region))
    assert f"{labels[best]} {region[best]:.3f}" in res.output
    assert "box(es)" in res.output and " mL" in res.output

    data = json.loads(CliRunner().invoke(cli, ["show", str(store), series[key]["series_uid"], "--json"]).output)
    assert len(data) == 1 and data[0]["series_key"] == key
    scores = {(s["head"], s["output"]): s for s in data[0]["scores"]}
    np.testing.assert_allclose(scores[("classify", "region")]["scores"], region, atol=1e-6)
    mask = st.read_output(key, "segment", "anatomy")
    ml = abs(np.linalg.det(np.asarray(series[key]["geometry"]["affine"])[:3, :3])) / 1000.0
    for row in data[0]["masks"][0]["labels"]:
        assert row["voxels"] == int(np.count_nonzero(mask == row["value"]))
        assert row["ml"] == pytest.approx(row["voxels"] * ml, abs=1e-3)
    boxes = st.read_output(key, "localize", "lesions")
    assert data[0]["boxes"][0]["count"] == len(boxes["scores"])


def test_show_where_filters_and_refuses_unknown_keys(workspace):
    store, _, _, _ = workspace
    _, series = _series(store)
    res = CliRunner().invoke(cli, ["show", str(store), "--where", "status=failed", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["series_key"] for r in rows} == {k for k, a in series.items() if a["status"] == "failed"}
    assert all(r["reason"] for r in rows)
    bad = CliRunner().invoke(cli, ["show", str(store), "--where", "colour=red"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    missing = CliRunner().invoke(cli, ["show", str(store), "no-such-series"])
    assert missing.exit_code == 2 and "no series no-such-series" in missing.output


def test_show_never_lets_stored_text_drive_the_terminal():
    from engine.show import _plain

    shown = _plain("T1 \x1b[2J\x1b]0;title\x07 [bold]x[/] \u202e\r")
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown and "\r" not in shown
    assert "\\[bold]" in shown


# ---- the series table in DuckDB -----------------------------------------------------------------
def test_scores_join_the_series_table_in_duckdb(workspace, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    from engine.export import export

    store, _, _, _ = workspace
    _, series = _series(store)
    assert export(store, "table", tmp_path).exit_code == 0
    con = duckdb.connect()
    rows = con.execute(f"""
        SELECT s.series_uid, s.description, s.orientation, s.status, s.shape, sc.label, sc.score
        FROM '{tmp_path / "scores.parquet"}' sc JOIN '{tmp_path / "series.parquet"}' s USING (series_uid)
        WHERE sc.head = 'classify' AND sc.output = 'region' ORDER BY s.series_uid, sc.score DESC""").fetchall()
    complete = {a["series_uid"] or k: a for k, a in series.items() if a["status"] == "complete"}  # NIfTI: its key
    assert {r[0] for r in rows} == set(complete)
    for uid, desc, orientation, status, shape, _, _ in rows:
        assert (desc, orientation, status, list(shape)) == (
            complete[uid]["description"],
            complete[uid]["geometry"]["orientation"],
            "complete",
            complete[uid]["geometry"]["shape"],
        )
    table = con.execute(
        f"SELECT series_key, status, reason, run_id, model_fingerprint FROM '{tmp_path / 'series.parquet'}'"
    ).fetchall()
    assert {r[0]: r[1] for r in table} == {k: a["status"] for k, a in series.items()}
    assert all(r[2] for r in table if r[1] == "failed")
    model = engine.open_store(store).root.attrs["model"]["fingerprint"]
    assert {r[4] for r in table if r[1] == "complete"} == {model}
    csv = con.execute(f"SELECT count(*) FROM read_csv_auto('{tmp_path / 'series.csv'}')").fetchone()[0]
    assert csv == len(series)


# ---- a second Zarr v3 implementation --------------------------------------------------------------
def _arrays(group, prefix=""):
    for name, arr in group.arrays():
        yield f"{prefix}{name}", arr
    for name, sub in group.groups():
        yield from _arrays(sub, f"{prefix}{name}/")


def test_tensorstore_reads_every_array_of_the_store(workspace):
    ts = pytest.importorskip("tensorstore", reason="tensorstore is not installed (pip install -e '.[dev]')")
    import zarr

    store, _, _, _ = workspace
    root = zarr.open_group(str(store), mode="r")
    arrays = dict(_arrays(root))
    assert any(a.attrs.get("text") == "utf-8" for a in arrays.values())  # box labels and index columns
    for path, arr in arrays.items():
        other = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / path)}}, open=True, read=True
        ).result()
        got = other.read().result()
        assert got.dtype == arr.dtype, path
        np.testing.assert_array_equal(got, arr[...], err_msg=path)
