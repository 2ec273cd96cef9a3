"""Training archives from real anatomy for the default model's recipe (seeds 101, 102, ...; the
phantom archives keep seeds 1, 2, ...). An archive already written with the same seed and study
count is reused, so a rerun of the recipe does not regenerate it."""

from __future__ import annotations

import math
from pathlib import Path

from engine.synthetic.anatomy_archive import write_anatomy_archive
from engine.synthetic.manifest import ArchiveManifest

from .dataset import STUDIES_PER_ARCHIVE

FIRST_SEED = 101
BRAIN_SHARE = 0.5  # real scans are mostly heads: half the anatomy studies are brains


def _existing(root: Path, seed: int, studies: int) -> ArchiveManifest | None:
    path = root / "ground_truth" / "manifest.json"
    if path.is_file():
        m = ArchiveManifest.load(path)
        if m.seed == seed and len(m.studies) == studies:
            return m
    return None


def write_anatomy_training_archives(
    root: Path, studies: int, assets: str | Path, first_seed: int = FIRST_SEED
) -> list[ArchiveManifest]:
    """Archives of ``STUDIES_PER_ARCHIVE`` anatomy-based studies from seeds ``first_seed``, ... until ``studies`` exist."""
    out = []
    for a in range(max(1, math.ceil(studies / STUDIES_PER_ARCHIVE))):
        n = min(STUDIES_PER_ARCHIVE, studies - a * STUDIES_PER_ARCHIVE)
        seed = first_seed + a
        folder = Path(root) / f"anat_{seed}"
        out.append(
            _existing(folder, seed, n) or write_anatomy_archive(folder, n, seed, assets=assets, brain_share=BRAIN_SHARE)
        )
    return out
