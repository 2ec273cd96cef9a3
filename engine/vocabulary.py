"""The label vocabularies, each defined once: body regions, contrasts, segmentation labels,
tissue classes and the location words lesions are named by.

The synthetic generators, the heads, fitting and evaluation all read these tuples, so a label
added here reaches every one of them; their order is the order of score rows and mask values.
"""

from __future__ import annotations

# ---- what the classify head answers --------------------------------------------------------
REGIONS: tuple[str, ...] = ("brain", "knee", "spine", "abdomen")
CONTRASTS: tuple[str, ...] = ("T1", "T2", "FLAIR", "PD")

# ---- the segment head's anatomy mask: value -> name -----------------------------------------
LABEL_NAMES: dict[int, str] = {0: "background", 1: "body", 2: "organ", 3: "fluid", 4: "lesion"}
LESION_LABEL = 4

# ---- tissue classes of the anatomy-based generator: value -> name --------------------------
# Finer than LABEL_NAMES; TISSUE_TO_LABEL folds them into the segment head's labels.
TISSUE_CLASSES: dict[int, str] = {
    0: "background",
    1: "scalp/body",
    2: "grey matter",
    3: "white matter",
    4: "CSF",
    5: "lesion",
}
TISSUE_TO_LABEL: dict[int, int] = {0: 0, 1: 1, 2: 2, 3: 2, 4: 3, 5: LESION_LABEL}

# ---- where a lesion is: the words reports and grounding queries use --------------------------
SIDES: tuple[str, ...] = ("left", "right", "midline")
BRAIN_LOBES: tuple[str, ...] = ("frontal", "parietal", "temporal", "occipital", "insular", "limbic", "central")
BRAIN_DEEP: tuple[str, ...] = ("basal ganglia", "thalamus", "cerebellar hemisphere", "cerebellar vermis")
