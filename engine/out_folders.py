"""Which folders mrfm may write into: a new or empty one, or one that mrfm made.

A store is recognised by its root attributes (``mrfm.format_version`` in the root zarr.json), an
export folder by its manifest. A folder holding anything else belongs to the user: writing there
would replace their files (a store's ``index/`` is rebuilt when unreadable, an export's tables
are rewritten), so it is refused, with or without ``--overwrite``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import UsageError

SHOWN = 5  # entries named in the refusal


def is_mrfm_root(meta: dict[str, Any] | None) -> bool:
    """Whether parsed root metadata is an mrfm store's: a group whose attributes carry ``mrfm``."""
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return False
    mrfm = (meta.get("attributes") or {}).get("mrfm")
    return isinstance(mrfm, dict) and "format_version" in mrfm


def check_store_folder(where: str, entries: Iterable[str], root_meta: bytes | None) -> None:
    """Raise UsageError unless ``where`` (its top-level ``entries`` and root zarr.json bytes) may
    become or stay an mrfm store: empty, an mrfm store, or a store whose creation stopped after
    its first, attribute-less zarr.json."""
    names = sorted(set(entries))
    meta = _parse(root_meta)
    if not names or is_mrfm_root(meta):
        return
    if (
        names == ["zarr.json"]
        and isinstance(meta, dict)
        and meta.get("node_type") == "group"
        and not meta.get("attributes")
    ):
        return
    raise UsageError(
        f"{where}: the folder is not empty and is not an mrfm result store ({_listing(names)}); "
        "mrfm writes a store only into a new or empty folder or an existing mrfm store, "
        "and never replaces anything else. Give another --out"
    )


def check_export_folder(out_dir: Path, manifest_name: str) -> None:
    """Raise UsageError when ``out_dir`` holds files but no export manifest (not an mrfm export)."""
    try:
        names = sorted(os.listdir(out_dir))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise UsageError(f"--out {out_dir}: exists and is not a folder") from None
    except OSError as exc:
        raise UsageError(f"--out {out_dir}: cannot list the folder ({exc.strerror or exc})") from None
    if names and manifest_name not in names:
        raise UsageError(
            f"--out {out_dir}: the folder is not empty and holds no {manifest_name} ({_listing(names)}); "
            "mrfm exports only into a new or empty folder or an earlier export's folder"
        )


def local_entries(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _parse(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:SHOWN])
    return f"it holds {shown}" + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
