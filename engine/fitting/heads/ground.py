"""Text grounding by a query-conditioned dense detector on the frozen encoder.

The query's text embedding modulates the features of :class:`engine.head_nets.CentreNet` by FiLM
(a per-channel scale and shift), so its centre map shows where that query's target lies. Each
query gets the box at its highest peak over all windows (the engine keeps one per query) with its
centre probability as score, labelled ``not found`` when that is below ``threshold`` (chosen on
validation studies when the head was fit): the target is probably absent. Boxes are in the window's
voxel coordinates; the engine maps them to world mm. Written by ``mrfm fit ground``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engine

MANIFEST = Path(__file__).with_name("manifest.json")
DEFAULT_THRESHOLD = 0.1
CentreNet, token_grid = engine.head_nets.CentreNet, engine.head_nets.token_grid


def fit_record(manifest: dict) -> dict:
    """The manifest's fit record: top-level ``fit`` (``labels.fit`` in packages written earlier)."""
    return manifest.get("fit") or manifest["labels"]["fit"]


def config() -> dict[str, Any]:
    """The net's configuration from the package's manifest (empty outside a package)."""
    return fit_record(json.loads(MANIFEST.read_text()))["config"] if MANIFEST.is_file() else {}


def build_net(embed_dim: int = 128, cfg: dict | None = None) -> CentreNet:
    cfg = config() if cfg is None else cfg
    return CentreNet(embed_dim, int(cfg.get("width", 24)), int(cfg.get("text_dim", 64)))


class GroundHead(engine.NetHead):
    manifest_path = MANIFEST
    build_net = staticmethod(build_net)

    def __init__(self, manifest: dict[str, Any], weights: dict[str, torch.Tensor], context: engine.HeadContext):
        super().__init__(manifest, weights, context)
        self.layers = fit_record(manifest)["config"]["layers"]
        default = manifest.get("parameters", {}).get("threshold", {}).get("default", DEFAULT_THRESHOLD)
        self.threshold = float(context.params.get("threshold", default))
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"ground: threshold must lie in [0, 1], got {self.threshold}")

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        text = batch[0].text if batch[0].text is not None else self.context.text
        if text is None or len(text.queries) == 0:
            empty = {
                "boxes": np.zeros((0, 6), np.float32),
                "scores": np.zeros(0, np.float32),
                "queries": [],
                "labels": [],
            }
            return [{"regions": dict(empty)} for _ in batch]
        grid = batch[0].features.grid
        layers = [token_grid(self.stack(batch, f"layers[{i}]"), grid) for i in self.layers]
        trunk = self.net.trunk(layers, self.stack(batch, "image"))
        queries = text.embeddings.detach().float().to(trunk.device)
        results = []
        for i in range(len(batch)):
            boxes, scores = [], []
            for q in range(len(text.queries)):
                heat, size, offset = self.net.decode(trunk[i : i + 1], queries[q : q + 1])
                b, s = engine.centre_boxes.centre_boxes(
                    torch.sigmoid(heat[0]).float().cpu(),
                    size[0].float().cpu(),
                    offset[0].float().cpu(),
                    CentreNet.stride,
                    0.0,
                    1,
                    0.3,
                    batch[i].shape,
                )
                boxes.append(b[0])
                scores.append(s[0])
            found = ["found" if s >= self.threshold else "not found" for s in scores]
            results.append(
                {
                    "regions": {
                        "boxes": np.asarray(boxes, np.float32).reshape(-1, 6),
                        "scores": np.asarray(scores, np.float32),
                        "queries": list(text.queries),
                        "labels": found,
                    }
                }
            )
        return results


@engine.hookimpl
def register_heads(register) -> None:
    register(GroundHead)
