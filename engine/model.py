"""The frozen foundation model: a 3D ViT image encoder, its model card, weights and fingerprint.

A model is a folder: ``model.json`` (validated against ``schemas/model.schema.json``), the
encoder's safetensors weights, and a text tower in Hugging Face layout. Its fingerprint hashes
the card and every weight and tokenizer file, so heads and compiled engines can be keyed by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from . import schemas
from .errors import UsageError, one_line
from .features import Features
from .fingerprint import canonical_json

if TYPE_CHECKING:
    from .text import TextTower

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
CARD_NAME = "model.json"

EncoderOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of the 3D ViT; ``base_grid`` is the token grid its position embeddings cover."""

    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    in_channels: int = 1
    base_grid: tuple[int, int, int] = (8, 8, 8)
    feature_layers: tuple[int, ...] = (1, 3, 5)
    joint_dim: int = 64
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise UsageError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        bad = [i for i in self.feature_layers if not 0 <= i < self.depth]
        if bad:
            raise UsageError(f"feature_layers {bad} lie outside the {self.depth} blocks (0..{self.depth - 1})")


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype, so reduced-precision graphs
    (bf16/fp16 exports, cast weights) keep their normalisation statistics exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = Fp32LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = Fp32LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer3D(nn.Module):
    """3D ViT: (B, 1, X, Y, Z) -> (cls (B, D), tokens (B, N, D), layers (B, L, N, D), joint (B, E)).

    Spatial sizes must be multiples of the patch size; N = prod(size // patch). Position
    embeddings are always resampled (trilinearly) to the input's grid, which is exact at the base
    grid and keeps exported graphs free of shape-dependent branches. ``layers`` are the outputs
    of the blocks in ``feature_layers`` after the final norm, without CLS; ``joint`` is the
    L2-normalised projection of CLS into the image-text space.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = nn.Conv3d(config.in_channels, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + _prod(config.base_grid), d))
        self.blocks = nn.ModuleList(
            Block(d, config.num_heads, config.mlp_ratio, config.layer_norm_eps) for _ in range(config.depth)
        )
        self.norm = Fp32LayerNorm(d, eps=config.layer_norm_eps)
        self.image_proj = nn.Linear(d, config.joint_dim)
        self._feature_layers = tuple(config.feature_layers)

    def init_weights(self, generator: torch.Generator) -> None:
        """Seeded ViT initialisation (truncated normal, std 0.02), deterministic for a generator."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Conv3d)):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04, generator=generator)
                nn.init.zeros_(module.bias)
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04, generator=generator)

    def position_embedding(self, grid: tuple[Any, Any, Any]) -> torch.Tensor:
        d = self.config.embed_dim
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, *self.config.base_grid, d).permute(0, 4, 1, 2, 3)
        patch_pos = F.interpolate(patch_pos, size=grid, mode="trilinear", align_corners=False)
        patch_pos = patch_pos.flatten(2).transpose(1, 2)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> EncoderOutputs:
        x = self.patch_embed(x.to(self.pos_embed.dtype))
        grid = (x.shape[2], x.shape[3], x.shape[4])
        x = x.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding(grid).to(x.dtype)
        picked = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._feature_layers:
                picked.append(self.norm(x)[:, 1:])
        x = self.norm(x)
        cls_out = x[:, 0]
        joint = F.normalize(self.image_proj(cls_out).float(), dim=-1)
        return cls_out, x[:, 1:], torch.stack(picked, dim=1), joint


