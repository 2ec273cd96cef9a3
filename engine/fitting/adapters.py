"""Bring your own weights: map 3D ViT checkpoints onto the built-in ``vit3d`` encoder.

- ``monai-vit``: ``monai.networks.nets.ViT`` (``classification=True``, i.e. with a CLS token),
  and the same ViT inside a checkpoint under a prefix (``vit.``, ``module.``, ``model.``).
  MONAI adds no position embedding to CLS, so vit3d's CLS position entry is zero; LayerNorm eps
  is MONAI's 1e-5. A MONAI ViT without a CLS token (``classification=False``, as inside UNETR)
  cannot be represented exactly: vit3d's CLS token would take part in attention and change every
  patch token, so it is refused.
- ``timm-vit3d``: timm's ViT naming (``patch_embed.proj``, ``pos_embed`` with the CLS entry,
  ``blocks.N.attn.qkv/proj``, ``blocks.N.mlp.fc1/fc2``, ``norm``) with a Conv3d patch embedding.

SwinUNETR's encoder is a Swin transformer (shifted windows, patch merging, relative position
bias): it has no CLS token and no single token grid, so it has no vit3d equivalent; it would need
an encoder plugin of its own (``register_encoders``).

Each adapter returns the vit3d state dict (without ``image_proj``) and the encoder fields of the
model card that the weights imply; ``num_heads`` cannot be read from weights and is given.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import UsageError

FORMATS = ("monai-vit", "timm-vit3d")
PREFIXES = ("module.", "model.", "vit.", "encoder.", "backbone.")


def strip_prefix(state: dict[str, torch.Tensor], marker: str) -> dict[str, torch.Tensor]:
    """Drop the common prefix in front of ``marker`` keys (e.g. ``vit.`` inside a UNETR checkpoint)."""
    keys = [k for k in state if marker in k]
    if not keys:
        return state
    prefix = keys[0][: keys[0].index(marker)]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _depth(state: dict[str, torch.Tensor]) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not ids or ids != set(range(len(ids))):
        raise UsageError("checkpoint has no consecutive transformer blocks (blocks.0 ...)")
    return len(ids)


def _encoder_fields(embed_dim: int, patch: int, depth: int, mlp_dim: int, num_heads: int, eps: float) -> dict[str, Any]:
    return {
        "architecture": "vit3d",
        "weights": "encoder.safetensors",
        "in_channels": 1,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_dim / embed_dim,
        "layer_norm_eps": eps,
    }


def from_monai_vit(
    state: dict[str, torch.Tensor], num_heads: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[int, int, int]]:
    """MONAI ViT weights -> (vit3d state, card encoder fields, token grid)."""
    state = strip_prefix(state, "patch_embedding.patch_embeddings.weight")
    if "cls_token" not in state:
        raise UsageError("MONAI ViT without a CLS token (classification=False) cannot be mapped onto vit3d exactly")
    w = state["patch_embedding.patch_embeddings.weight"]
    if w.ndim != 5 or w.shape[1] != 1 or len(set(w.shape[2:])) != 1:
        raise UsageError(f"need a single-channel conv patch embedding with cubic patches, got {tuple(w.shape)}")
    d, patch = int(w.shape[0]), int(w.shape[2])
    pos = state["patch_embedding.position_embeddings"]
    n = int(pos.shape[1])
    side = round(n ** (1 / 3))
    if side**3 != n:
        raise UsageError(f"{n} position embeddings do not form a cubic grid")
    depth = _depth(state)
    out = {
        "patch_embed.weight": w,
        "patch_embed.bias": state["patch_embedding.patch_embeddings.bias"],
        "cls_token": state["cls_token"],
        "pos_embed": torch.cat([torch.zeros(1, 1, d, dtype=pos.dtype), pos], dim=1),  # MONAI: CLS has no position
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    for i in range(depth):
        b = f"blocks.{i}."
        qkv_b = state.get(b + "attn.qkv.bias", torch.zeros(3 * d))
        out.update(
            {
                b + "norm1.weight": state[b + "norm1.weight"],
                b + "norm1.bias": state[b + "norm1.bias"],
                b + "attn.qkv.weight": state[b + "attn.qkv.weight"],
                b + "attn.qkv.bias": qkv_b,
                b + "attn.proj.weight": state[b + "attn.out_proj.weight"],
                b + "attn.proj.bias": state[b + "attn.out_proj.bias"],
                b + "norm2.weight": state[b + "norm2.weight"],
                b + "norm2.bias": state[b + "norm2.bias"],
                b + "mlp.0.weight": state[b + "mlp.linear1.weight"],
                b + "mlp.0.bias": state[b + "mlp.linear1.bias"],
                b + "mlp.2.weight": state[b + "mlp.linear2.weight"],
                b + "mlp.2.bias": state[b + "mlp.linear2.bias"],
            }
        )
    mlp_dim = int(state["blocks.0.mlp.linear1.weight"].shape[0])
    return out, _encoder_fields(d, patch, depth, mlp_dim, num_heads, 1e-5), (side, side, side)


def from_timm_vit3d(
    state: dict[str, torch.Tensor], num_heads: int, eps: float = 1e-6
) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[int, int, int]]:
    """timm-named 3D ViT weights -> (vit3d state, card encoder fields, token grid)."""
    state = strip_prefix(state, "patch_embed.proj.weight")
    w = state["patch_embed.proj.weight"]
    if w.ndim != 5 or w.shape[1] != 1:
        raise UsageError(f"need a single-channel Conv3d patch embedding, got {tuple(w.shape)}")
    d, patch = int(w.shape[0]), int(w.shape[2])
    pos = state["pos_embed"]
    n = int(pos.shape[1]) - 1
    side = round(n ** (1 / 3))
    if side**3 != n or "cls_token" not in state:
        raise UsageError("need a CLS token and 1 + g^3 position embeddings")
    depth = _depth(state)
    out = {
        "patch_embed.weight": w,
        "patch_embed.bias": state["patch_embed.proj.bias"],
        "cls_token": state["cls_token"],
        "pos_embed": pos,
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    for i in range(depth):
        b = f"blocks.{i}."
        out.update(
            {
                b + "norm1.weight": state[b + "norm1.weight"],
                b + "norm1.bias": state[b + "norm1.bias"],
                b + "attn.qkv.weight": state[b + "attn.qkv.weight"],
                b + "attn.qkv.bias": state.get(b + "attn.qkv.bias", torch.zeros(3 * d)),
                b + "attn.proj.weight": state[b + "attn.proj.weight"],
                b + "attn.proj.bias": state[b + "attn.proj.bias"],
                b + "norm2.weight": state[b + "norm2.weight"],
                b + "norm2.bias": state[b + "norm2.bias"],
                b + "mlp.0.weight": state[b + "mlp.fc1.weight"],
                b + "mlp.0.bias": state[b + "mlp.fc1.bias"],
                b + "mlp.2.weight": state[b + "mlp.fc2.weight"],
                b + "mlp.2.bias": state[b + "mlp.fc2.bias"],
            }
        )
    mlp_dim = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    return out, _encoder_fields(d, patch, depth, mlp_dim, num_heads, eps), (side, side, side)


def convert(
    state: dict[str, torch.Tensor], fmt: str, num_heads: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[int, int, int]]:
    if fmt == "monai-vit":
        return from_monai_vit(state, num_heads)
    if fmt == "timm-vit3d":
        return from_timm_vit3d(state, num_heads)
    raise UsageError(f"unknown checkpoint format {fmt!r}; choose from {', '.join(FORMATS)}")
