"""``mrfm new-head``: write a ready head package from the files in ``head/``.

Template files use ``{{name}}`` (head name), ``{{package}}`` (import name), ``{{dist}}``
(distribution name) and ``{{cls}}`` (head class); the folder ``package`` becomes the import name.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UsageError

TEMPLATE_DIR = Path(__file__).resolve().parent / "head"
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")  # schemas/head.schema.json: name


def names_for(name: str) -> dict[str, str]:
    """The names a head package uses, derived from the head name."""
    if not NAME.match(name):
        raise UsageError(f"head name {name!r} must be lower case letters, digits, '-' or '_', starting with a letter")
    ident = name.replace("-", "_")
    return {"name": name, "package": f"mrfm_head_{ident}", "dist": f"mrfm-head-{name}",
            "cls": "".join(part.capitalize() for part in re.split(r"[-_]", name)) + "Head"}


def render(text: str, names: dict[str, str]) -> str:
    for key, value in names.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def new_head_package(name: str, directory: str | Path = ".") -> Path:
    """Write the package for head ``name`` into ``directory/name`` and return that folder.

    Refuses (UsageError) an invalid name or a folder that exists and is not empty.
    """
    names = names_for(name)
    folder = Path(directory).expanduser() / name
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"{folder} exists and is not empty")
    for src in sorted(TEMPLATE_DIR.rglob("*.tmpl")):
        rel = src.relative_to(TEMPLATE_DIR).with_suffix("")  # drop .tmpl
        parts = [names["package"] if p == "package" else p for p in rel.parts]
        dest = folder.joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(render(src.read_text(), names))
    return folder
