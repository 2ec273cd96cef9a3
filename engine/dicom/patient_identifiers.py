"""Which strings identify the patient in a DICOM header (names written several ways and their
parts, IDs, the birth date in its common forms), and their removal from the free text mrfm stores
(series descriptions and other header text): :data:`PHI_RULE` says the rule in one sentence."""

from __future__ import annotations

import functools
import re
from typing import Any

from pydicom.dataset import Dataset

REMOVED = "[removed]"
_DATE_FORMS = (
    "{y}{m}{d}",
    "{y}-{m}-{d}",
    "{y}/{m}/{d}",
    "{y}.{m}.{d}",
    "{d}.{m}.{y}",
    "{d}/{m}/{y}",
    "{m}/{d}/{y}",
    "{d}-{m}-{y}",
    "{m}-{d}-{y}",
)
SHORT_IDENTIFIER = 4  # shorter identifiers are removed only as whole words ("Li" is in "oblique")
SHORT_NAME_PART = (
    3  # a name part this short is an everyday word too ("Sag", "Ax", "Lee"): removed only beside the full name
)
# how an identifier is matched: "any" anywhere (whole words when short), "name" a full-name form
# (anywhere), "word" a name part (whole words only), "with-name" a short name part (whole words,
# and only in a text where a full-name form appears too)
PHI_RULE = (
    "patient names, IDs and birth dates are replaced by [removed] in descriptions; a part of the name "
    f"only as a whole word, and one of {SHORT_NAME_PART} letters or fewer only where the full name appears too"
)


def patient_identifiers(ds: Dataset) -> list[tuple[str, str]]:
    """(text, rule) of each string that identifies the patient: the name as a whole, written
    several ways ("name"), its components of two or more characters ("word", or "with-name" when
    SHORT_NAME_PART or shorter); PatientID and OtherPatientIDs and the birth date in DICOM form
    and the common formatted forms ("any"). Longest first, so a whole name goes before its parts."""
    found: dict[str, str] = {}
    ids = [ds.get("PatientID"), *(_values(ds.get("OtherPatientIDs")))]
    ids += [item.get("PatientID") for item in ds.get("OtherPatientIDsSequence", []) or []]
    found.update({str(v).strip(): "any" for v in ids if v is not None and str(v).strip()})
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    if re.fullmatch(r"\d{8}", birth):
        y, m, d = birth[:4], birth[4:6], birth[6:]
        found.update({form.format(y=y, m=m, d=d): "any" for form in _DATE_FORMS})
    name = ds.get("PatientName")
    if name:
        text = str(name)
        parts = [p.strip() for p in re.split(r"[\^=]", text) if p.strip()]
        words = [*parts, *(w for p in parts for w in p.split())]
        for w in words:
            if len(w) >= 2 and w not in found:
                found[w] = "with-name" if len(w) <= SHORT_NAME_PART else "word"
        for form in {text, " ".join(parts), ", ".join(parts[:2]), " ".join(reversed(parts[:2]))}:
            if form.strip() and found.get(form) != "any":
                found[form] = "name"
    return sorted(((f, r) for f, r in found.items() if len(f) >= 2), key=lambda fr: (-len(fr[0]), fr[0]))


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


@functools.lru_cache(maxsize=4096)
def scrub_cached(text: str, identifiers: tuple[tuple[str, str], ...]) -> str:
    """:func:`scrub` once per distinct text and patient (a series repeats its strings per file)."""
    return scrub(text, identifiers) if text and identifiers else text


def _word(pattern: str) -> str:
    return rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])"


def scrub(text: str, identifiers: Any) -> str:
    """``text`` with every identifier replaced by "[removed]" (case-insensitive). Identifiers are
    (text, rule) pairs as :func:`patient_identifiers` gives them (a plain string matches as
    "any"); see PHI_RULE."""
    items = [(i, "any") if isinstance(i, str) else (str(i[0]), str(i[1])) for i in identifiers]
    patterns = [(_pattern(ident, rule), rule) for ident, rule in items]
    has_name = any(rule == "name" and re.search(p, text, flags=re.IGNORECASE) for p, rule in patterns)
    for pattern, rule in patterns:
        if rule != "with-name" or has_name:
            text = re.sub(pattern, REMOVED, text, flags=re.IGNORECASE)
    return text


def _pattern(ident: str, rule: str) -> str:
    pattern = re.escape(ident)
    return _word(pattern) if rule in ("word", "with-name") or len(ident) < SHORT_IDENTIFIER else pattern
