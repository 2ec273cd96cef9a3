"""Fitted text grounding (written by ``mrfm fit``; same net and box logic as the contrib ground
head): where in the scan does a free-text query point?

Patch tokens are projected into the joint image-text space. For each query the cosine similarity
with every token gives a heat map (a softmax over tokens at the learned temperature); the box
covers the connected tokens around the peak whose heat reaches a fraction of the peak's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import engine
from engine.token_boxes import grow_from_peak, region_boxes  # noqa: F401 (also this module's API)


def fit_record(manifest: dict) -> dict:
    """The manifest's fit record: top-level ``fit`` (``labels.fit`` in packages written earlier)."""
    return manifest.get("fit") or manifest["labels"]["fit"]

DEFAULT_RELATIVE_THRESHOLD = 0.5


GroundNet = engine.head_nets.GroundNet


def config() -> dict:
    """The net's configuration from the package's manifest (empty outside a package)."""

    path = Path(__file__).with_name("manifest.json")
    return fit_record(json.loads(path.read_text()))["config"] if path.is_file() else {}


def build_net(embed_dim: int = 128, cfg: dict | None = None) -> nn.Module:
    cfg = config() if cfg is None else cfg
    return GroundNet(embed_dim, int(cfg.get("joint_dim", 64)))


class GroundHead(engine.NetHead):
    manifest_path = Path(__file__).with_name("manifest.json")
    build_net = staticmethod(build_net)

    def __init__(self, manifest: dict[str, Any], weights: dict[str, torch.Tensor], context: engine.HeadContext):
        super().__init__(manifest, weights, context)
        default = manifest.get("parameters", {}).get("relative_threshold", {}).get("default", DEFAULT_RELATIVE_THRESHOLD)
        self.relative_threshold = float(context.params.get("relative_threshold", default))
        if not 0 < self.relative_threshold <= 1:
            raise ValueError(f"ground: relative_threshold must lie in (0, 1], got {self.relative_threshold}")

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        tokens = self.stack(batch, "tokens")
        projected = self.net(tokens).cpu()
        scale, bias = self.net.logit_scale.exp().item(), self.net.score_bias.item()
        name = self.spec["outputs"][0]["name"]
        return [{name: self._ground(item, emb, scale, bias)} for item, emb in zip(batch, projected)]

    def _ground(self, item: engine.HeadInput, projected: torch.Tensor, scale: float, bias: float) -> dict[str, Any]:
        text = item.text if item.text is not None else self.context.text
        if text is None or len(text.queries) == 0:
            return {"boxes": np.zeros((0, 6), np.float32), "scores": np.zeros(0, np.float32), "queries": []}
        queries = F.normalize(text.embeddings.detach().float().cpu(), dim=-1)
        if queries.shape[-1] != projected.shape[-1]:
            raise ValueError(f"ground: query embeddings have {queries.shape[-1]} dims, the joint space has {projected.shape[-1]}")
        grid = item.features.grid
        sim = (queries @ projected.T).reshape(-1, *grid)  # (Q, gx, gy, gz) cosine similarity
        peak = sim.flatten(1).max(dim=1).values
        # heat >= r * peak heat  <=>  sim >= peak sim + log(r) / scale  (softmax over tokens)
        mask = sim >= (peak + math.log(self.relative_threshold) / scale).view(-1, 1, 1, 1)
        seed = F.one_hot(sim.flatten(1).argmax(dim=1), sim[0].numel()).bool().view_as(mask)
        boxes = region_boxes(grow_from_peak(mask, seed).numpy(), item.shape)
        scores = torch.sigmoid(scale * peak + bias).numpy()
        return {"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32), "queries": list(text.queries)}


@engine.hookimpl
def register_heads(register) -> None:
    register(GroundHead)
