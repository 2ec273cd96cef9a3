"""Folders, zip files and single files on disk: today's header-only discovery as a source."""

from __future__ import annotations

from typing import Any

import engine


class FolderSource:
    name = "folder"

    def claims(self, archive: str) -> bool:
        return not engine.is_url(archive) or archive.startswith("file://")

    def find(self, archive: Any, options: engine.SourceOptions) -> Any:
        paths = [archive] if isinstance(archive, str) else list(archive)
        paths = [p.removeprefix("file://") for p in map(str, paths)]
        return engine.scan(
            paths, max_series_bytes=options.max_series_bytes, **({"record_paths": True} if options.record_paths else {})
        )
