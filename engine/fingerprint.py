"""Fingerprints that decide what resume may skip."""

from __future__ import annotations

import hashlib
import json
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping


def canonical_json(value: Any) -> bytes:
    """The one byte form every digest of a JSON-like value hashes: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def json_digest(value: Any) -> str:
    """sha256 (hex) of ``value``'s canonical JSON: fingerprints, export and engine-cache keys."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def file_digest(path: Path | None) -> str | None:
    if path is None or not Path(path).exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_fingerprint(
    model_fingerprint: str, heads: list[dict[str, Any]], preprocessing: dict[str, Any], params: dict[str, Any]
) -> str:
    """sha256 over model, heads, preprocessing and head parameters.

    Each head dict enters whole: manifest, weights digest and, when present, ``code_sha256``
    (:func:`head_code_digest`; :func:`head_record` builds such dicts).
    """
    payload = {
        "model": model_fingerprint,
        "heads": sorted(heads, key=lambda h: h["name"]),
        "preprocessing": preprocessing,
        "params": params,
    }
    return "sha256:" + json_digest(payload)


def head_fingerprints(
    model_fingerprint: str, heads: list[dict[str, Any]], preprocessing: dict[str, Any], params: dict[str, Any]
) -> dict[str, str]:
    """One fingerprint per head, so resume can tell which heads a series still needs; a head's
    covers its manifest, weights, parameters and, with ``code_sha256`` in its dict, its code."""
    return {
        h["name"]: run_fingerprint(model_fingerprint, [h], preprocessing, {h["name"]: params.get(h["name"], {})})
        for h in heads
    }


# ---- head code -------------------------------------------------------------------------------------
def head_code_digest(head_cls: type) -> str:
    """sha256 of the code a head runs, so editing a head makes resume redo it.

    A head from an installed (non-editable) distribution: the distribution's name, version and
    RECORD hashes of its files. Otherwise its sources: every ``.py`` file below the package
    that holds the head's module (a package module: its own folder), or the module file itself
    for a top-level module. Other packages' files never enter it.
    """
    module = sys.modules.get(head_cls.__module__)
    path = getattr(module, "__file__", None)
    if module is None or path is None:
        return "sha256:" + json_digest({"module": head_cls.__module__, "class": head_cls.__qualname__})
    path = Path(path).resolve()
    dist = _distribution_of(head_cls.__module__, path)
    if dist is not None:
        return _distribution_digest(dist)
    return _sources_digest(_source_files(module, path))


def head_record(name: str, head_cls: Any, plugin: str | None = None) -> dict[str, Any]:
    """What a run records about a head and fingerprints: name, version, plugin, manifest,
    weights and code digests (the ``head_info`` entries of :func:`head_fingerprints`)."""
    manifest = head_cls.manifest()
    return {
        "name": name,
        "version": manifest["version"],
        "plugin": plugin or head_cls.__module__,
        "manifest": manifest,
        "weights_sha256": file_digest(head_cls.weights_path()),
        "code_sha256": head_code_digest(head_cls),
    }


def _source_files(module: ModuleType, path: Path) -> tuple[Path, list[Path]]:
    """(root, files): the .py files of the package that holds ``module``, or the module alone."""
    if path.name == "__init__.py" or not getattr(module, "__package__", ""):
        root = path.parent if path.name == "__init__.py" else path
    else:
        root = path.parent  # a module inside a package: the package's folder
    if root.is_file():
        return root.parent, [root]
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    return root, files


def _sources_digest(found: tuple[Path, list[Path]]) -> str:
    root, files = found
    h = hashlib.sha256()
    for p in files:
        h.update(b"\0" + p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return "sha256:" + h.hexdigest()


def _is_editable(dist: metadata.Distribution) -> bool:
    """PEP 610: an editable install records ``dir_info.editable`` in direct_url.json."""
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return False
    return bool(info.get("dir_info", {}).get("editable"))


@lru_cache(maxsize=None)
def _providers() -> Mapping[str, list[str]]:
    """Top-level import name -> distributions that install it (read once per process)."""
    return metadata.packages_distributions()


def _distribution_of(module_name: str, path: Path) -> metadata.Distribution | None:
    """The non-editable installed distribution whose RECORD lists ``path``, if any."""
    for name in _providers().get(module_name.split(".")[0], []):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if _is_editable(dist) or not any(f.hash for f in dist.files or []):
            continue
        if any(f.suffix == ".py" and Path(str(dist.locate_file(f))).resolve() == path for f in dist.files or []):
            return dist
    return None


def _distribution_digest(dist: metadata.Distribution) -> str:
    h = hashlib.sha256(f"{dist.metadata['Name']}=={dist.version}\0".encode())
    for f in sorted(dist.files or [], key=lambda f: f.as_posix()):
        if f.hash is not None and "__pycache__" not in f.parts:
            h.update(f"{f.as_posix()}\0{f.hash.mode}={f.hash.value}\0".encode())
    return "sha256:" + h.hexdigest()
