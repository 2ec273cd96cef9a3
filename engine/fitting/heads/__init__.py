"""Head module templates for fitted heads.

Each file here is a complete, self-contained head module (it imports only ``engine``, torch and
numpy): :mod:`engine.fitting.package` copies it as the ``__init__.py`` of the package it writes,
and the fitting code imports the same file to build and train the net, so what is trained is
exactly what runs. A module reads its net's configuration from its manifest
(``fit.config``); the nets themselves live once in :mod:`engine.head_nets`, shared with the
contrib heads, so weights fitted here load into the contrib heads too.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent
# head kind -> template module (file name without .py)
TEMPLATES = {"classify": "probe", "regress": "probe", "segment": "segment", "localize": "localize", "ground": "ground"}


def template_path(kind: str) -> Path:
    return TEMPLATE_DIR / f"{TEMPLATES[kind]}.py"
