"""Lesion volume regression: an MLP on CLS + mean-pooled patch tokens, softplus for a value >= 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import engine


class RegressNet(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear -> softplus, on concat(CLS, mean token)."""

    def __init__(self, embed_dim: int = 128, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(2 * embed_dim),
            nn.Linear(2 * embed_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """cls (B, D), tokens (B, N, D) -> volume in mL, (B,)."""
        x = torch.cat([cls, tokens.mean(dim=1)], dim=-1)
        return F.softplus(self.mlp(x)).squeeze(-1)


def build_net(embed_dim: int = 128) -> nn.Module:
    return RegressNet(embed_dim)


class RegressHead(engine.NetHead):
    manifest_path = Path(__file__).with_name("manifest.json")
    build_net = staticmethod(build_net)

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        cls = self.stack(batch, "cls")
        tokens = self.stack(batch, "tokens")
        volumes = self.net(cls, tokens).cpu().numpy()
        return [{"lesion_volume": volumes[i]} for i in range(len(batch))]


@engine.hookimpl
def register_heads(register) -> None:
    register(RegressHead)
