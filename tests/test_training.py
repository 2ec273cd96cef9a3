"""The default model's recipe (pretraining, then heads fit by engine.fitting) and what the
shipped, trained weights achieve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.default_model import build
from engine.default_model.dataset import lesion_phrase, prepare_samples, write_training_archives
from engine.default_model.evaluate import evaluate_archive
from engine.default_model.pretrain import HEAD_NAMES, Batches, TrainConfig, batch_losses, initial_nets, train
from engine.default_model.train import fit_heads, write_into, write_weights_into
from engine.model import DEFAULT_MODEL_DIR, load_model
from engine.synthetic import write_demo_archive

HEADS_DIR = Path(__file__).resolve().parents[1] / "contrib_heads"
TINY_PREPROCESSING = {**build.PREPROCESSING, "spacing": [6.0, 6.0, 6.0], "input_size": [32, 32, 32]}


def tiny_model_folder(folder: Path) -> Path:
    """A small model (32-d encoder, one-layer text tower) sharing the shipped vocabulary."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    card = build.make_card(seed=0)
    card["encoder"].update(embed_dim=32, num_heads=2)
    card["preprocessing"] = TINY_PREPROCESSING
    text_dir = folder / "text"
    text_dir.mkdir(parents=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEFAULT_MODEL_DIR / "text" / name, text_dir / name)
    vocab_size = len((text_dir / "vocab.txt").read_text().splitlines())
    config = {
        **build.BERT_CONFIG,
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
    }
    (text_dir / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**config), add_pooling_layer=False)
    save_file({k: v.contiguous() for k, v in bert.state_dict().items()}, str(text_dir / "model.safetensors"))
    save_file(
        {"weight": torch.randn(64, 32) * 0.02, "bias": torch.zeros(64)}, str(folder / "text_projection.safetensors")
    )
    build.build_encoder(folder, card, seed=0)
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_training_step_reduces_the_loss_on_a_tiny_archive(tmp_path):
    torch.manual_seed(0)
    nets, tokenizer, card = initial_nets(tiny_model_folder(tmp_path / "model"))
    manifests = write_training_archives(tmp_path / "data", studies=2, first_seed=3)
    samples = prepare_samples(manifests, card["preprocessing"], 8, seed=0)
    assert {s.kind for s in samples} == {"global", "tile"}
    glob = [s for s in samples if s.kind == "global"]
    assert all(s.labels.shape == (32, 32, 32) and s.token_lesion.shape == (64,) for s in glob)
    assert all(len(s.phrases) == len(s.phrase_tokens) for s in glob)
    config = TrainConfig(steps=12, batch=3, tiles_per_batch=1, crop_tokens=2, lr=2e-3, warmup=2)
    fixed = Batches(samples, 2, 1, seed=5).next()

    def loss_on_fixed_batch() -> float:
        torch.manual_seed(1)
        with torch.no_grad():
            losses = batch_losses(
                nets, tokenizer, fixed, config, np.random.default_rng(1), torch.Generator().manual_seed(1)
            )
        assert {"seg", "region", "contrast", "volume", "localize", "clip"} <= set(losses)
        return float(sum(losses.values()))

    before = loss_on_fixed_batch()
    history = train(nets, tokenizer, samples, config, log=None)
    assert len(history) == config.steps and np.isfinite(history).all()
    assert loss_on_fixed_batch() < 0.9 * before


def test_image_only_ablation_trains_without_report_supervision(tmp_path):
    """The ablation arm drops exactly the report-supervised objectives: the text tower and its
    projection never move, while the image objectives still train the encoder."""
    nets, tokenizer, card = initial_nets(tiny_model_folder(tmp_path / "model"))
    samples = prepare_samples(
        write_training_archives(tmp_path / "data", studies=2, first_seed=3), card["preprocessing"], 8, seed=0
    )
    config = TrainConfig(
        steps=3, batch=3, tiles_per_batch=1, crop_tokens=2, lr=2e-3, warmup=1, report_supervision=False
    )
    batch = Batches(samples, 2, 1, seed=5).next()
    losses = batch_losses(nets, tokenizer, batch, config, np.random.default_rng(1), torch.Generator().manual_seed(1))
    assert {"seg", "region", "contrast", "volume", "localize"} <= set(losses)
    assert not set(losses) & {"clip", "ground", "ground_score"}
    text_before = {
        k: v.clone() for k, v in [*nets.bert.state_dict().items(), *nets.text_projection.state_dict().items()]
    }
    encoder_before = {k: v.clone() for k, v in nets.encoder.state_dict().items()}
    train(nets, tokenizer, samples, config, log=None)
    text_after = dict([*nets.bert.state_dict().items(), *nets.text_projection.state_dict().items()])
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)
    assert any(not torch.equal(encoder_before[k], v) for k, v in nets.encoder.state_dict().items())


