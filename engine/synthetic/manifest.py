"""The demo archive's ground-truth manifest (ground_truth/manifest.json) and its parsed form.

Paths inside the manifest are relative to the archive root so that an archive can be moved and
two archives made from the same seed are byte-identical.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .phantom import LABEL_NAMES, Lesion

MANIFEST_FORMAT = "mrfm-demo-archive/1"
GROUND_TRUTH_DIR = "ground_truth"
DICOM_DIR = "dicom"


@dataclass
class LesionTruth:
    index: int
    center_mm: list[float]
    radii_mm: list[float]
    axes: list[list[float]]
    volume_ml: float
    location: str

    @classmethod
    def from_lesion(cls, index: int, lesion: Lesion) -> LesionTruth:
        return cls(
            index,
            list(lesion.center_mm),
            list(lesion.radii_mm),
            [list(r) for r in lesion.axes],
            round(lesion.volume_ml, 4),
            lesion.location,
        )

    def to_lesion(self) -> Lesion:
        return Lesion(
            tuple(self.center_mm),
            tuple(self.radii_mm),  # type: ignore[arg-type]
            tuple(tuple(r) for r in self.axes),
            self.location,
        )


@dataclass
class SeriesTruth:
    series_uid: str
    study_uid: str
    study_key: str
    series_key: str
    region: str
    contrast: str
    orientation: str
    flip: list[str]
    oblique_deg: list[float]
    oblique_base: str
    description: str
    shape: list[int]
    spacing: list[float]
    slice_thickness: float
    affine: list[list[float]]
    transfer_syntax: str
    rescale: list[float]
    pixel_dtype: str
    dicom_dir: str
    n_files: int
    label_map: str
    lesion_voxels: dict[str, int] = field(default_factory=dict)

    @property
    def affine_array(self) -> np.ndarray:
        return np.asarray(self.affine, dtype=np.float64)


@dataclass
class StudyTruth:
    study_uid: str
    study_key: str
    patient_id: str
    patient_name: str
    patient_age: int
    patient_sex: str
    study_date: str
    region: str
    side: str
    lesions: list[LesionTruth]
    lesion_volume_ml: float
    report_path: str
    report: str
    series_uids: list[str]


@dataclass
class ArchiveManifest:
    """Everything the generator knows about a demo archive, keyed by UIDs and relative paths."""

    root: Path
    seed: int
    studies: list[StudyTruth]
    series: list[SeriesTruth]
    label_names: dict[int, str] = field(default_factory=lambda: dict(LABEL_NAMES))
    format: str = MANIFEST_FORMAT

    @property
    def dicom_root(self) -> Path:
        """The folder holding only the DICOM studies: what to scan or run on."""
        return self.root / DICOM_DIR

    @property
    def path(self) -> Path:
        return self.root / GROUND_TRUTH_DIR / "manifest.json"

    def series_by_uid(self, uid: str) -> SeriesTruth:
        for s in self.series:
            if s.series_uid == uid:
                return s
        raise KeyError(uid)

    def study_by_uid(self, uid: str) -> StudyTruth:
        for s in self.studies:
            if s.study_uid == uid:
                return s
        raise KeyError(uid)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "seed": self.seed,
            "label_names": {str(k): v for k, v in self.label_names.items()},
            "studies": [asdict(s) for s in self.studies],
            "series": [asdict(s) for s in self.series],
        }

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        return self.path

    @classmethod
    def load(cls, path: Path | str) -> ArchiveManifest:
        """Read a manifest given the archive root, its ground_truth folder or manifest.json."""
        path = Path(path)
        if path.is_dir():
            path = (
                path / "manifest.json" if path.name == GROUND_TRUTH_DIR else path / GROUND_TRUTH_DIR / "manifest.json"
            )
        # an archive that was not generated here has no manifest: a usage error, not a traceback
        if not path.is_file():
            raise UsageError(f"{path}: no {MANIFEST_FORMAT} manifest (not a generated archive)")
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            raise UsageError(f"{path}: not a {MANIFEST_FORMAT} manifest ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise UsageError(f"{path}: not a {MANIFEST_FORMAT} manifest (format={found!r})")
        studies = [StudyTruth(**{**s, "lesions": [LesionTruth(**les) for les in s["lesions"]]}) for s in raw["studies"]]
        return cls(
            root=path.parent.parent,
            seed=int(raw["seed"]),
            studies=studies,
            series=[SeriesTruth(**s) for s in raw["series"]],
            label_names={int(k): v for k, v in raw["label_names"].items()},
            format=raw["format"],
        )
