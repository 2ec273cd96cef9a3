"""The networks of the built-in and fitted heads, defined once.

The contrib heads and the head modules ``mrfm fit`` writes build their nets from here, so weights
fitted by one load into the other by construction rather than by copies kept equal by hand.
Parameter names are part of the shipped weights files: renaming one breaks them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CentreNet", "GroundNet", "LocalizeNet", "ResBlock", "SegmentNet", "token_grid"]


class LocalizeNet(nn.Module):
    """Per-token lesion logit: LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, embed_dim: int = 128, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D) -> logits (B, N)."""
        return self.mlp(tokens).squeeze(-1)


class GroundNet(nn.Module):
    """Token projection into the joint space, a similarity temperature and a score bias."""

    def __init__(self, embed_dim: int = 128, joint_dim: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, joint_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.score_bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D) -> unit vectors in the joint space (B, N, E)."""
        return F.normalize(self.proj(self.norm(tokens)), dim=-1)


class ResBlock(nn.Module):
    """conv3d-norm-act twice with a residual connection (1x1 projection when channels change)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.skip = nn.Conv3d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        y = self.norm2(self.conv2(y))
        return F.leaky_relu(y + self.skip(x), 0.01)


class SegmentNet(nn.Module):
    """A light UNETR-style decoder: token grids of three encoder layers (deep, mid, shallow) and the
    image -> per-voxel logits.

    The deep layer enters at 1/8 of the input resolution, mid at 1/4, shallow at 1/2 (for 8^3
    patches), the image at full resolution.
    """

    def __init__(self, embed_dim: int = 128, classes: int = 5, widths: tuple[int, int, int] = (32, 16, 8)):
        super().__init__()
        w0, w1, w2 = widths
        self.deep = nn.Sequential(nn.Conv3d(embed_dim, w0, 1), ResBlock(w0, w0))  # 1/8
        self.up1 = nn.ConvTranspose3d(w0, w1, 2, stride=2)  # -> 1/4
        self.mid_skip = nn.ConvTranspose3d(embed_dim, w1, 2, stride=2)
        self.dec1 = ResBlock(2 * w1, w1)
        self.up2 = nn.ConvTranspose3d(w1, w2, 2, stride=2)  # -> 1/2
        self.shallow_skip = nn.ConvTranspose3d(embed_dim, w2, 4, stride=4)
        self.dec2 = ResBlock(2 * w2, w2)
        self.up3 = nn.ConvTranspose3d(w2, w2, 2, stride=2)  # -> full resolution
        self.image_skip = nn.Sequential(nn.Conv3d(1, w2, 3, padding=1), nn.LeakyReLU(0.01))
        self.dec3 = ResBlock(2 * w2, w2)
        self.out = nn.Conv3d(w2, classes, 1)

    def forward(self, layers: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """layers [deep, mid, shallow], each (B, D, gx, gy, gz); image (B, 1, X, Y, Z) -> (B, C, X, Y, Z)."""
        deep, mid, shallow = layers
        x = self.deep(deep)
        x = self.dec1(torch.cat([self.up1(x), self.mid_skip(mid)], dim=1))
        x = self.dec2(torch.cat([self.up2(x), self.shallow_skip(shallow)], dim=1))
        x = self.up3(x)
        if x.shape[2:] != image.shape[2:]:  # a patch size other than 8: meet the image grid
            x = F.interpolate(x, size=image.shape[2:], mode="trilinear", align_corners=False)
        x = self.dec3(torch.cat([x, self.image_skip(image)], dim=1))
        return self.out(x)


def token_grid(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, D) tokens in (x, y, z) C-order -> (B, D, gx, gy, gz), the inverse of Conv3d.flatten(2)."""
    b, n, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, *grid)


class CentreNet(nn.Module):
    """Anchor-free dense detector (CenterNet-style) on one tiles-view window and its token grids.

    The window image enters through two strided convolutions and meets the deep, mid and shallow
    encoder layers at stride 4 (four voxels of the view per output cell, finer than lesions are
    wide; the token grid has stride 8). Per cell: a centre logit, a log box size (voxels, per
    axis) and the centre's offset inside the cell. With ``text_dim`` the query embedding
    modulates the features by FiLM, so the centre map answers "where is this query's target".
    """

    stride = 4

    def __init__(self, embed_dim: int = 128, width: int = 24, text_dim: int = 0):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv3d(1, 8, 3, stride=2, padding=1),
            nn.LeakyReLU(0.01),  # 1/2
            nn.Conv3d(8, w, 3, stride=2, padding=1),
            nn.LeakyReLU(0.01),
        )  # 1/4
        self.deep = nn.ConvTranspose3d(embed_dim, w, 2, stride=2)  # 1/8 -> 1/4
        self.mid = nn.ConvTranspose3d(embed_dim, w, 2, stride=2)
        self.shallow = nn.ConvTranspose3d(embed_dim, w, 2, stride=2)
        self.fuse = ResBlock(4 * w, w)
        self.film = nn.Linear(text_dim, 2 * w) if text_dim else None
        self.neck = nn.Sequential(nn.Conv3d(w, w, 3, padding=1), nn.LeakyReLU(0.01))
        self.heat = nn.Conv3d(w, 1, 1)
        self.size = nn.Conv3d(w, 3, 1)
        self.offset = nn.Conv3d(w, 3, 1)
        nn.init.constant_(self.heat.bias, -4.0)  # a rare positive class starts near its prior

    def trunk(self, layers: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """layers [deep, mid, shallow], each (B, D, gx, gy, gz); image (B, 1, X, Y, Z) -> (B, W, X/4, Y/4, Z/4)."""
        deep, mid, shallow = layers
        s4 = self.stem(image)
        return self.fuse(
            torch.cat(
                [s4, _meet(self.deep(deep), s4), _meet(self.mid(mid), s4), _meet(self.shallow(shallow), s4)], dim=1
            )
        )

    def decode(
        self, x: torch.Tensor, text: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trunk features (B, W, ...), optional query embeddings (B, E) -> centre logits (B, ...),
        log sizes (B, 3, ...), offsets in [0, 1] (B, 3, ...)."""
        if self.film is not None:
            if text is None:
                raise ValueError("this net is conditioned on a text query")
            gamma, beta = self.film(text).chunk(2, dim=1)
            x = x * (1 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None]
        x = self.neck(x)
        return self.heat(x)[:, 0], self.size(x), torch.sigmoid(self.offset(x))

    def forward(self, layers: Sequence[torch.Tensor], image: torch.Tensor, text: torch.Tensor | None = None):
        return self.decode(self.trunk(layers, image), text)


def _meet(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` on ``like``'s grid (a patch size other than 8 leaves them off by a few voxels)."""
    return (
        x
        if x.shape[2:] == like.shape[2:]
        else F.interpolate(x, size=like.shape[2:], mode="trilinear", align_corners=False)
    )
