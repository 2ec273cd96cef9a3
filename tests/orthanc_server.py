"""A throwaway Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for tests and benchmarks:
its own config, storage and free ports under a temporary folder, run as a plain child process.

``Orthanc.start(folder)`` returns a running server or raises ``Unavailable`` with the reason
(binary or plugin absent), which tests turn into a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


class Unavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dicomweb_plugin() -> str | None:
    for d in PLUGIN_DIRS:
        for p in sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []:
            return str(p)
    return None


class Orthanc:
    """One Orthanc process. ``modalities`` (name -> (AE, port) on 127.0.0.1) are the peers it may
    C-STORE / C-MOVE to."""

    def __init__(
        self, folder: Path, modalities: dict[str, tuple[str, int]] | None = None, aet: str = "ORTHANC"
    ) -> None:
        self.folder, self.aet = Path(folder), aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.modalities = dict(modalities or {})
        self.proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, folder: Path, **kwargs: Any) -> "Orthanc":
        binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
        if binary is None:
            raise Unavailable("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
        if _dicomweb_plugin() is None:
            raise Unavailable("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
        server = cls(folder, **kwargs)
        server._launch(binary)
        return server

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://{self.aet}@127.0.0.1:{self.dicom_port}"

    def _config(self) -> dict[str, Any]:
        return {
            "Name": "mrfm-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [_dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {name: [ae, "127.0.0.1", port] for name, (ae, port) in self.modalities.items()},
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "UnknownSopClassAccepted": True,
            "StableAge": 1,
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,
        }

    def _launch(self, binary: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self._config(), indent=1))
        self.log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([binary, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(
                    f"Orthanc exited at start (code {self.proc.returncode}); see {self.folder / 'orthanc.log'}"
                )
            try:
                self.get("/system")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise Unavailable("Orthanc did not answer within 30 s")

    # ---- REST ------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Any:
        req = urllib.request.Request(
            self.http + path, data=body, method=method, headers={"Content-Type": content_type, **(headers or {})}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
        return json.loads(data) if data and data[:1] in (b"{", b"[") else data

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def upload(self, paths: list[Path]) -> None:
        for p in paths:
            self.request("POST", "/instances", Path(p).read_bytes(), "application/dicom")

    def qido(self, path: str) -> list[dict[str, Any]]:
        return self.get("/dicom-web" + path, headers={"Accept": "application/dicom+json"}) or []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
