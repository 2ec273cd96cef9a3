"""The dependency rules of DESIGN.md are import-linter contracts (pyproject.toml): the tree keeps
them, and one deliberately broken import fails the contract it breaks, and only that one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("engine", "plugins", "contrib_heads")

pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e '.[dev]')"
)


@pytest.fixture
def tree(tmp_path) -> Path:
    """The packages' Python sources and pyproject.toml, copied where an import can be broken."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=_not_python)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _not_python(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if not n.endswith(".py") and not (Path(folder) / n).is_dir() or n == "__pycache__"]


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def contract_lines(output: str) -> dict[str, str]:
    """Contract name -> KEPT or BROKEN, from lint-imports' summary."""
    out = {}
    for line in output.splitlines():
        for verdict in ("KEPT", "BROKEN"):
            if line.rstrip().endswith(verdict) or f" {verdict} (" in line:
                out[line.split(f" {verdict}")[0].strip()] = verdict
    return out


def test_the_tree_keeps_every_contract(tree):
    result = lint(tree)
    verdicts = contract_lines(result.stdout)
    assert result.returncode == 0 and verdicts and set(verdicts.values()) == {"KEPT"}, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "contrib_heads/classify/_reach.py",
            "from engine.store import ResultStore\n",
            "Heads and built-in plugins import only engine's public API (engine/__init__)",
        ),
        ("engine/store_reach.py", "import torch\n", "The store imports no torch and no head"),
        (
            "engine/geometry_reach.py",
            "from engine.model import load_model\n",
            "Loading and geometry import no model, backend, head or store",
        ),
        (
            "engine/executors/reach.py",
            "from engine.synthetic import write_demo_archive\n",
            "The run path imports no fitting, training or corpus code",
        ),
    ],
)
def test_a_deliberately_broken_import_fails_its_contract(tree, module, line, contract):
    path = tree / module
    path.write_text('"""A module that breaks a dependency rule on purpose."""\n' + line)
    # hook the new module into the layer it claims to be part of
    if module.startswith("engine/store_"):
        (tree / "engine" / "store.py").write_text(
            (tree / "engine" / "store.py").read_text() + "\nfrom . import store_reach  # noqa\n"
        )
    if module.startswith("engine/geometry_"):
        (tree / "engine" / "geometry.py").write_text(
            (tree / "engine" / "geometry.py").read_text() + "\nfrom . import geometry_reach  # noqa\n"
        )
    result = lint(tree)
    verdicts = contract_lines(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert {name for name, v in verdicts.items() if v == "BROKEN"} == {contract}, result.stdout
