"""User-caused errors raised as engine.errors types where they start: a bad shape range, a model
folder's unreadable weights, a model card's distribution statistics, an archive that is not a
generated one, labels a probe cannot learn from, a head folder whose nets differ from a fit. Each
names what is wrong; each is a UsageError, so still a ValueError for callers that caught the old type."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

from engine.backends import ShapeRange
from engine.cli import cli
from engine.default_model.train import contrib_weights
from engine.distribution import POOLING, distribution_for, load_distribution
from engine.errors import EXIT_USAGE, UsageError
from engine.fitting.labels import LabelSet, SeriesLabels
from engine.fitting.trainers import Options, fit_probe
from engine.model import DEFAULT_MODEL_DIR, load_model
from engine.synthetic import ArchiveManifest
from engine.synthetic.manifest import MANIFEST_FORMAT


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ShapeRange((16, 16, 16), (8, 16, 16), (16, 16, 16)), "0 < min <= opt <= max"),
        (lambda: ShapeRange((16, 16, 16), (16, 16, 16), (16, 16, 16), 0), "max_batch must be >= 1, got 0"),
        (lambda: ShapeRange.covering([]), "at least one shape"),
    ],
)
def test_a_bad_shape_range_is_a_usage_error(make, match):
    with pytest.raises(UsageError, match=match) as info:
        make()
    assert isinstance(info.value, ValueError)


def _card(pooling: str = POOLING) -> dict:
    return {
        "name": "tiny",
        "encoder": {"embed_dim": 4},
        "distribution": {"statistics": "d.safetensors", "pooling": pooling, "threshold": 3.0},
    }


def test_statistics_of_the_wrong_shape_are_a_usage_error_naming_the_file(tmp_path):
    save_file(
        {"mean": np.zeros(3, np.float32), "precision": np.eye(3, dtype=np.float32)}, str(tmp_path / "d.safetensors")
    )
    with pytest.raises(UsageError) as info:
        load_distribution(_card(), tmp_path)
    assert str(info.value) == (
        f"distribution statistics {tmp_path / 'd.safetensors'} must hold 'mean' (8,) and 'precision' (8, 8)"
    )
    # the run sees the same one line as before, under the model's name
    model = SimpleNamespace(name="tiny", card=_card(), folder=tmp_path)
    with pytest.raises(UsageError) as run_info:
        distribution_for(model)
    assert str(run_info.value) == f"model 'tiny': {info.value}"


def test_an_unknown_pooling_is_a_usage_error(tmp_path):
    save_file(
        {"mean": np.zeros(8, np.float32), "precision": np.eye(8, dtype=np.float32)}, str(tmp_path / "d.safetensors")
    )
    with pytest.raises(UsageError, match="distribution pooling 'median' is not one of"):
        load_distribution(_card("median"), tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no .* manifest"),
        ("{not json", "not a .* manifest"),
        (json.dumps([1, 2]), r"format=None"),
        (json.dumps({"format": "other/1"}), r"format='other/1'"),
    ],
)
def test_a_folder_that_is_not_a_generated_archive_is_a_usage_error_naming_the_manifest(tmp_path, content, match):
    manifest = tmp_path / "ground_truth" / "manifest.json"
    if content is not None:
        manifest.parent.mkdir()
        manifest.write_text(content)
    with pytest.raises(UsageError, match=match) as info:
        ArchiveManifest.load(tmp_path)
    assert str(info.value).startswith(f"{manifest}: ") and MANIFEST_FORMAT in str(info.value)


def test_evaluate_on_a_folder_without_ground_truth_exits_2_in_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path), "--no-run"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Traceback" not in result.output and "manifest.json" in result.output


def _features(value: float) -> SimpleNamespace:
    return SimpleNamespace(cls=np.full(4, value, np.float32), tokens=np.full((2, 4), value, np.float32))


def test_labels_with_one_class_are_a_usage_error_naming_the_labels_file():
    labels = LabelSet("classify", [], ["region"], source="labels.csv")
    pairs = [(_features(i), SeriesLabels(series_uid=str(i), values={"region": "brain"})) for i in range(3)]
    with pytest.raises(UsageError, match=r"^labels\.csv: target 'region' has fewer than two classes"):
        fit_probe("classify", labels, pairs, [], Options())


def _fit(labels: list[str], state: dict[str, torch.Tensor]) -> SimpleNamespace:
    manifest = {"outputs": [{"name": "region", "kind": "scores", "labels": labels}]}
    return SimpleNamespace(fitted=SimpleNamespace(state=state), manifest=manifest)


def test_a_head_module_whose_net_differs_from_the_fit_is_a_usage_error():
    module = {"name": "region", "outputs": [{"name": "region", "kind": "scores", "labels": ["a", "b"]}]}
    shipped = {"region.weight": torch.zeros(2, 4), "region.bias": torch.zeros(2)}
    fitted = {"region.weight": torch.arange(8.0).reshape(2, 4), "region.bias": torch.tensor([1.0, 2.0])}
    # the same labels in another order: the rows follow the module's order
    state = contrib_weights(_fit(["b", "a"], fitted), module, shipped)
    assert torch.equal(state["region.bias"], torch.tensor([2.0, 1.0]))
    with pytest.raises(UsageError, match=r"^region/region: fitted labels \['a', 'c'\]"):
        contrib_weights(_fit(["a", "c"], fitted), module, shipped)
    with pytest.raises(UsageError, match=r"^region: the fitted net does not match the module's"):
        contrib_weights(_fit(["a", "b"], {**fitted, "hidden.weight": torch.zeros(1)}), module, shipped)


@pytest.mark.parametrize(
    "name, damage", [("encoder.safetensors", b"not tensors"), ("text_projection.safetensors", None)]
)
def test_an_unreadable_weights_file_is_a_usage_error_naming_it(tmp_path, name, damage):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    path = folder / name
    path.write_bytes(damage if damage is not None else path.read_bytes()[:1000])  # garbage, or cut short
    with pytest.raises(UsageError, match=f"{name} (is|are) not a readable safetensors file") as info:
        load_model(folder)
    assert str(path) in str(info.value)
    result = CliRunner().invoke(cli, ["compile", "--model", str(folder)])
    assert result.exit_code == EXIT_USAGE and "Traceback" not in result.output
    assert "not a readable safetensors file" in result.output
