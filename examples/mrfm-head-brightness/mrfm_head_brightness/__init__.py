"""A complete third-party mrfm head in one file (plus its manifest).

Install it with ``pip install ./examples/mrfm-head-brightness``; mrfm finds it through the
``mrfm`` entry point declared in pyproject.toml. ``pytest examples/mrfm-head-brightness`` runs it
through mrfm's real path with the testing kit (``engine.testing``).
"""

from pathlib import Path

import torch

import engine


class BrightnessHead(engine.Head):
    manifest_path = Path(__file__).with_name("manifest.json")

    def predict(self, batch: list[engine.HeadInput]) -> list[dict]:
        results = []
        for item in batch:
            image = item.image[0]  # (X, Y, Z), z-scored over the series' own voxels
            # count only the acquired field of view: the view's padding is not data
            valid = item.valid[0] if item.valid is not None else torch.ones_like(image, dtype=torch.bool)
            bright = ((image > 0) & valid).sum() / valid.sum().clamp(min=1)
            results.append({"bright_fraction": bright, "cls_norm": item.features.cls.norm()})
        return results


@engine.hookimpl
def register_heads(register):
    register(BrightnessHead)
