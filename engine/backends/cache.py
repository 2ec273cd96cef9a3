"""The on-disk cache of compiled encoder artifacts (ONNX graphs, TensorRT plans).

Location: ``$MRFM_CACHE_DIR`` or the user cache dir (``platformdirs.user_cache_dir("mrfm")``),
under ``engines/``. An entry's key hashes everything that makes an artifact valid: the model
fingerprint, the shape range, the precision, the backend and library versions, and the device
(GPU name and compute capability). Builds hold a file lock, write to a temporary file and
``os.replace`` it into place, so readers never see half a file; a cached file that fails to load
is treated as corrupt and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock

from ..fingerprint import json_digest

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_VAR = "MRFM_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$MRFM_CACHE_DIR`` if set, else the platform's user cache directory for mrfm."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs  # only when no cache dir is configured

    return Path(platformdirs.user_cache_dir("mrfm"))


def device_identity(device: torch.device | str | None) -> dict[str, Any]:
    """What about the device a compiled artifact depends on."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}
    return {"type": device.type, "machine": platform.machine()}


def cache_key(
    *,
    fingerprint: str,
    backend: str,
    precision: str,
    shapes: dict[str, Any],
    versions: dict[str, str],
    device: dict[str, Any],
) -> str:
    """A short stable hash of every part that decides whether a cached artifact is valid."""
    parts = {
        "fingerprint": fingerprint,
        "backend": backend,
        "precision": precision,
        "shapes": shapes,
        "versions": versions,
        "device": device,
    }
    return json_digest(parts)[:32]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class EngineCache:
    """A directory of artifacts named ``<backend>-<key><suffix>``, each with a JSON sidecar."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir() / "engines"

    def path(self, backend: str, key: str, suffix: str) -> Path:
        return self.root / f"{backend}-{key}{suffix}"

    def get_or_build(
        self,
        path: Path,
        build: Callable[[Path], None],
        load: Callable[[Path], T | None],
        meta: dict[str, Any] | None = None,
    ) -> tuple[T, bool, float]:
        """Load ``path`` or build it; return (loaded object, cache hit, build seconds).

        ``build(tmp_path)`` writes the artifact to a temporary path that is then moved into
        place. ``load(path)`` returns the usable object, or None / raises for a corrupt or
        incompatible file, which is then deleted and rebuilt once.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.exists():
                obj = self._try_load(load, path)
                if obj is not None:
                    return obj, True, 0.0
                log.warning("cached artifact %s is corrupt or incompatible; rebuilding it", path)
                path.unlink(missing_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
            start = time.perf_counter()
            try:
                build(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            seconds = time.perf_counter() - start
            obj = self._try_load(load, path)
            if obj is None:
                path.unlink(missing_ok=True)
                raise RuntimeError(f"a freshly built artifact {path} could not be loaded")
            sidecar = {
                **(meta or {}),
                "artifact": path.name,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(seconds, 3),
            }
            atomic_write_bytes(
                path.with_name(path.name + ".json"), (json.dumps(sidecar, indent=2, default=str) + "\n").encode()
            )
            return obj, False, seconds

    @staticmethod
    def _try_load(load: Callable[[Path], T | None], path: Path) -> T | None:
        try:
            return load(path)
        except Exception as exc:  # any failure to load means the file cannot be used
            log.debug("loading %s failed: %s", path, exc)
            return None