def _prod(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def token_grid(spatial: tuple[int, ...], patch_size: int) -> tuple[int, int, int]:
    """Token grid for a spatial size; raises when a side is not a multiple of the patch size."""
    if len(spatial) != 3 or any(int(s) % patch_size or int(s) <= 0 for s in spatial):
        raise ValueError(
            f"volume size {tuple(spatial)} must be three positive multiples of the patch size {patch_size}"
        )
    return tuple(int(s) // patch_size for s in spatial)  # type: ignore[return-value]


def split_features(outputs: EncoderOutputs, grid: tuple[int, int, int], feature_layers: list[int]) -> list[Features]:
    """Turn batched encoder outputs into one :class:`Features` per image."""
    cls, tokens, layers, joint = outputs
    if layers.shape[1] != len(feature_layers):
        raise ValueError(f"encoder returned {layers.shape[1]} layers, the model card lists {len(feature_layers)}")
    grid = tuple(int(g) for g in grid)  # type: ignore[assignment]
    if tokens.shape[1] != _prod(grid):
        raise ValueError(f"{tokens.shape[1]} tokens do not fill a grid {grid}")
    return [
        Features(
            cls=cls[b],
            tokens=tokens[b],
            layers={int(idx): layers[b, i] for i, idx in enumerate(feature_layers)},
            grid=grid,  # type: ignore[arg-type]
            joint=joint[b],
        )
        for b in range(cls.shape[0])
    ]


def config_from_card(card: dict[str, Any]) -> EncoderConfig:
    enc = card["encoder"]
    input_size = tuple(card["preprocessing"]["input_size"])
    return EncoderConfig(
        patch_size=enc["patch_size"],
        embed_dim=enc["embed_dim"],
        depth=enc["depth"],
        num_heads=enc["num_heads"],
        mlp_ratio=float(enc.get("mlp_ratio", 4.0)),
        in_channels=enc.get("in_channels", 1),
        base_grid=token_grid(input_size, enc["patch_size"]),
        feature_layers=tuple(enc["feature_layers"]),
        joint_dim=card["joint_dim"],
        layer_norm_eps=float(enc.get("layer_norm_eps", 1e-6)),
    )


def weight_files(card: dict[str, Any], folder: Path) -> list[Path]:
    """Every file whose bytes define the model's outputs, in a fixed order: encoder weights, text
    projection and the text folder's files (weights, config, vocabulary; hidden files skipped)."""
    files = [folder / card["encoder"]["weights"]]
    text = card.get("text")
    if text:
        files.append(folder / text["projection"])
        text_dir = folder / text["folder"]
        if text_dir.is_dir():
            files.extend(sorted(p for p in text_dir.iterdir() if p.is_file() and not p.name.startswith(".")))
    return files


# card fields that describe a model but do not change what it computes: provenance, names, and
# the file names its weights are stored under
# (and the out-of-distribution statistics: calibrating a model changes no feature, so it keeps
# every head fit on it)
_DESCRIPTIVE = ("name", "version", "description", "license", "training", "distribution")
_FILE_NAMES = {"encoder": ("weights",), "text": ("folder", "projection")}


def fingerprint_config(card: dict[str, Any]) -> dict[str, Any]:
    """The part of a model card the fingerprint covers: everything but descriptive fields and
    weight file names (so a checkpoint imported from .pt or from .safetensors, under any name,
    gets the fingerprint of its tensors and configuration)."""
    config = {k: v for k, v in card.items() if k not in _DESCRIPTIVE}
    for section, names in _FILE_NAMES.items():
        if isinstance(config.get(section), dict):
            config[section] = {k: v for k, v in config[section].items() if k not in names}
    return config


def compute_fingerprint(card: dict[str, Any], folder: Path) -> str:
    """sha256 of what the model computes: the configuration part of its card
    (:func:`fingerprint_config`), then each tensor of its safetensors files (by name: dtype,
    shape and values, whatever the file's layout) and the bytes of its other files (tokenizer,
    text config; JSON canonicalised), in a fixed order."""
    h = hashlib.sha256()
    h.update(json.dumps(fingerprint_config(card), sort_keys=True, separators=(",", ":")).encode())
    for role, path in _weight_roles(card, folder):
        h.update(b"\0" + role.encode() + b"\0")
        if path.suffix == ".safetensors":
            _hash_tensors(h, path)
        elif path.suffix == ".json":
            try:
                h.update(
                    json.dumps(
                        json.loads(path.read_text(encoding="utf-8")), sort_keys=True, separators=(",", ":")
                    ).encode()
                )
            except ValueError:
                h.update(path.read_bytes())
        else:
            h.update(path.read_bytes())
    return "sha256:" + h.hexdigest()


def _weight_roles(card: dict[str, Any], folder: Path) -> list[tuple[str, Path]]:
    """(role, file) of each weight file: the encoder and text projection by role, not file name;
    the text folder's files by their name inside it."""
    files = weight_files(card, folder)
    roles = ["encoder", "text_projection"][: min(len(files), 2 if card.get("text") else 1)]
    text_dir = folder / card["text"]["folder"] if card.get("text") else None
    out = list(zip(roles, files))
    out += [(f"text/{p.relative_to(text_dir).as_posix()}", p) for p in files[len(roles) :]] if text_dir else []
    return out


def _hash_tensors(h: Any, path: Path) -> None:
    from safetensors import safe_open

    try:
        tensors = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors' own SafetensorError, or OSError: not a file of tensors
        raise UsageError(f"model file {path} is not a readable safetensors file ({one_line(exc)})") from None
    with tensors as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def legacy_fingerprint(card: dict[str, Any], folder: Path) -> str:
    """The fingerprint before it was made format-independent (the whole card, then each weight
    file's relative path and bytes): what heads fit before then record."""
    h = hashlib.sha256()
    h.update(canonical_json({k: v for k, v in card.items() if k != "distribution"}))
    for path in weight_files(card, folder):
        h.update(b"\0" + path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_card(folder: Path) -> dict[str, Any]:
    """Read and validate ``model.json``; errors name the file and every violation."""
    path = folder / CARD_NAME
    if not path.is_file():
        raise UsageError(f"{folder} is not a model folder: {CARD_NAME} is missing")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"model card {path} is not valid JSON: {exc}") from None
    schemas.validate("model", card, f"model card {path}")
    enc = card["encoder"]
    if any(s % enc["patch_size"] for s in card["preprocessing"]["input_size"]):
        raise UsageError(
            f"model card {path}: preprocessing.input_size {card['preprocessing']['input_size']} "
            f"is not a multiple of encoder.patch_size {enc['patch_size']}"
        )
    if enc["embed_dim"] % enc["num_heads"]:
        raise UsageError(
            f"model card {path}: encoder.embed_dim {enc['embed_dim']} is not divisible by num_heads {enc['num_heads']}"
        )
    bad = [i for i in enc["feature_layers"] if i >= enc["depth"]]
    if bad:
        raise UsageError(f"model card {path}: encoder.feature_layers {bad} exceed depth {enc['depth']}")
    missing = [str(p.relative_to(folder)) for p in weight_files(card, folder)[:2] if not p.is_file()]
    if missing:
        raise UsageError(f"model folder {folder} lacks files named by its card: {', '.join(missing)}")
    return card


def load_encoder_weights(encoder: VisionTransformer3D, path: Path) -> None:
    """Load safetensors weights strictly: a missing, extra or mis-shaped tensor is an error."""
    from safetensors.torch import load_file  # loaded with the weights, not with the module

    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors' own SafetensorError, or OSError: not a file of tensors
        raise UsageError(f"encoder weights {path} are not a readable safetensors file ({one_line(exc)})") from None
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        raise UsageError(
            f"encoder weights {path} do not match the model card's architecture: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, shape mismatches {shapes[:5]}"
        )
    encoder.load_state_dict({k: v.float() for k, v in state.items()})


class Model:
    """A loaded model folder: card, frozen encoder, fingerprint and (lazily) the text tower."""

    def __init__(self, folder: Path, card: dict[str, Any], encoder: VisionTransformer3D, fingerprint: str):
        self.folder = folder
        self.card = card
        self.encoder = encoder
        self.fingerprint = fingerprint
        self._text: TextTower | None = None

    @property
    def config(self) -> EncoderConfig:
        return self.encoder.config

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.card["preprocessing"]["input_size"])  # type: ignore[return-value]

    @property
    def grid(self) -> tuple[int, int, int]:
        return token_grid(self.input_size, self.patch_size)

    @property
    def feature_layers(self) -> list[int]:
        return list(self.config.feature_layers)

    @property
    def joint_dim(self) -> int:
        return self.config.joint_dim

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.card["preprocessing"]

    def grid_for(self, spatial: tuple[int, ...]) -> tuple[int, int, int]:
        return token_grid(spatial, self.patch_size)

    def text_tower(self) -> TextTower | None:
        """The text tower, loaded on first use; None when the card declares none."""
        if self._text is None and self.card.get("text"):
            from .text import TextTower  # the text tower (transformers) loads only when a query needs it

            self._text = TextTower.from_card(self.folder, self.card["text"], self.joint_dim)
        return self._text

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[Features]:
        """Plain eager fp32 encoding on the encoder's device (the reference every backend matches)."""
        grid = self.grid_for(tuple(images.shape[2:]))
        device = next(self.encoder.parameters()).device
        return split_features(self.encoder(images.to(device, torch.float32)), grid, self.feature_layers)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, folder={str(self.folder)!r}, fingerprint={self.fingerprint[:19]}...)"


DEFAULT_ARCHITECTURE = "vit3d"


def build_encoder(card: dict[str, Any]) -> VisionTransformer3D:
    """Build the encoder the card names (``encoder.architecture``, default ``vit3d``) through the
    ``register_encoders`` hook. The module must expose ``config`` (an :class:`EncoderConfig`) and
    return :data:`EncoderOutputs`; unknown architectures are a usage error naming the known ones."""
    from .plugins import get_encoders  # the plugin manager loads plugin modules, which import this one

    name = card["encoder"].get("architecture", DEFAULT_ARCHITECTURE)
    registry = get_encoders()
    if name not in registry:
        raise UsageError(f"unknown encoder architecture {name!r}; registered: {', '.join(sorted(registry)) or 'none'}")
    return registry[name].obj.build(card)


def load_model(path: str | Path | None = None) -> Model:
    """Load a model folder (None: the embedded default). Weights come from safetensors only."""
    folder = Path(path).expanduser().resolve() if path is not None else DEFAULT_MODEL_DIR
    card = read_card(folder)
    encoder = build_encoder(card)
    load_encoder_weights(encoder, folder / card["encoder"]["weights"])
    encoder.eval().requires_grad_(False)
    return Model(folder, card, encoder, compute_fingerprint(card, folder))
