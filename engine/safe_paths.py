"""Paths built from stored data stay where they belong.

Head names, output names and series keys come from a store, and a store may have been received
from elsewhere or damaged: one of them must never become ``/tmp/victim`` or ``..`` in a path.
Each is checked as a plain name before it is joined, and the joined path is resolved (symlinks
included) and checked to lie under its intended root before any file is opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import StoreError

# what series_key and the head manifest schema produce; no leading dot: never '.', '..' or hidden
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def is_safe_name(name: object) -> bool:
    """True for one plain path component: letters, digits, ``._-``, 1-128 characters, no leading dot."""
    return isinstance(name, str) and _SAFE_NAME.fullmatch(name) is not None


def safe_name(name: object, what: str) -> str:
    """``name`` when it is a plain path component, else StoreError naming ``what`` (e.g. 'head name')."""
    if not is_safe_name(name):
        raise StoreError(
            f"{what} {name!r} is not a plain name (letters, digits, '._-', no leading dot); "
            "the store is damaged or was tampered with"
        )
    return name  # type: ignore[return-value]


def inside(root: str | Path, *names: str, what: str = "name") -> Path:
    """``root/names...`` after checking each name is plain and that the resolved path (following
    any symlink already there) still lies under the resolved root; StoreError otherwise."""
    path = Path(root)
    for name in names:
        path = path / safe_name(name, what)
    check_under(root, path)
    return path


def check_under(root: str | Path, path: str | Path) -> Path:
    """``path`` when, resolved, it lies under resolved ``root``; StoreError naming both otherwise."""
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise StoreError(f"{path} resolves to {real}, outside {root}; refusing to write there")
    return Path(path)
