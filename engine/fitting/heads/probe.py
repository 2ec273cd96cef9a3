"""A fitted probe on the frozen encoder: LayerNorm over concat(CLS, mean patch token), an optional
hidden layer, then one linear layer per output (class scores, or values).

Written by ``mrfm fit``; the net's configuration is in ``manifest.json`` under ``fit``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import engine


def fit_record(manifest: dict) -> dict:
    """The manifest's fit record: top-level ``fit`` (``labels.fit`` in packages written earlier)."""
    return manifest.get("fit") or manifest["labels"]["fit"]


MANIFEST = Path(__file__).with_name("manifest.json")
RESERVED = {"norm", "hidden", "training"}


class ProbeNet(nn.Module):
    """concat(CLS, mean token) -> LayerNorm -> [Linear -> GELU] -> one Linear per output.

    With no hidden layer and outputs ``region``/``contrast`` its parameters are named exactly as
    the contrib classify head's, so either loads the other's weights.
    """

    def __init__(self, embed_dim: int, outputs: dict[str, int], hidden: int = 0):
        super().__init__()
        bad = RESERVED & set(outputs)
        if bad:
            raise ValueError(f"output names {sorted(bad)} are reserved")
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.hidden = nn.Sequential(nn.Linear(2 * embed_dim, hidden), nn.GELU()) if hidden else None
        self.names = list(outputs)
        for name, n in outputs.items():
            setattr(self, name, nn.Linear(hidden or 2 * embed_dim, n))

    @staticmethod
    def pool(cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([cls, tokens.mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: pooled features (B, 2D) -> raw outputs per name, (B, n) each."""
        x = self.norm(x)
        if self.hidden is not None:
            x = self.hidden(x)
        return {name: getattr(self, name)(x) for name in self.names}


def config() -> dict[str, Any]:
    return fit_record(json.loads(MANIFEST.read_text()))["config"]


def build_net(embed_dim: int, cfg: dict[str, Any] | None = None) -> ProbeNet:
    cfg = cfg or config()
    sizes = {o["name"]: (len(o["labels"]) if o["task"] == "classification" else 1) for o in cfg["outputs"]}
    return ProbeNet(embed_dim, sizes, int(cfg.get("hidden", 0)))


def decode(cfg: dict[str, Any], raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw net outputs -> what the head reports: probabilities, or values in their units."""
    out = {}
    for o in cfg["outputs"]:
        r = raw[o["name"]]
        if o["task"] == "classification":
            # calibrated: logits over the temperature fit on the validation studies (1 if none)
            out[o["name"]] = (r / float(o.get("temperature", 1.0))).softmax(dim=-1)
        else:
            v = r[:, 0] * o["std"] + o["mean"]
            out[o["name"]] = torch.expm1(v).clamp_min(0) if o.get("transform") == "log1p" else v
    return out


class ProbeHead(engine.NetHead):
    manifest_path = MANIFEST
    build_net = staticmethod(build_net)

    @torch.inference_mode()
    def predict(self, batch: list[engine.HeadInput]) -> list[dict[str, Any]]:
        x = ProbeNet.pool(self.stack(batch, "cls"), self.stack(batch, "tokens"))
        out = {k: v.float().cpu().numpy() for k, v in decode(fit_record(self.spec)["config"], self.net(x)).items()}
        return [{name: values[i] for name, values in out.items()} for i in range(len(batch))]


@engine.hookimpl
def register_heads(register) -> None:
    register(ProbeHead)
