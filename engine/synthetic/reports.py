"""Free-text radiology reports generated from a study's ground truth.

The wording varies with the seed but always states the region, every lesion with its location and
size in mm, or "no acute abnormality" when there is none: the text tower learns from exactly
these facts, and tests check them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .phantom import Lesion

_TITLES = {"brain": "BRAIN", "knee": "KNEE", "spine": "LUMBAR SPINE", "abdomen": "ABDOMEN"}
_HISTORY = {
    "brain": (
        "Headache.",
        "Dizziness, rule out mass.",
        "Follow-up of known white matter disease.",
        "New onset seizure.",
    ),
    "knee": ("Knee pain after a fall.", "Chronic knee pain.", "Swelling, rule out internal derangement."),
    "spine": ("Low back pain.", "Radiculopathy.", "Back pain, history of malignancy."),
    "abdomen": ("Abdominal pain.", "Abnormal liver function tests.", "Staging."),
}
_NORMAL = {
    "brain": (
        "The ventricles are normal in size and configuration.",
        "No midline shift or mass effect.",
        "No extra-axial collection.",
    ),
    "knee": (
        "The cruciate and collateral ligaments are intact.",
        "No meniscal tear.",
        "Small physiological amount of joint fluid.",
    ),
    "spine": (
        "Normal lumbar lordosis.",
        "The conus terminates at a normal level.",
        "No significant canal stenosis.",
    ),
    "abdomen": (
        "The gallbladder is unremarkable.",
        "No biliary dilatation.",
        "No free fluid.",
        "The kidneys are normal in size.",
    ),
}
_LESION_NOUN = {
    "brain": ("T2/FLAIR hyperintense lesion", "focal lesion", "T2 hyperintense focus"),
    "knee": ("bone marrow lesion", "focal marrow signal abnormality"),
    "spine": ("focal marrow lesion", "T2 hyperintense vertebral lesion"),
    "abdomen": ("focal lesion", "T2 hyperintense lesion", "well-circumscribed lesion"),
}
_COUNT_WORDS = {1: "One", 2: "Two", 3: "Three"}


def size_text(lesion: Lesion) -> str:
    """Diameters rounded to whole mm, largest first, e.g. '18 x 14 x 12 mm'."""
    return " x ".join(f"{d:.0f}" for d in lesion.diameters_mm) + " mm"


def write_report(
    region: str,
    lesions: Sequence[Lesion],
    series_names: Sequence[str],
    rng: np.random.Generator,
    side: str = "",
) -> str:
    """A report with EXAMINATION, HISTORY, TECHNIQUE, FINDINGS and IMPRESSION sections."""
    title = _TITLES[region] if not side else f"{side.upper()} {_TITLES[region]}"
    normal = list(_NORMAL[region])
    rng.shuffle(normal)
    lines = [
        f"EXAMINATION: MRI {title}.",
        f"CLINICAL HISTORY: {_pick(rng, _HISTORY[region])}",
        f"TECHNIQUE: Multiplanar multisequence MRI of the {title.lower()}: {', '.join(series_names)}.",
        "",
        "FINDINGS:",
    ]
    for lesion in lesions:
        noun = _pick(rng, _LESION_NOUN[region])
        lines.append(
            f"There is a {size_text(lesion)} {noun} in the {lesion.location} "
            f"(volume approximately {lesion.volume_ml:.1f} mL)."
        )
    if not lesions:
        lines.append("No focal lesion is identified.")
    lines.extend(normal[:2])
    lines += ["", "IMPRESSION:"]
    lines.append(_impression(lesions))
    return "\n".join(lines) + "\n"


def _impression(lesions: Sequence[Lesion]) -> str:
    if not lesions:
        return "No acute abnormality."
    largest = max(lesions, key=lambda les: les.diameters_mm[0])
    if len(lesions) == 1:
        return f"Solitary {largest.diameters_mm[0]:.0f} mm lesion in the {largest.location}."
    where = ", ".join(les.location for les in lesions)
    return (
        f"{_COUNT_WORDS.get(len(lesions), len(lesions))} lesions ({where}), the largest "
        f"{largest.diameters_mm[0]:.0f} mm in the {largest.location}."
    )


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]
