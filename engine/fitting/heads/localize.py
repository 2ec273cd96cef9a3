"""Fitted localisation: boxes from a token-level map (written by ``mrfm fit``; same net and box
logic as the contrib localize head, the label and default threshold from ``manifest.json``).

An MLP scores every patch token; tokens above a threshold are grouped into basins by hill
climbing to their local maximum (so two touching lesions with separate peaks stay apart, which
plain connected components would merge); each basin gives a box scored by its peak; 3D
non-maximum suppression removes duplicates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import engine
from engine.token_boxes import basin_boxes, basins, box_iou3d, nms3d  # noqa: F401 (also this module's API)


def fit_record(manifest: dict) -> dict:
    """The manifest's fit record: top-level ``fit`` (``labels.fit`` in packages written earlier)."""
    return manifest.get("fit") or manifest["labels"]["fit"]

DEFAULTS = {"threshold": 0.5, "iou": 0.3, "max_boxes": 16}


LocalizeNet = engine.head_nets.LocalizeNet


def config() -> dict:
    """The net's configuration from the package's manifest (empty outside a package)."""

    path = Path(__file__).with_name("manifest.json")
    return fit_record(json.loads(path.read_text()))["config"] if path.is_file() else {}


def build_net(embed_dim: int = 128, cfg: dict | None = None) -> nn.Module:
    cfg = config() if cfg is None else cfg
    return LocalizeNet(embed_dim, int(cfg.get("hidden", 64)))


class LocalizeHead(engine.NetHead):
    manifest_path = Path(__file__).with_name("manifest.json")
    build_net = staticmethod(build_net)

    def __init__(self, manifest: dict[str, Any], weights: dict[str, torch.Tensor], context: engine.HeadContext):
        super().__init__(manifest, weights, context)
        declared = {k: p["default"] for k, p in manifest.get("parameters", {}).items() if "default" in p}
        params = {**DEFAULTS, **declared, **{k: v for k, v in context.params.items() if k in DEFAULTS}}
        self.label = manifest["outputs"][0]["labels"][0]
        self.output = manifest["outputs"][0]["name"]
        self.threshold, self.iou, self.max_boxes = float(params["threshold"]), float(params["iou"]), int(params["max_boxes"])
        if not (0 <= self.threshold <= 1 and 0 <= self.iou <= 1 and self.max_boxes >= 1):
            raise ValueError(f"localize: parameters out of range: {params}")

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        tokens = self.stack(batch, "tokens")
        probs = torch.sigmoid(self.net(tokens)).cpu().numpy()
        results = []
        for item, prob in zip(batch, probs):
            image_shape = item.shape
            boxes, scores = basin_boxes(prob.reshape(item.features.grid), self.threshold, image_shape)
            keep = nms3d(boxes, scores, self.iou)[: self.max_boxes]
            results.append(
                {self.output: {"boxes": boxes[keep].astype(np.float32), "scores": scores[keep].astype(np.float32), "labels": [self.label] * len(keep)}}
            )
        return results


@engine.hookimpl
def register_heads(register) -> None:
    register(LocalizeHead)
