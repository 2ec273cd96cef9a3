"""Anatomy and lesion segmentation: a light UNETR-style 3D decoder with ResNet blocks.

Encoder layers 5, 3 and 1 enter at 1/8, 1/4 and 1/2 of the input resolution (deeper features at
coarser scales, as in UNETR); the tile image itself enters at full resolution. Channels stay small
(32-16-8) so a 64^3 tile decodes on a CPU in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import engine

LABELS = ("background", "body", "organ", "fluid", "lesion")
DEEP_LAYER, MID_LAYER, SHALLOW_LAYER = 5, 3, 1
ResBlock, SegmentNet, token_grid = engine.head_nets.ResBlock, engine.head_nets.SegmentNet, engine.head_nets.token_grid


def build_net(embed_dim: int = 128) -> nn.Module:
    return SegmentNet(embed_dim, len(LABELS))


class SegmentHead(engine.NetHead):
    manifest_path = Path(__file__).with_name("manifest.json")
    build_net = staticmethod(build_net)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # channels-last 3D convolutions: about 1.5x faster on CPU (oneDNN), same values
        self.net.to(memory_format=torch.channels_last_3d)

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        grid = batch[0].features.grid
        layers = [
            token_grid(self.stack(batch, f"layers[{idx}]"), grid) for idx in (DEEP_LAYER, MID_LAYER, SHALLOW_LAYER)
        ]
        image = self.stack(batch, "image").contiguous(memory_format=torch.channels_last_3d)
        probs = self.net(layers, image).softmax(dim=1).cpu().numpy()
        return [{"anatomy": probs[i]} for i in range(len(batch))]


@engine.hookimpl
def register_heads(register) -> None:
    register(SegmentHead)
