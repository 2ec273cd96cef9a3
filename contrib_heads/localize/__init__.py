"""Lesion localisation from a token-level lesion map.

An MLP scores every patch token; tokens above a threshold are grouped into basins by hill
climbing to their local maximum (so two touching lesions with separate peaks stay apart, which
plain connected components would merge); each basin gives a box scored by its peak; 3D
non-maximum suppression removes duplicates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import engine
from engine import basin_boxes, basins, box_iou3d, nms3d  # noqa: F401 (also this module's API)

LABEL = "lesion"
DEFAULTS = {"threshold": 0.5, "iou": 0.3, "max_boxes": 16}


LocalizeNet = engine.head_nets.LocalizeNet


def build_net(embed_dim: int = 128) -> nn.Module:
    return LocalizeNet(embed_dim)


class LocalizeHead(engine.NetHead):
    manifest_path = Path(__file__).with_name("manifest.json")
    build_net = staticmethod(build_net)

    def __init__(self, manifest: dict[str, Any], weights: dict[str, torch.Tensor], context: engine.HeadContext):
        super().__init__(manifest, weights, context)
        declared = {k: p["default"] for k, p in manifest.get("parameters", {}).items() if "default" in p}  # e.g. a fitted threshold
        params = {**DEFAULTS, **declared, **{k: v for k, v in context.params.items() if k in DEFAULTS}}
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
                {"lesions": {"boxes": boxes[keep].astype(np.float32), "scores": scores[keep].astype(np.float32), "labels": [LABEL] * len(keep)}}
            )
        return results


@engine.hookimpl
def register_heads(register) -> None:
    register(LocalizeHead)
