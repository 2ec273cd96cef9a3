"""Retrieval embedding: the encoder's image embedding in the joint image-text space.

It has no weights of its own: the joint projection belongs to the model, so text queries encoded
by the same model's text tower stay comparable with the stored embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import engine


class RetrieveHead(engine.Head):
    manifest_path = Path(__file__).with_name("manifest.json")

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        missing = [item.series_key for item in batch if item.features.joint is None]
        if missing:
            raise ValueError(f"retrieve: the model gives no joint image embedding (series {missing[0]})")
        joint = torch.stack([item.features.joint for item in batch]).float()
        # Re-normalise in float32: a half-precision backend may leave the norm slightly off 1.
        embeddings = F.normalize(joint, dim=-1).cpu().numpy()
        return [{"embedding": embeddings[i]} for i in range(len(batch))]


@engine.hookimpl
def register_heads(register) -> None:
    register(RetrieveHead)
