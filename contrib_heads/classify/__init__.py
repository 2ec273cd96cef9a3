"""Body region and contrast classification: a linear probe on CLS + mean-pooled patch tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import engine

REGIONS = engine.vocabulary.REGIONS
CONTRASTS = engine.vocabulary.CONTRASTS


class ClassifyNet(nn.Module):
    """LayerNorm over concat(CLS, mean token), then one linear layer per label set."""

    def __init__(self, embed_dim: int = 128):
        super().__init__()
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.region = nn.Linear(2 * embed_dim, len(REGIONS))
        self.contrast = nn.Linear(2 * embed_dim, len(CONTRASTS))

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """cls (B, D), tokens (B, N, D) -> logits per output, (B, C) each."""
        x = self.norm(torch.cat([cls, tokens.mean(dim=1)], dim=-1))
        return {"region": self.region(x), "contrast": self.contrast(x)}


def build_net(embed_dim: int = 128) -> nn.Module:
    return ClassifyNet(embed_dim)


class ClassifyHead(engine.NetHead):
    manifest_path = Path(__file__).with_name("manifest.json")
    build_net = staticmethod(build_net)

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        cls = self.stack(batch, "cls")
        tokens = self.stack(batch, "tokens")
        # calibrated: each output's logits over the temperature fit on validation studies (manifest fit.config)
        temps = {
            o["name"]: float(o.get("temperature", 1.0))
            for o in ((self.spec.get("fit") or {}).get("config") or {}).get("outputs", [])
        }
        probs = {
            name: (logits / temps.get(name, 1.0)).softmax(dim=-1).cpu().numpy()
            for name, logits in self.net(cls, tokens).items()
        }
        return [{name: p[i] for name, p in probs.items()} for i in range(len(batch))]


@engine.hookimpl
def register_heads(register) -> None:
    register(ClassifyHead)
