"""The built-in encoder architecture, registered through the plugin layer like a third party's.

``vit3d``: the 3D ViT of :mod:`engine.model` (Conv3d patch embedding, CLS token, interpolated
position embeddings, pre-norm blocks). A model card names its architecture in
``encoder.architecture``; cards without one mean ``vit3d``.
"""

from __future__ import annotations

from typing import Any, Callable

import engine
from engine import VisionTransformer3D, config_from_card


class ViT3D:
    """Builds the 3D ViT a model card describes; weights are loaded by the engine afterwards."""

    name = "vit3d"

    @staticmethod
    def build(card: dict[str, Any]) -> VisionTransformer3D:
        return VisionTransformer3D(config_from_card(card))


@engine.hookimpl
def register_encoders(register: Callable[[object], None]) -> None:
    register(ViT3D)
