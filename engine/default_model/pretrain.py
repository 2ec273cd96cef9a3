"""Pretraining of the embedded default model: the encoder, text tower and image-text projection,
trained jointly on synthetic studies with auxiliary head objectives:

- segmentation (cross-entropy + soft Dice) through a segment decoder on token-aligned crops,
- body region and contrast (classify), lesion volume (regress, on log1p),
- token lesion occupancy (a localize token MLP, BCE),
- image-report alignment (CLIP-style symmetric InfoNCE with a learned temperature),
- grounding: lesion phrases against a token projection (a softmax over tokens whose target is the
  lesion's tokens, plus a match score for the phrase's own scan).

Only the encoder and text side are kept: the shipped heads are fit afterwards on the frozen
encoder by engine.fitting (:mod:`engine.default_model.train`). Deterministic for a seed on the
same machine (fixed data order, seeded augmentation, two CPU threads).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from engine.fitting.trainers import dice_loss
from engine.model import VisionTransformer3D, build_encoder, load_encoder_weights, read_card

from .dataset import CONTRASTS, REGION_LIST, Sample

HEAD_NAMES = ("classify", "regress", "segment", "localize", "ground")
SEG_LAYERS = (1, 3, 5)
SEG_LABELS = ("background", "body", "organ", "fluid", "lesion")


@dataclass
class TrainConfig:
    seed: int = 0
    studies: int = 40
    steps: int = 1400
    batch: int = 8
    tiles_per_batch: int = 2  # of ``batch``: sliding-window tiles, for segmentation only
    crop_tokens: int = 4  # segmentation crops are this many tokens a side (the decoder dominates the cost)
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 30
    tiles_per_series: int = 1
    threads: int = 2
    # False: the image-only ablation, no report supervision (no image-report alignment, no
    # grounding); the text tower and projection keep their seeded initialisation
    report_supervision: bool = True


class Nets(nn.Module):
    """Everything trained together: encoder, text tower and projection, and the five head nets."""

    def __init__(
        self, encoder: VisionTransformer3D, bert: nn.Module, text_projection: nn.Linear, heads: dict[str, nn.Module]
    ):
        super().__init__()
        self.encoder = encoder
        self.bert = bert
        self.text_projection = text_projection
        self.heads = nn.ModuleDict(heads)
        self.clip_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # training only

    def encode_text(self, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
        """Mean-pooled, projected, L2-normalised text embeddings, as ``engine.text.TextTower``."""
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(self.text_projection(pooled), dim=-1)


class VolumeNet(nn.Module):
    """Lesion volume (mL) from concat(CLS, mean token): LayerNorm -> Linear -> GELU -> Linear -> softplus.
    An auxiliary objective of pretraining only (the shipped regress head is fit afterwards)."""

    def __init__(self, embed_dim: int = 128, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(2 * embed_dim), nn.Linear(2 * embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.mlp(torch.cat([cls, tokens.mean(dim=1)], dim=-1))).squeeze(-1)


def head_seed(name: str, seed: int) -> int:
    """Per-head seed (the same as ``contrib_heads.init_weights``), so a recipe run from seed 0
    starts from the initial head weights the shipped encoder was trained with."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def aux_heads(embed_dim: int, joint_dim: int, seed: int) -> dict[str, nn.Module]:
    """The head nets trained jointly with the encoder as auxiliary objectives: the nets of
    engine.fitting's head templates (the shipped heads' parameter layout), seeded per head."""
    from engine import head_nets
    from engine.fitting.heads import probe, segment  # the recipe loads the run path and fitting only when it runs

    builders = {
        "classify": lambda: probe.build_net(
            embed_dim,
            {
                "hidden": 0,
                "outputs": [
                    {"name": "region", "task": "classification", "labels": list(REGION_LIST)},
                    {"name": "contrast", "task": "classification", "labels": list(CONTRASTS)},
                ],
            },
        ),
        "regress": lambda: VolumeNet(embed_dim),
        "segment": lambda: segment.build_net(embed_dim, {"labels": list(SEG_LABELS), "widths": [32, 16, 8]}),
        # pretraining's auxiliary token objectives; the shipped localize and ground heads are dense detectors fit later
        "localize": lambda: head_nets.LocalizeNet(embed_dim, 64),
        "ground": lambda: head_nets.GroundNet(embed_dim, joint_dim),
    }
    heads = {}
    for name in HEAD_NAMES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed(name, seed))
            heads[name] = builders[name]()
    return heads


