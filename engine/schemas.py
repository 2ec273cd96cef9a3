"""Locate and apply the JSON Schemas in ``schemas/``."""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from .errors import UsageError


def schema_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "schemas"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "mrfm" / "schemas"


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """Load ``schemas/<name>.schema.json``."""
    return json.loads((schema_dir() / f"{name}.schema.json").read_text())


def errors(name: str, instance: Any) -> list[str]:
    """Every violation of schema ``name`` as 'path: message' strings (empty when valid)."""
    validator = jsonschema.Draft202012Validator(load_schema(name))
    out = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"{path}: {err.message}")
    return out


def validate(name: str, instance: Any, what: str) -> None:
    """Raise UsageError naming ``what`` and every violation if ``instance`` (a model card, head
    manifest or job file someone wrote) breaks the schema."""
    errs = errors(name, instance)
    if errs:
        raise UsageError(f"{what} does not match schemas/{name}.schema.json:\n  " + "\n  ".join(errs))
