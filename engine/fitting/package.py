"""Write a fitted head as a pip-installable package: ``pyproject.toml`` with the ``mrfm`` entry
point, the head module (a template from :mod:`engine.fitting.heads`), its manifest (bound to the
encoder fingerprint it was fit on, with the fit's metrics and floors) and safetensors weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from engine import schemas
from engine.templates import names_for

from .heads import template_path
from .trainers import Fitted

PYPROJECT = """[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
description = "The {name} head for mrfm, fit on a frozen encoder"
requires-python = ">=3.10"
dependencies = ["mrfm"]

# mrfm finds the head through this entry point once the package is installed
[project.entry-points.mrfm]
{name} = "{package}"

[tool.setuptools]
packages = ["{package}"]

[tool.setuptools.package-data]
{package} = ["manifest.json", "*.safetensors"]
"""

README = """# {dist}

The `{name}` head for mrfm ({kind}), fit by `mrfm fit` on the frozen encoder
`{fingerprint}`. mrfm runs it only with that encoder.

```bash
pip install ./{folder}
mrfm heads show {name}
mrfm run ARCHIVE --out results.zarr --heads {name}
```

Validation metrics (held-out studies) and the random-encoder floor are in
`{package}/manifest.json` under `fit`.
"""


def manifest_for(
    name: str,
    kind: str,
    fitted: Fitted,
    model: Any,
    fit_record: dict[str, Any],
    version: str = "0.1.0",
    description: str | None = None,
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description or f"{kind} head fit by mrfm fit on frozen {model.name} features.",
        "encoder": {"fingerprint": model.fingerprint, "embed_dim": model.embed_dim},
        "inputs": fitted.inputs,
        "outputs": fitted.outputs,
        "weights": "weights.safetensors",
        "fit": {"kind": kind, "config": fitted.config, **fit_record},
    }
    if fitted.parameters:
        manifest["parameters"] = fitted.parameters
    schemas.validate("head", manifest, f"fitted head {name!r}")
    return manifest


def write_module(folder: str | Path, kind: str, manifest: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Write a head module's three files whole into ``folder`` (the head template, its manifest
    and weights), replacing those files and leaving anything else there alone."""
    from safetensors.torch import save_file  # heavy: loaded only by the code path that reads or writes that format

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_path(kind), folder / "__init__.py")
    with open(folder / "manifest.json", "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    save_file(state, str(folder / manifest["weights"]), metadata={"fit_kind": kind})
    return folder


def write_package(
    out: str | Path, name: str, kind: str, manifest: dict[str, Any], state: dict[str, torch.Tensor]
) -> Path:
    """Write the package folder ``out``; returns the module folder. An existing package is replaced."""
    names = names_for(name)
    out = Path(out)
    module = out / names["package"]
    if module.exists():
        shutil.rmtree(module)
    write_module(module, kind, manifest, state)
    (out / "pyproject.toml").write_text(PYPROJECT.format(version=manifest["version"], **names))
    (out / "README.md").write_text(
        README.format(kind=kind, fingerprint=manifest["encoder"]["fingerprint"], folder=out.name, **names)
    )
    return module
