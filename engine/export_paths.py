"""Where an export may look for a series' source files.

The roots come from the store's run records (or ``--archive``). A store may come from elsewhere, so
a recorded root is searched only when it exists and is a folder or a regular file (a zip or a
NIfTI given as ARCHIVE), and never when it is a file-system root such as ``/``, which would make
an export crawl the whole machine. Relative roots (recorded by older versions) are taken from the
working folder, as they were.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable


def source_roots(paths: Iterable[object], *, recorded: bool) -> tuple[list[Path], list[str]]:
    """(roots to search, in order and once each; 'root: why' for each refused one). ``recorded``:
    the roots came from the store, so a file-system root is refused too."""
    roots: list[Path] = []
    refused: list[str] = []
    for raw in paths:
        if not isinstance(raw, (str, Path)) or not str(raw):
            refused.append(f"{raw!r}: not a path")
            continue
        root = Path(os.path.abspath(raw))
        why = _unusable(root, recorded)
        if why:
            refused.append(f"{raw}: {why}")
        elif root not in roots:
            roots.append(root)
    return roots, refused


def _unusable(root: Path, recorded: bool) -> str | None:
    if recorded and root == Path(root.anchor):
        return "a file-system root"
    try:
        mode = os.stat(root).st_mode
    except OSError as exc:
        return exc.strerror.lower() if exc.strerror else "cannot be read"
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        return "neither a folder nor a file"
    return None
