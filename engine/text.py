"""The text tower: a BERT-family encoder and tokenizer from the model folder, projected into the
joint image-text space.

Everything is read from local files (``local_files_only=True`` and a folder path, never a hub
id), so encoding queries needs no network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .features import TextFeatures

POOLINGS = ("mean", "cls")


class TextTower:
    """Encodes text queries to L2-normalised (Q, E) embeddings in the joint space."""

    def __init__(
        self, tokenizer: Any, bert: nn.Module, projection: nn.Linear, pooling: str = "mean", max_length: int = 64
    ):
        if pooling not in POOLINGS:
            raise UsageError(f"text pooling must be one of {POOLINGS}, got {pooling!r}")
        self.tokenizer = tokenizer
        self.bert = bert.eval().requires_grad_(False)
        self.projection = projection.eval().requires_grad_(False)
        self.pooling = pooling
        self.max_length = max_length

    @property
    def joint_dim(self) -> int:
        return self.projection.out_features

    @classmethod
    def from_card(cls, folder: Path, text_card: dict[str, Any], joint_dim: int) -> TextTower:
        """Load the tower a model card's ``text`` section describes, from files in ``folder``."""
        from safetensors.torch import (
            load_file,
        )  # heavy: transformers and the tokenizer load only when the text tower is used
        from transformers import (
            BertModel,
            BertTokenizerFast,
        )  # heavy: transformers and the tokenizer load only when the text tower is used
        from transformers.utils import (
            logging as hf_logging,
        )  # heavy: transformers and the tokenizer load only when the text tower is used

        text_dir = Path(folder) / text_card["folder"]
        if not (text_dir / "config.json").is_file():
            raise FileNotFoundError(f"text tower folder {text_dir} lacks config.json (Hugging Face layout expected)")
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the loader's progress bars and advice are noise here
        hf_logging.disable_progress_bar()
        try:
            tokenizer = BertTokenizerFast.from_pretrained(str(text_dir), local_files_only=True)
            bert = BertModel.from_pretrained(str(text_dir), local_files_only=True, add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        state = load_file(str(Path(folder) / text_card["projection"]))
        hidden = bert.config.hidden_size
        if tuple(state["weight"].shape) != (joint_dim, hidden):
            raise UsageError(
                f"text projection {text_card['projection']} has shape {tuple(state['weight'].shape)}, "
                f"expected (joint_dim={joint_dim}, hidden={hidden})"
            )
        projection = nn.Linear(hidden, joint_dim)
        projection.load_state_dict({k: v.float() for k, v in state.items()})
        return cls(tokenizer, bert, projection, text_card.get("pooling", "mean"), int(text_card.get("max_length", 64)))

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(Q, E) float32 L2-normalised embeddings, one row per text."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        if not texts:
            return torch.zeros(0, self.joint_dim)
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        hidden = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(self.projection(pooled.float()), dim=-1)

    def features(self, texts: list[str]) -> TextFeatures:
        """Encode queries into the :class:`TextFeatures` heads receive."""
        return TextFeatures(queries=list(texts), embeddings=self.encode(texts))
