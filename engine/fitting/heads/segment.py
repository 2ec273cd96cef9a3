"""A fitted segmentation decoder on the frozen encoder: a light UNETR-style 3D decoder with ResNet
blocks over three encoder layers and the tile image, run per tile and blended by the engine.

Written by ``mrfm fit``; the labels and encoder layers are in ``manifest.json`` under ``fit``.
With five labels it is the contrib segment head's net (both build it from ``engine.head_nets``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import engine


def fit_record(manifest: dict) -> dict:
    """The manifest's fit record: top-level ``fit`` (``labels.fit`` in packages written earlier)."""
    return manifest.get("fit") or manifest["labels"]["fit"]


MANIFEST = Path(__file__).with_name("manifest.json")


ResBlock, SegmentNet = engine.head_nets.ResBlock, engine.head_nets.SegmentNet


def config() -> dict[str, Any]:
    return fit_record(json.loads(MANIFEST.read_text()))["config"]


def build_net(embed_dim: int, cfg: dict[str, Any] | None = None) -> SegmentNet:
    cfg = cfg or config()
    return SegmentNet(embed_dim, len(cfg["labels"]), tuple(cfg.get("widths", (32, 16, 8))))


token_grid = engine.head_nets.token_grid


class SegmentHead(engine.NetHead):
    manifest_path = MANIFEST
    build_net = staticmethod(build_net)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # channels-last 3D convolutions: about 1.5x faster on CPU (oneDNN), same values
        self.net.to(memory_format=torch.channels_last_3d)

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        cfg = fit_record(self.spec)["config"]
        grid = batch[0].features.grid
        layers = [token_grid(self.stack(batch, f"layers[{i}]"), grid) for i in cfg["layers"]]
        image = self.stack(batch, "image").contiguous(memory_format=torch.channels_last_3d)
        probs = self.net(layers, image).softmax(dim=1).float().cpu().numpy()
        return [{cfg["output"]: probs[i]} for i in range(len(batch))]


@engine.hookimpl
def register_heads(register) -> None:
    register(SegmentHead)