def initial_nets(model_dir: Path, seed: int = 0) -> tuple[Nets, Any, dict[str, Any]]:
    """Nets loaded from an initialised model folder (``build.build``), auxiliary heads seeded."""
    from safetensors.torch import load_file  # heavy: only building or training the default model needs it
    from transformers import BertModel, BertTokenizerFast  # heavy: only building or training the default model needs it
    from transformers.utils import logging as hf_logging  # heavy: only building or training the default model needs it

    card = read_card(model_dir)
    encoder = build_encoder(card)
    load_encoder_weights(encoder, model_dir / card["encoder"]["weights"])
    text_dir = model_dir / card["text"]["folder"]
    hf_logging.set_verbosity_error()
    tokenizer = BertTokenizerFast.from_pretrained(str(text_dir), local_files_only=True)
    bert = BertModel.from_pretrained(str(text_dir), local_files_only=True, add_pooling_layer=False)
    proj_state = load_file(str(model_dir / card["text"]["projection"]))
    projection = nn.Linear(proj_state["weight"].shape[1], proj_state["weight"].shape[0])
    projection.load_state_dict(proj_state)
    heads = aux_heads(card["encoder"]["embed_dim"], projection.out_features, seed)
    return Nets(encoder, bert, projection, heads), tokenizer, card


# --- batches ------------------------------------------------------------------------------------


class Batches:
    """Deterministic batches: global samples from distinct studies (so a report has one scan in
    the batch), then tiles, each drawn from its own reshuffled pass over the data."""

    def __init__(self, samples: list[Sample], n_global: int, n_tiles: int, seed: int):
        self.globals = [s for s in samples if s.kind == "global"]
        self.tiles = [s for s in samples if s.kind == "tile"]
        self.n_global, self.n_tiles = n_global, n_tiles if self.tiles else 0
        self.rng = np.random.default_rng(seed)
        self._g: list[int] = []
        self._t: list[int] = []

    def _take(self, pool: list[Sample], queue: list[int], n: int, distinct: bool) -> list[Sample]:
        out: list[Sample] = []
        studies: set[int] = set()
        skipped: list[int] = []
        refills = 0
        while len(out) < n:
            if not queue:
                if refills == 2:
                    break  # fewer studies than the batch wants
                queue.extend(self.rng.permutation(len(pool)).tolist())
                refills += 1
            i = queue.pop(0)
            if distinct and pool[i].study in studies:
                skipped.append(i)
                continue
            studies.add(pool[i].study)
            out.append(pool[i])
        queue[:0] = skipped
        return out

    def next(self) -> list[Sample]:
        return self._take(self.globals, self._g, self.n_global, True) + self._take(
            self.tiles, self._t, self.n_tiles, False
        )


