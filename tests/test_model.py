"""The model folder: card validation, weights, fingerprint, encoder outputs and the builder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import Features, schemas
from engine.errors import UsageError
from engine.model import DEFAULT_MODEL_DIR, EncoderConfig, VisionTransformer3D, load_model, split_features

COMMON_PREPROCESSING = {
    "orientation": "RAS",
    "spacing": [3.0, 3.0, 3.0],
    "input_size": [64, 64, 64],
    "intensity": {"clip_percentiles": [0.5, 99.5], "normalize": "zscore"},
    "tile_overlap": 0.25,
}


@pytest.fixture(scope="module")
def model():
    return load_model()


def copy_model(dest: Path) -> Path:
    """A copy of the default model's files (not its Python sources) in ``dest``."""
    shutil.copytree(DEFAULT_MODEL_DIR, dest, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return dest


def edit_card(folder: Path, change) -> None:
    card = json.loads((folder / "model.json").read_text())
    change(card)
    (folder / "model.json").write_text(json.dumps(card))


def test_default_model_matches_the_shared_contract(model):
    assert model.preprocessing == COMMON_PREPROCESSING
    assert model.input_size == (64, 64, 64)
    assert model.grid == (8, 8, 8)
    assert model.embed_dim == 128 and model.patch_size == 8
    assert model.feature_layers == [1, 3, 5]
    assert model.joint_dim == 64
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", model.fingerprint)
    assert not model.encoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_default_folder_is_small_and_pickle_free():
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    # the embedded default ships inside the package: at most 30 MB (weights, text tower, distribution statistics)
    assert sum(p.stat().st_size for p in files) <= 30 * 10**6
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]


def test_card_and_schema_example_validate(model):
    schemas.validate("model", model.card, "default card")
    for example in schemas.load_schema("model")["examples"]:
        schemas.validate("model", example, "schema example")


def test_encoder_outputs_for_the_input_size_and_another_size(model):
    for shape, grid in (((64, 64, 64), (8, 8, 8)), ((48, 64, 56), (6, 8, 7))):
        x = torch.randn(2, 1, *shape)
        with torch.no_grad():
            cls, tokens, layers, joint = model.encoder(x)
        n = grid[0] * grid[1] * grid[2]
        assert cls.shape == (2, 128) and tokens.shape == (2, n, 128)
        assert layers.shape == (2, 3, n, 128) and joint.shape == (2, 64)
        assert torch.allclose(joint.norm(dim=-1), torch.ones(2), atol=1e-5)
        feats = model.encode(x)
        assert feats[0].grid == grid and sorted(feats[0].layers) == [1, 3, 5]


def test_the_last_exported_layer_equals_the_tokens(model):
    """Layers are normalised block outputs without CLS, so the last block's layer is ``tokens``."""
    with torch.no_grad():
        _, tokens, layers, _ = model.encoder(torch.randn(1, 1, 64, 64, 64))
    assert torch.allclose(layers[:, -1], tokens)


def test_position_embeddings_are_exact_at_the_base_grid_and_interpolate_elsewhere(model):
    enc = model.encoder
    with torch.no_grad():
        assert torch.allclose(enc.position_embedding((8, 8, 8)), enc.pos_embed, atol=1e-6)
        assert enc.position_embedding((6, 8, 7)).shape == (1, 1 + 6 * 8 * 7, 128)


def test_images_are_encoded_independently_of_their_batch(model):
    x = torch.randn(3, 1, 64, 64, 64)
    batched = model.encode(x)
    single = model.encode(x[1:2])[0]
    assert torch.allclose(batched[1].tokens, single.tokens, atol=1e-5)


def test_volume_sizes_must_be_multiples_of_the_patch(model):
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model.encode(torch.zeros(1, 1, 60, 64, 64))


def test_split_features_builds_one_features_per_image():
    d, n, e = 4, 8, 3
    outputs = (torch.randn(2, d), torch.randn(2, n, d), torch.randn(2, 2, n, d), torch.randn(2, e))
    feats = split_features(outputs, (2, 2, 2), [0, 3])
    assert len(feats) == 2 and isinstance(feats[0], Features)
    assert torch.equal(feats[1].get("layers[3]"), outputs[2][1, 1])
    assert torch.equal(feats[0].joint, outputs[3][0])
    with pytest.raises(ValueError, match="do not fill a grid"):
        split_features(outputs, (2, 2, 3), [0, 3])


def test_fingerprint_does_not_depend_on_the_folder_location(tmp_path, model):
    assert load_model(copy_model(tmp_path / "m")).fingerprint == model.fingerprint


def test_fingerprint_changes_when_encoder_weights_change(tmp_path, model):
    folder = copy_model(tmp_path / "m")
    state = load_file(str(folder / "encoder.safetensors"))
    state["cls_token"] = state["cls_token"] + 1e-3
    save_file(state, str(folder / "encoder.safetensors"))
    assert load_model(folder).fingerprint != model.fingerprint


