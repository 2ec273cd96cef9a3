"""The model fingerprint is a function of what the model computes (configuration and tensors),
not of how its files are written, and the shipped heads record the embedded model's."""

from __future__ import annotations

import json

import pytest
import torch

from engine.model import DEFAULT_MODEL_DIR, compute_fingerprint, load_model, read_card


def _monai_vit():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    vit = nets.ViT(
        in_channels=1,
        img_size=(32, 32, 32),
        patch_size=(8, 8, 8),
        hidden_size=64,
        mlp_dim=128,
        num_layers=2,
        num_heads=4,
        classification=True,
        qkv_bias=True,
    ).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.2)
    return vit


def test_a_checkpoint_imported_from_pt_and_from_safetensors_gets_one_fingerprint(tmp_path):
    from safetensors.torch import save_file

    from engine.fitting.importing import import_checkpoint

    state = {k: v.contiguous() for k, v in _monai_vit().state_dict().items()}
    save_file(state, str(tmp_path / "vit.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "vit.pt")
    a = import_checkpoint(tmp_path / "vit.safetensors", "monai-vit", tmp_path / "a", num_heads=4, spacing=6.0)
    b = import_checkpoint(tmp_path / "vit.pt", "monai-vit", tmp_path / "b", num_heads=4, spacing=6.0, name="other-name")
    assert json.loads((tmp_path / "a" / "model.json").read_text()) != json.loads(
        (tmp_path / "b" / "model.json").read_text()
    )
    assert a == b
    # the same tensors in a file of another layout (other order, metadata) keep it too
    enc = read_card(tmp_path / "a")["encoder"]["weights"]
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "a" / enc))
    save_file(dict(reversed(list(tensors.items()))), str(tmp_path / "a" / enc), metadata={"written_by": "someone else"})
    assert load_model(tmp_path / "a").fingerprint == a
    # a changed value does not
    tensors["cls_token"] = tensors["cls_token"] + 1e-6
    save_file(tensors, str(tmp_path / "a" / enc))
    assert load_model(tmp_path / "a").fingerprint != a


def test_descriptive_card_fields_do_not_enter_the_fingerprint_but_configuration_does(tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    base = compute_fingerprint(read_card(folder), folder)
    card = json.loads((folder / "model.json").read_text())
    card.update(name="renamed", description="another text", training={"status": "imported"})
    (folder / "model.json").write_text(json.dumps(card))
    assert compute_fingerprint(read_card(folder), folder) == base
    card["preprocessing"]["tile_overlap"] = 0.5
    (folder / "model.json").write_text(json.dumps(card))
    assert compute_fingerprint(read_card(folder), folder) != base


def test_every_shipped_head_records_the_embedded_model_fingerprint():
    from engine.default_model.restamp import restamp

    done = restamp(check=True)
    assert not done["restamped"], f"stale: {done['restamped']}; run python -m engine.default_model.restamp"
    assert not done["other"] and done["current"]


def test_restamp_rewrites_only_heads_recorded_under_the_older_definition(tmp_path):
    import shutil

    from engine.default_model.restamp import HEADS_DIR, restamp
    from engine.model import legacy_fingerprint

    heads = tmp_path / "heads"
    shutil.copytree(HEADS_DIR, heads, ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    card = read_card(DEFAULT_MODEL_DIR)
    new, old = compute_fingerprint(card, DEFAULT_MODEL_DIR), legacy_fingerprint(card, DEFAULT_MODEL_DIR)
    (heads / "classify" / "manifest.json").write_text(
        (heads / "classify" / "manifest.json").read_text().replace(new, old)
    )
    (heads / "segment" / "manifest.json").write_text(
        (heads / "segment" / "manifest.json").read_text().replace(new, "sha256:" + "0" * 64)
    )
    done = restamp(heads)
    assert done["restamped"] == ["classify"] and done["other"] == ["segment"]
    assert json.loads((heads / "classify" / "manifest.json").read_text())["encoder"]["fingerprint"] == new
    assert restamp(heads)["restamped"] == []
