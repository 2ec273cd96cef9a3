"""A complete third-party mrfm head in one file (plus its manifest).

Install it with ``pip install ./examples/mrfm-head-brightness``; mrfm finds it through the
``mrfm`` entry point declared in pyproject.toml.
"""

from pathlib import Path

import torch

import engine


class BrightnessHead(engine.Head):
    manifest_path = Path(__file__).with_name("manifest.json")

    def predict(self, batch: list[engine.HeadInput]) -> list[dict]:
        images = torch.stack([item.image for item in batch])  # (B, 1, X, Y, Z), z-scored
        bright = (images > 0).flatten(1).float().mean(dim=1)
        cls_norm = torch.stack([item.features.cls.norm() for item in batch])
        return [{"bright_fraction": b, "cls_norm": n} for b, n in zip(bright, cls_norm)]


@engine.hookimpl
def register_heads(register):
    register(BrightnessHead)