def test_fingerprint_changes_when_text_tower_weights_change(tmp_path, model):
    folder = copy_model(tmp_path / "m")
    path = folder / "text" / "model.safetensors"
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = state[key] + 1e-3
    save_file(state, str(path), metadata={"format": "pt"})
    assert load_model(folder).fingerprint != model.fingerprint


def test_fingerprint_changes_when_the_card_changes(tmp_path, model):
    folder = copy_model(tmp_path / "m")
    edit_card(folder, lambda c: c["preprocessing"].update(tile_overlap=0.5))
    assert load_model(folder).fingerprint != model.fingerprint


def test_card_errors_name_the_file_and_the_field(tmp_path):
    folder = copy_model(tmp_path / "m")
    edit_card(folder, lambda c: c["encoder"].pop("depth"))
    with pytest.raises(UsageError, match=r"model card .*model\.json.*\n.*encoder: 'depth' is a required property"):
        load_model(folder)


def test_card_with_a_wrong_type_is_rejected(tmp_path):
    folder = copy_model(tmp_path / "m")
    edit_card(folder, lambda c: c["preprocessing"].update(input_size=[64, 64]))
    with pytest.raises(UsageError, match="preprocessing/input_size"):
        load_model(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["preprocessing"].update(input_size=[64, 60, 64]), "not a multiple of encoder.patch_size 8"),
        (lambda c: c["encoder"].update(feature_layers=[1, 6]), r"feature_layers \[6\] exceed depth 6"),
        (lambda c: c["encoder"].update(num_heads=3), "not divisible by num_heads 3"),
    ],
)
def test_inconsistent_cards_are_rejected(tmp_path, change, message):
    folder = copy_model(tmp_path / "m")
    edit_card(folder, change)
    with pytest.raises(UsageError, match=message):
        load_model(folder)


def test_weights_that_do_not_match_the_card_are_rejected(tmp_path):
    folder = copy_model(tmp_path / "m")
    edit_card(folder, lambda c: c["encoder"].update(depth=5, feature_layers=[1, 3]))
    with pytest.raises(UsageError, match=r"do not match the model card's architecture: .*unexpected \['blocks\.5\."):
        load_model(folder)


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(UsageError, match="model.json is missing"):
        load_model(tmp_path)
    folder = copy_model(tmp_path / "m")
    (folder / "encoder.safetensors").unlink()
    with pytest.raises(UsageError, match="encoder.safetensors"):
        load_model(folder)


def test_encoder_config_rejects_layers_outside_the_blocks():
    with pytest.raises(UsageError, match="outside the 2 blocks"):
        EncoderConfig(depth=2, feature_layers=(2,))


def test_seeded_initialisation_is_deterministic():
    a, b = (
        VisionTransformer3D(EncoderConfig(depth=1, feature_layers=(0,))),
        VisionTransformer3D(EncoderConfig(depth=1, feature_layers=(0,))),
    )
    a.init_weights(torch.Generator().manual_seed(3))
    b.init_weights(torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


TOKENIZER_FILES = (
    "text/vocab.txt",
    "text/tokenizer.json",
    "text/tokenizer_config.json",
    "text/special_tokens_map.json",
    "text/config.json",
)
WEIGHT_FILES = ("encoder.safetensors", "text/model.safetensors", "text_projection.safetensors")


def test_builder_reproduces_the_embedded_model_up_to_training(tmp_path, model):
    """The embedded weights were trained after the build, so the builder must reproduce the rest
    exactly: the card (less its training record), the tokenizer byte for byte, every tensor's
    name, shape and dtype, and a seeded initialisation."""
    from engine.default_model.build import build
    from engine.model import build_encoder

    seed = model.card["training"]["seed"]
    build(tmp_path, seed=seed)
    card = json.loads((tmp_path / "model.json").read_text())
    # training and distribution statistics come after the build
    after = ("training", "distribution")
    assert {k: v for k, v in card.items() if k not in after} == {k: v for k, v in model.card.items() if k not in after}
    for rel in TOKENIZER_FILES:
        assert (tmp_path / rel).read_bytes() == (DEFAULT_MODEL_DIR / rel).read_bytes(), rel
    for rel in WEIGHT_FILES:
        ours, embedded = load_file(tmp_path / rel), load_file(DEFAULT_MODEL_DIR / rel)
        assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {
            k: (v.shape, v.dtype) for k, v in embedded.items()
        }, rel
    encoder = build_encoder(card)
    encoder.init_weights(torch.Generator().manual_seed(seed))
    built = load_file(tmp_path / "encoder.safetensors")
    assert all(torch.equal(built[k], v) for k, v in encoder.state_dict().items())
