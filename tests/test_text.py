"""The text tower: local-only loading, tokenizer consistency, joint-space embeddings."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from engine.model import DEFAULT_MODEL_DIR, load_model
from engine.text import TextTower

TEXT_DIR = DEFAULT_MODEL_DIR / "text"


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def tower(model):
    return model.text_tower()


def test_embeddings_are_unit_vectors_in_the_joint_space(tower, model):
    emb = tower.encode(["T2 hyperintense lesion in the left frontal lobe", "knee joint effusion", "normal spine"])
    assert emb.shape == (3, model.joint_dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_encoding_is_deterministic_and_independent_of_the_batch(tower):
    texts = ["FLAIR lesion", "a much longer report sentence about the lumbar spine and its discs"]
    both = tower.encode(texts)
    assert torch.allclose(both, tower.encode(texts))
    assert torch.allclose(both[0], tower.encode(texts[:1])[0], atol=1e-5)  # padding does not leak in


def test_different_texts_get_different_embeddings(tower):
    emb = tower.encode(["brain", "knee"])
    assert float(emb[0] @ emb[1]) < 0.999


def test_empty_query_list_and_single_string(tower, model):
    assert tower.encode([]).shape == (0, model.joint_dim)
    with pytest.raises(TypeError, match="list of strings"):
        tower.encode("brain")  # type: ignore[arg-type]


def test_features_carry_queries_and_embeddings(tower):
    feats = tower.features(["brain", "spine"])
    assert feats.queries == ["brain", "spine"] and feats.embeddings.shape[0] == 2


def test_loads_and_encodes_with_the_network_refused(monkeypatch, model):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tower = TextTower.from_card(model.folder, model.card["text"], model.joint_dim)
    assert tower.encode(["lesion"]).shape == (1, model.joint_dim)


def test_vocabulary_files_agree(tower):
    vocab = TEXT_DIR.joinpath("vocab.txt").read_text().splitlines()
    config = json.loads(TEXT_DIR.joinpath("config.json").read_text())
    assert len(vocab) == len(set(vocab)) == config["vocab_size"] == len(tower.tokenizer)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert 1000 <= len(vocab) <= 4096


def test_hf_tokenizer_matches_tokenizer_json(tower):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(TEXT_DIR / "tokenizer.json"))
    for text in ["Patellofemoral compartment: 12 mm T2-weighted lesion.", "Xylophone über ALLES", "L4-L5 disc"]:
        assert raw.encode(text).ids == tower.tokenizer(text)["input_ids"]


def test_domain_words_are_single_tokens_and_nothing_is_unknown(tower):
    for word in ["brain", "knee", "spine", "abdomen", "flair", "lesion", "fluid", "organ", "t1", "t2"]:
        assert tower.tokenizer.tokenize(word) == [word]
    assert "[UNK]" not in tower.tokenizer.tokenize("zygote quixotic 42% #3 (jpeg)")


def test_cls_pooling_is_supported(model):
    card = {**model.card["text"], "pooling": "cls"}
    tower = TextTower.from_card(model.folder, card, model.joint_dim)
    assert torch.allclose(tower.encode(["brain"]).norm(dim=-1), torch.ones(1), atol=1e-5)


def test_projection_shape_mismatch_is_reported(model):
    with pytest.raises(ValueError, match="expected \\(joint_dim=32"):
        TextTower.from_card(model.folder, model.card["text"], 32)
