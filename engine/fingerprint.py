"""Fingerprints that decide what resume may skip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def file_digest(path: Path | None) -> str | None:
    if path is None or not Path(path).exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_fingerprint(model_fingerprint: str, heads: list[dict[str, Any]], preprocessing: dict[str, Any], params: dict[str, Any]) -> str:
    """sha256 over model, heads (manifest + weights digest), preprocessing and head parameters."""
    payload = {"model": model_fingerprint, "heads": sorted(heads, key=lambda h: h["name"]), "preprocessing": preprocessing, "params": params}
    return "sha256:" + hashlib.sha256(canonical_json(payload)).hexdigest()


def head_fingerprints(model_fingerprint: str, heads: list[dict[str, Any]], preprocessing: dict[str, Any], params: dict[str, Any]) -> dict[str, str]:
    """One fingerprint per head, so resume can tell which heads a series still needs."""
    return {h["name"]: run_fingerprint(model_fingerprint, [h], preprocessing, {h["name"]: params.get(h["name"], {})}) for h in heads}