def test_recipe_fits_heads_through_engine_fitting_and_writes_whole_modules(tmp_path):
    """Heads of the recipe are engine.fitting packages; --write-into writes whole module files."""
    from safetensors.torch import load_file

    from engine import schemas
    from engine.fitting.heads import TEMPLATES, template_path

    model_dir = tiny_model_folder(tmp_path / "model")
    write_demo_archive(tmp_path / "arch", studies=2, seed=4, formats=("explicit",))
    results = fit_heads(
        model_dir,
        [tmp_path / "arch"],
        tmp_path / "heads",
        names=("classify", "ground"),
        cache_dir=tmp_path / "cache",
        steps=20,
        floor=False,
        log=None,
    )
    fingerprint = load_model(model_dir).fingerprint
    (dest := tmp_path / "contrib").mkdir()
    (dest / "classify").mkdir()
    (dest / "classify" / "manifest.json").write_text('{"stale": true}')
    write_into(dest, results)
    for name, result in results.items():
        assert (tmp_path / "heads" / name / "pyproject.toml").is_file()
        manifest = json.loads((dest / name / "manifest.json").read_text())
        schemas.validate("head", manifest, name)
        assert manifest["encoder"]["fingerprint"] == fingerprint and manifest["fit"]["kind"] == name
        assert (dest / name / "__init__.py").read_text() == template_path(name).read_text()
        state = load_file(str(dest / name / "weights.safetensors"))
        assert all(torch.equal(state[k], v) for k, v in result.fitted.state.items())
    assert set(TEMPLATES) == set(HEAD_NAMES)


def test_refit_replaces_weights_keeps_the_module_and_reorders_class_rows(tmp_path):
    """--write-weights-into: the fitted weights in the module's layout (labels in its order), the
    fit recorded in its manifest, the module file untouched; a net of another shape writes nothing."""
    from safetensors.torch import load_file, save_file

    from engine import schemas

    model_dir = tiny_model_folder(tmp_path / "model")
    write_demo_archive(tmp_path / "arch", studies=4, seed=4, formats=("explicit",))  # every region and contrast
    results = fit_heads(
        model_dir,
        [tmp_path / "arch"],
        tmp_path / "heads",
        names=("classify",),
        cache_dir=tmp_path / "cache",
        steps=5,
        floor=False,
        log=None,
    )
    fitted = results["classify"]
    dest = tmp_path / "contrib" / "classify"
    shutil.copytree(HEADS_DIR / "classify", dest)
    save_file({k: torch.zeros_like(v) for k, v in fitted.fitted.state.items()}, str(dest / "weights.safetensors"))
    module = (dest / "__init__.py").read_text()
    write_weights_into(tmp_path / "contrib", results)
    manifest = json.loads((dest / "manifest.json").read_text())
    schemas.validate("head", manifest, "classify")
    assert manifest["encoder"]["fingerprint"] == load_model(model_dir).fingerprint
    assert manifest["fit"]["kind"] == "classify" and (dest / "__init__.py").read_text() == module
    state = load_file(str(dest / "weights.safetensors"))
    fitted_labels = {o["name"]: o["labels"] for o in fitted.manifest["outputs"]}
    for out in manifest["outputs"]:
        for row, label in enumerate(out["labels"]):
            source = fitted.fitted.state[f"{out['name']}.weight"][fitted_labels[out["name"]].index(label)]
            assert torch.equal(state[f"{out['name']}.weight"][row], source)
    save_file({"other": torch.zeros(3)}, str(dest / "weights.safetensors"))
    before = (dest / "manifest.json").read_text()
    with pytest.raises(ValueError, match="does not match"):
        write_weights_into(tmp_path / "contrib", results)
    assert (dest / "manifest.json").read_text() == before


def test_recipe_imports_no_contrib_head():
    """The recipe builds its auxiliary heads from engine.fitting's templates: no contrib package
    is imported (and so none is edited)."""
    import subprocess
    import sys

    code = (
        "import sys, engine.default_model.train as t, engine.default_model.pretrain as p; p.aux_heads(32, 16, 0); "
        "print([m for m in sys.modules if m.startswith('contrib_heads')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_write_training_archives_never_uses_the_demo_seed(tmp_path):
    with pytest.raises(ValueError, match="seed 0"):
        write_training_archives(tmp_path, studies=1, first_seed=0)


def test_shipped_model_is_trained_and_every_head_is_keyed_to_it():
    model = load_model()
    training = model.card["training"]
    assert training["status"] == "trained"
    assert training["recipe"].startswith("python -m engine.default_model.train")
    assert 0 not in training["data"]["archive_seeds"]
    for name in (*HEAD_NAMES, "retrieve"):
        fingerprint = json.loads((HEADS_DIR / name / "manifest.json").read_text())["encoder"]["fingerprint"]
        assert fingerprint == (model.fingerprint if name != "retrieve" else "any"), name


def test_lesion_phrase_names_size_and_location():
    from engine.synthetic import LesionTruth

    lesion = LesionTruth(
        0, [0.0, 0.0, 0.0], [6.2, 4.0, 3.0], [[1, 0, 0], [0, 1, 0], [0, 0, 1]], 0.3, "left frontal lobe"
    )
    assert lesion_phrase(lesion) == "12 mm lesion in the left frontal lobe"


def test_trained_heads_classify_and_segment_an_unseen_archive(tmp_path):
    manifest = write_demo_archive(tmp_path / "archive", studies=2, seed=7, formats=("explicit",))
    metrics = evaluate_archive(manifest, tmp_path, heads=["classify", "segment"], retrieval=False)
    assert metrics["region_accuracy"] >= 0.75
    assert metrics["dice"]["body"] >= 0.6
