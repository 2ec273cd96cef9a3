"""Hostile-input corpus, archive-level cases: zips with unsafe member names, a nested zip, a zip
bomb and a corrupt zip, then symbolic links (outside the corpus, in a loop, broken) and an
unreadable file.

The builders register with ``bad_inputs`` (which imports this module); its docstring lists the
expected outcomes and ``write_bad_inputs`` writes them.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from .bad_corpus import BOMB_BYTES, case, Corpus


# ---- helpers ------------------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    """A zip with fixed timestamps (deterministic bytes) and member names kept exactly as given."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return path


def _series_bytes(corpus: Corpus, case: str, scratch: Path) -> list[tuple[str, bytes]]:
    """A valid series of ``case`` as (file name, bytes), written through a scratch folder."""
    paths = corpus.series(case, scratch)
    out = [(p.name, p.read_bytes()) for p in paths]
    shutil.rmtree(scratch)
    return out


# ---- zip archives -------------------------------------------------------------------------------


@case("zip_traversal", "skipped file")
def _zip_traversal(c: Corpus) -> Path:
    folder = c.folder("zip_traversal")
    files = _series_bytes(c, "zip_traversal", folder / "scratch")
    _zip(folder / "bad_zip_traversal.zip", {f"../../escaped/{name}": data for name, data in files})
    return folder


@case("zip_absolute", "skipped file")
def _zip_absolute(c: Corpus) -> Path:
    folder = c.folder("zip_absolute")
    files = _series_bytes(c, "zip_absolute", folder / "scratch")
    _zip(folder / "bad_zip_absolute.zip", {f"/tmp/mrfm-escaped/{name}": data for name, data in files})
    return folder


@case("nested_zip", "skipped file")
def _nested_zip(c: Corpus) -> Path:
    folder = c.folder("nested_zip")
    inner = _zip(folder / "inner.zip", dict(_series_bytes(c, "nested_zip", folder / "scratch")))
    _zip(folder / "bad_nested_zip.zip", {"inner.zip": inner.read_bytes()})
    inner.unlink()
    return folder


@case("zip_bomb", "skipped file")
def _zip_bomb(c: Corpus) -> Path:
    folder = c.folder("zip_bomb")
    info = zipfile.ZipInfo("IM0001.dcm", date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(folder / "bad_zip_bomb.zip", "w") as zf, zf.open(info, "w", force_zip64=True) as fh:
        for _ in range(BOMB_BYTES // len(chunk)):  # streamed: never 150 MB in memory
            fh.write(chunk)
    return folder


@case("corrupt_zip", "skipped file")
def _corrupt_zip(c: Corpus) -> Path:
    folder = c.folder("corrupt_zip")
    path = _zip(folder / "bad_corrupt_zip.zip", dict(_series_bytes(c, "corrupt_zip", folder / "scratch")))
    raw = bytearray(path.read_bytes())
    central = raw.find(b"PK\x01\x02")
    raw[central : central + 46] = b"\xff" * 46  # the first central-directory record, signature and all
    path.write_bytes(bytes(raw))
    return folder


# ---- file system --------------------------------------------------------------------------------


@case("symlink_outside", "skipped file")
def _symlink_outside(c: Corpus) -> Path:
    outside = c.out_dir.parent / f"{c.out_dir.name}-outside"
    c.series("symlink_outside", outside / "series")
    folder = c.folder("symlink_outside")
    _symlink(folder / "elsewhere", Path("..", "..", outside.name, "series"))
    return folder


@case("symlink_loop", "skipped file")
def _symlink_loop(c: Corpus) -> Path:
    folder = c.folder("symlink_loop")
    _symlink(folder / "again", Path(".."))
    _symlink(folder / "A.dcm", Path("B.dcm"))
    _symlink(folder / "B.dcm", Path("A.dcm"))
    return folder


@case("broken_symlink", "skipped file")
def _broken_symlink(c: Corpus) -> Path:
    folder = c.folder("broken_symlink")
    _symlink(folder / "IM0001.dcm", Path("no-such-file.dcm"))
    return folder


@case("unreadable", "failed or complete")
def _unreadable(c: Corpus) -> Path:
    for old in c.folder("unreadable").iterdir():  # a previous corpus' file may be mode 000
        old.chmod(0o644)
    paths = c.series("unreadable")
    paths[3].chmod(0)
    return paths[0].parent


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink():
        link.unlink()
    os.symlink(target, link)