def crop_offsets(
    labels: np.ndarray, grid: tuple[int, int, int], crop: int, patch: int, rng: np.random.Generator
) -> tuple[int, int, int]:
    """Token offsets of a crop centred near a foreground voxel: a lesion voxel 40% of the time and
    a fluid voxel 30% of the time when the sample has them, so the two small classes are seen often."""
    u = rng.random()
    lesion = np.argwhere(labels == 4) if u < 0.4 else np.empty((0, 3), int)
    fluid = np.argwhere(labels == 3) if 0.4 <= u < 0.7 else np.empty((0, 3), int)
    fg = lesion if len(lesion) else fluid if len(fluid) else np.argwhere(labels > 0)
    centre = fg[rng.integers(len(fg))] // patch if len(fg) else np.asarray(grid) // 2
    return tuple(int(np.clip(c - crop // 2 + rng.integers(0, 2), 0, g - crop)) for c, g in zip(centre, grid))  # type: ignore[return-value]


# --- losses -------------------------------------------------------------------------------------


def batch_losses(
    nets: Nets,
    tokenizer: Any,
    batch: list[Sample],
    config: TrainConfig,
    rng: np.random.Generator,
    gen: torch.Generator,
    max_length: int = 64,
) -> dict[str, torch.Tensor]:
    """Every loss of one batch (global samples first, then tiles)."""
    enc = nets.encoder
    patch = enc.config.patch_size
    x = torch.from_numpy(np.stack([s.image for s in batch]))[:, None]
    scale = 1 + 0.1 * (2 * torch.rand(len(batch), 1, 1, 1, 1, generator=gen) - 1)
    shift = 0.1 * (2 * torch.rand(len(batch), 1, 1, 1, 1, generator=gen) - 1)
    x = x * scale + shift + 0.03 * torch.randn(x.shape, generator=gen)
    grid = tuple(s // patch for s in x.shape[2:])
    cls, tokens, layers, joint = enc(x)
    g = [i for i, s in enumerate(batch) if s.kind == "global"]
    gs = [batch[i] for i in g]
    losses: dict[str, torch.Tensor] = {}

    # segmentation on token-aligned crops
    c = min(config.crop_tokens, *grid)
    seg_layers = {idx: [] for idx in SEG_LAYERS}
    images, targets = [], []
    feature_layers = list(enc.config.feature_layers)
    for b, s in enumerate(batch):
        o = crop_offsets(s.labels, grid, c, patch, rng)
        tsl = tuple(slice(v, v + c) for v in o)
        vsl = tuple(slice(v * patch, (v + c) * patch) for v in o)
        for idx in SEG_LAYERS:
            t = layers[b, feature_layers.index(idx)].transpose(0, 1).reshape(-1, *grid)
            seg_layers[idx].append(t[(slice(None), *tsl)])
        images.append(x[b][(slice(None), *vsl)])
        targets.append(torch.from_numpy(s.labels[vsl].astype(np.int64)))
    deep, mid, shallow = (torch.stack(seg_layers[i]) for i in sorted(SEG_LAYERS, reverse=True))
    logits = nets.heads["segment"]([deep, mid, shallow], torch.stack(images))
    target = torch.stack(targets)
    weight = torch.tensor(SEG_CLASS_WEIGHTS)
    losses["seg"] = F.cross_entropy(logits, target, weight=weight) + dice_loss(logits, target)

    if not gs:
        return losses
    gi = torch.tensor(g)
    cls_g, tok_g, joint_g = cls[gi], tokens[gi], joint[gi]
    out = nets.heads["classify"](torch.cat([cls_g, tok_g.mean(dim=1)], dim=-1))
    losses["region"] = F.cross_entropy(out["region"], torch.tensor([s.region for s in gs]))
    losses["contrast"] = F.cross_entropy(out["contrast"], torch.tensor([s.contrast for s in gs]))
    volume = nets.heads["regress"](cls_g, tok_g)
    losses["volume"] = F.smooth_l1_loss(torch.log1p(volume), torch.log1p(torch.tensor([s.lesion_volume for s in gs])))
    occ = torch.from_numpy(np.stack([s.token_lesion for s in gs]))
    losses["localize"] = F.binary_cross_entropy_with_logits(
        nets.heads["localize"](tok_g), occ, pos_weight=torch.tensor(8.0)
    )

    if not config.report_supervision:
        return losses
    # image-report alignment and grounding share one text-tower pass
    phrases = [(j, p, m) for j, s in enumerate(gs) for p, m in zip(s.phrases, s.phrase_tokens)]
    texts = [s.report for s in gs] + [p for _, p, _ in phrases]
    emb = nets.encode_text(tokenizer, texts, max_length)
    reports, phrase_emb = emb[: len(gs)], emb[len(gs) :]
    if len(gs) > 1:
        sim = nets.clip_scale.clamp(max=math.log(100.0)).exp() * joint_g @ reports.T
        labels = torch.arange(len(gs))
        losses["clip"] = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
    if phrases:
        ground = nets.heads["ground"]
        proj = ground(tok_g)  # (G, N, E)
        gscale = ground.logit_scale.clamp(max=math.log(100.0)).exp()
        owner = torch.tensor([j for j, _, _ in phrases])
        sims = torch.einsum("pe,gne->pgn", phrase_emb, proj)  # every phrase against every scan's tokens
        own = sims[torch.arange(len(phrases)), owner]  # (P, N)
        mask = torch.from_numpy(np.stack([m for _, _, m in phrases]).astype(np.float32))
        losses["ground"] = -(F.log_softmax(gscale * own, dim=-1) * (mask / mask.sum(-1, keepdim=True))).sum(-1).mean()
        peak = sims.max(dim=-1).values  # (P, G)
        match = F.one_hot(owner, len(gs)).float()
        losses["ground_score"] = F.binary_cross_entropy_with_logits(gscale.detach() * peak + ground.score_bias, match)
    return losses


# What report supervision adds; the image-only ablation (TrainConfig.report_supervision=False) drops them.
TEXT_LOSSES = ("clip", "ground", "ground_score")
# Contrast and grounding learn slowest (near chance at equal weights), so they weigh more.
LOSS_WEIGHTS = {
    "seg": 1.0,
    "region": 0.5,
    "contrast": 1.0,
    "volume": 0.5,
    "localize": 1.0,
    "clip": 0.5,
    "ground": 1.0,
    "ground_score": 0.2,
}
# Cross-entropy class weights (background, body, organ, fluid, lesion): the small classes weigh
# more, else the decoder learns to ignore them.
SEG_CLASS_WEIGHTS = (1.0, 1.0, 1.0, 3.0, 6.0)


def train(nets: Nets, tokenizer: Any, samples: list[Sample], config: TrainConfig, log: Any = print) -> list[float]:
    """Train ``nets`` in place for ``config.steps`` steps; returns the total loss of every step."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    batches = Batches(samples, config.batch - config.tiles_per_batch, config.tiles_per_batch, config.seed)
    nets.train()
    opt = torch.optim.AdamW(nets.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: list[float] = []
    running: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(config.steps):
        losses = batch_losses(nets, tokenizer, batches.next(), config, rng, gen)
        total = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(float(total.detach()))
        for k, v in losses.items():
            running[k] = 0.9 * running.get(k, float(v.detach())) + 0.1 * float(v.detach())
        if log and (step % 50 == 0 or step == config.steps - 1):
            parts = " ".join(f"{k} {v:.3f}" for k, v in running.items())
            log(f"step {step:4d} loss {total.item():.3f} | {parts} | {time.perf_counter() - t0:.0f}s")
    nets.eval()
    return history


# --- saving -------------------------------------------------------------------------------------


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous().clone() for k, v in module.state_dict().items()}


def save_model(nets: Nets, init_dir: Path, out: Path, card: dict[str, Any]) -> None:
    """Write the trained model folder: the initial folder's tokenizer files, trained weights, card."""
    out.mkdir(parents=True, exist_ok=True)
    text_dir = out / card["text"]["folder"]
    if text_dir.resolve() != (init_dir / card["text"]["folder"]).resolve():
        shutil.copytree(init_dir / card["text"]["folder"], text_dir, dirs_exist_ok=True)
    save_file(_state(nets.encoder), str(out / card["encoder"]["weights"]))
    save_file(_state(nets.bert), str(text_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(_state(nets.text_projection), str(out / card["text"]["projection"]))
    write_card(out, card)


def write_card(folder: Path, card: dict[str, Any]) -> None:
    (folder / "model.json").write_text(json.dumps(card, indent=2) + "\n")
