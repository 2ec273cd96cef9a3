"""Errors a user can cause are typed where they start, keep their exit codes through the CLI, and
every exception class has one home."""

from __future__ import annotations

import ast
import builtins
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from engine import errors
from engine.cli import cli
from engine.errors import StoreError, UsageError, one_line
from engine.model import DEFAULT_MODEL_DIR, read_card

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_EXCEPTIONS = {
    name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)
}


def _exception_classes_outside_errors() -> list[str]:
    """'path:line Name' for each public exception class defined outside engine/errors.py."""
    known = BUILTIN_EXCEPTIONS | {c for c in dir(errors) if isinstance(getattr(errors, c), type)}
    found = []
    for folder in ("engine", "plugins", "contrib_heads"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "engine" / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ClassDef):
                    continue
                bases = {
                    b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                    for b in node.bases
                }
                if bases & known and not (node.name.startswith("_") and ast.get_docstring(node)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return found


def test_every_exception_class_lives_in_errors_or_is_private_and_documented():
    assert _exception_classes_outside_errors() == []


def test_the_old_homes_of_moved_errors_still_name_the_same_class():
    from engine.dicom.stack import StackError
    from engine.discover import LoadError
    from engine.export import SkipSeries
    from engine.heads import HeadOutputError
    from engine.views import ViewError

    assert (LoadError, ViewError, StackError, HeadOutputError, SkipSeries) == (
        errors.LoadError,
        errors.ViewError,
        errors.StackError,
        errors.HeadOutputError,
        errors.SkipSeries,
    )


@pytest.mark.parametrize(
    ("exc", "kwargs", "expected"),
    [
        (ValueError("first line\nsecond line"), {}, "first line"),
        (ValueError("  padded  \n"), {"named": True}, "ValueError: padded"),
        (KeyError(), {"named": True}, "KeyError"),
        (RuntimeError(""), {}, "RuntimeError"),
        (OSError("a\n  b   c"), {"fold": True}, "a b c"),
        (ValueError("x" * 400), {}, "x" * 300),
        (ValueError("abcdef"), {"limit": 3, "named": True}, "ValueError: abc"),
        (ValueError("raw"), {"message": "cleaned\ntext", "fold": True}, "cleaned text"),
    ],
)
def test_one_line_gives_one_short_line(exc, kwargs, expected):
    assert one_line(exc, **kwargs) == expected


# ---- a bad model card is a usage error where it is read -----------------------------------------
def _copy_model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return folder


def test_a_card_that_is_not_json_is_a_usage_error_naming_the_file(tmp_path):
    folder = _copy_model(tmp_path)
    (folder / "model.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"model card .*model\.json is not valid JSON"):
        read_card(folder)


def test_a_card_breaking_its_schema_is_a_usage_error(tmp_path):
    folder = _copy_model(tmp_path)
    card = json.loads((folder / "model.json").read_text())
    card["encoder"]["patch_size"] = "eight"
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(UsageError, match="encoder/patch_size"):
        read_card(folder)


# ---- search keeps usage (2) and store (3) exit codes ----------------------------------------------
def _store_without_embeddings(path: Path) -> Path:
    root = zarr.create_group(
        str(path), zarr_format=3, attributes={"model": {"path": None, "fingerprint": "sha256:" + "ab" * 32}}
    )
    index = root.create_group("index")
    index.create_array("series_key", shape=(1,), dtype=str, chunks=(1,))[...] = np.asarray(["a"], dtype=str)
    return path


def _assert_clean(result, code: int, needle: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and needle in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_search_a_usage_error_exits_2(tmp_path):
    store = _store_without_embeddings(tmp_path / "s.zarr")
    _assert_clean(CliRunner().invoke(cli, ["search", str(store), "--like", "a"]), 2, "retrieve")


def test_search_a_missing_store_exits_3(tmp_path):
    _assert_clean(CliRunner().invoke(cli, ["search", str(tmp_path / "missing.zarr"), "--like", "a"]), 3, "missing.zarr")


def test_search_errors_are_typed_for_python_callers(tmp_path):
    from engine.search import search

    with pytest.raises(StoreError):
        search(tmp_path / "missing.zarr", like="a")
    with pytest.raises(UsageError, match="exactly one"):
        search(tmp_path / "missing.zarr")
