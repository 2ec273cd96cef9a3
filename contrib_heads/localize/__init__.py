"""Lesion localisation by a dense anchor-free detector (CenterNet-style) on the frozen encoder.

Per tiles-view window, the window image and three encoder layers (``fit.config.layers``: deep,
mid, shallow) feed :class:`engine.head_nets.CentreNet`, which predicts for every cell of stride
2 a centre probability, a box size and a sub-cell offset. Boxes are read at the local maxima of
the centre map whose probability reaches ``threshold`` (chosen on validation studies when the
head was fit) and pass through 3D non-maximum suppression; a window without such a peak gives
no box. Boxes are in the window's voxel coordinates: the engine merges windows and maps them to
world mm. Written by ``mrfm fit localize``; the configuration is in ``manifest.json`` under ``fit``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import engine

MANIFEST = Path(__file__).with_name("manifest.json")
DEFAULTS = {"threshold": 0.3, "iou": 0.3, "max_boxes": 16}
CentreNet, token_grid = engine.head_nets.CentreNet, engine.head_nets.token_grid


def fit_record(manifest: dict) -> dict:
    """The manifest's fit record: top-level ``fit`` (``labels.fit`` in packages written earlier)."""
    return manifest.get("fit") or manifest["labels"]["fit"]


def config() -> dict[str, Any]:
    """The net's configuration from the package's manifest (empty outside a package)."""
    return fit_record(json.loads(MANIFEST.read_text()))["config"] if MANIFEST.is_file() else {}


def build_net(embed_dim: int = 128, cfg: dict | None = None) -> CentreNet:
    cfg = config() if cfg is None else cfg
    return CentreNet(embed_dim, int(cfg.get("width", 24)))


class LocalizeHead(engine.NetHead):
    manifest_path = MANIFEST
    build_net = staticmethod(build_net)

    def __init__(self, manifest: dict[str, Any], weights: dict[str, torch.Tensor], context: engine.HeadContext):
        super().__init__(manifest, weights, context)
        declared = {k: p["default"] for k, p in manifest.get("parameters", {}).items() if "default" in p}
        params = {**DEFAULTS, **declared, **{k: v for k, v in context.params.items() if k in DEFAULTS}}
        self.layers = fit_record(manifest)["config"]["layers"]
        self.label = manifest["outputs"][0]["labels"][0]
        self.output = manifest["outputs"][0]["name"]
        self.threshold, self.iou, self.max_boxes = (
            float(params["threshold"]),
            float(params["iou"]),
            int(params["max_boxes"]),
        )
        if not (0 <= self.threshold <= 1 and 0 <= self.iou <= 1 and self.max_boxes >= 1):
            raise ValueError(f"localize: parameters out of range: {params}")

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        grid = batch[0].features.grid
        layers = [token_grid(self.stack(batch, f"layers[{i}]"), grid) for i in self.layers]
        heat, size, offset = self.net(layers, self.stack(batch, "image"))
        prob = torch.sigmoid(heat).float().cpu()
        results = []
        for i in range(len(batch)):
            boxes, scores = engine.centre_boxes.centre_boxes(
                prob[i],
                size[i].float().cpu(),
                offset[i].float().cpu(),
                CentreNet.stride,
                self.threshold,
                self.max_boxes,
                self.iou,
                batch[i].shape,
            )
            results.append({self.output: {"boxes": boxes, "scores": scores, "labels": [self.label] * len(boxes)}})
        return results


@engine.hookimpl
def register_heads(register) -> None:
    register(LocalizeHead)
