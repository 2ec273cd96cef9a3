"""Fit one head net on cached features, per kind, and measure it on the validation studies.

Every trainer takes the training and validation series (features + labels) and returns a
:class:`Fitted`: the net's state dict, the configuration its head module reads from the manifest,
the validation metrics, and the manifest outputs/parameters. Runs are seeded and use the CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import UsageError
from engine.geometry import LPS_TO_RAS

from . import detection_training
from .fit_result import Fitted
from .fit_result import optimise as _optimise
from .fit_result import state_of as _state
from . import metrics as M
from .cache import SeriesFeatures
from .heads import probe as probe_t
from .heads import segment as segment_t
from .labels import LabelSet, SeriesLabels

Pair = tuple[SeriesFeatures, SeriesLabels]


@dataclass
class Options:
    steps: int = 0  # 0: the kind's default
    lr: float = 0.0
    hidden: int = 0  # probes: 0 linear, else an MLP hidden width
    batch: int = 0
    seed: int = 0
    crop_tokens: int = 4  # segmentation crops, tokens a side
    rare_fraction: float = 0.5  # segmentation: share of crops centred on the rarest foreground class (lesions)
    log: Callable[[str], None] | None = None


# --- probes (classification, regression) ----------------------------------------------------------


def _pooled(f: SeriesFeatures) -> np.ndarray:
    return np.concatenate([f.cls, f.tokens.mean(axis=0)])


def fit_probe(kind: str, labels: LabelSet, train: list[Pair], val: list[Pair], opt: Options) -> Fitted:
    torch.manual_seed(opt.seed)
    d = train[0][0].cls.shape[0]
    xt = torch.from_numpy(np.stack([_pooled(f) for f, _ in train])).float()
    xv = torch.from_numpy(np.stack([_pooled(f) for f, _ in val])).float() if val else xt[:0]
    outs: list[dict[str, Any]] = []
    yt: dict[str, torch.Tensor] = {}
    yv: dict[str, np.ndarray] = {}
    for t in labels.targets:
        name = _name(t)
        if kind == "classify":
            classes = sorted({lab.values[t] for _, lab in train + val if t in lab.values})
            if len(classes) < 2:
                where = f"{labels.source}: " if labels.source else ""
                raise UsageError(f"{where}target {t!r} has fewer than two classes in the labels")
            idx = {c: i for i, c in enumerate(classes)}
            yt[name] = torch.tensor([idx.get(lab.values.get(t), -100) for _, lab in train])
            yv[name] = np.asarray([idx.get(lab.values.get(t), -100) for _, lab in val])
            outs.append({"name": name, "column": t, "task": "classification", "labels": classes})
        else:
            raw = np.asarray([lab.values.get(t, np.nan) for _, lab in train], float)
            log1p = bool(np.nanmin(raw) >= 0)
            z = np.log1p(raw) if log1p else raw
            mean, std = float(np.nanmean(z)), float(np.nanstd(z) or 1.0)
            yt[name] = torch.from_numpy((z - mean) / std).float()
            yv[name] = np.asarray([lab.values.get(t, np.nan) for _, lab in val], float)
            outs.append(
                {
                    "name": name,
                    "column": t,
                    "task": "regression",
                    "mean": mean,
                    "std": std,
                    "transform": "log1p" if log1p else "none",
                }
            )
    cfg = {"kind": kind, "hidden": opt.hidden, "outputs": outs}
    net = probe_t.build_net(d, cfg)

    def loss(_: int) -> torch.Tensor:
        raw = net(xt)
        total = torch.zeros(())
        for o in outs:
            r, y = raw[o["name"]], yt[o["name"]]
            if o["task"] == "classification":
                total = total + F.cross_entropy(r, y, ignore_index=-100)
            else:
                ok = ~torch.isnan(y)
                total = total + F.smooth_l1_loss(r[ok, 0], y[ok])
        return total

    _optimise(net, loss, opt.steps or 300, opt.lr or 1e-2, wd=5e-2, log=opt.log, name=kind)
    uncalibrated: dict[str, np.ndarray] = {}
    with torch.no_grad():
        raw_val = {k: v.numpy() for k, v in net(xv).items()} if val else {}
    for o in outs:
        if o["task"] == "classification" and val:
            # temperature scaling on the validation studies: the head divides its logits by it
            uncalibrated[o["name"]] = torch.from_numpy(raw_val[o["name"]]).softmax(dim=-1).numpy()
            o["temperature"] = round(M.fit_temperature(raw_val[o["name"]], yv[o["name"]]), 4)
    with torch.no_grad():
        pred = {k: v.numpy() for k, v in probe_t.decode(cfg, net(xv)).items()} if val else {}
    mets: dict[str, Any] = {}
    for o in outs:
        if not val:
            continue
        y = yv[o["name"]]
        if o["task"] == "classification":
            ok = y >= 0
            mets[o["name"]] = {
                "accuracy": M.r4(M.accuracy(pred[o["name"]][ok], y[ok])),
                "auroc": M.r4(M.auroc(pred[o["name"]][ok], y[ok])),
                "chance_accuracy": M.r4(M.majority_rate(y[ok])),
                "ece_uncalibrated": M.r4(M.ece(uncalibrated[o["name"]][ok], y[ok])),
                "ece": M.r4(M.ece(pred[o["name"]][ok], y[ok])),
                "temperature": o["temperature"],
            }
        else:
            ok = ~np.isnan(y)
            mets[o["name"]] = {"mae": M.r4(M.mae(pred[o["name"]][ok], y[ok])), "chance_mae": M.r4(M.median_mae(y[ok]))}
    decl = []
    for o in outs:
        if o["task"] == "classification":
            decl.append(
                {
                    "name": o["name"],
                    "kind": "scores",
                    "dtype": "float32",
                    "shape": ["C"],
                    "labels": o["labels"],
                    "range": [0, 1],
                    "description": f"Probability of each {o['column']} class (softmax).",
                }
            )
        else:
            decl.append(
                {
                    "name": o["name"],
                    "kind": "value",
                    "dtype": "float32",
                    "shape": [],
                    "units": "1",
                    "description": f"Predicted {o['column']}.",
                }
            )
    return Fitted(_state(net), cfg, mets, decl, {"view": "global", "features": ["cls", "tokens"]})


def _name(column: str) -> str:

    name = re.sub(r"[^a-z0-9_]", "_", column.lower()).strip("_") or "value"
    return name if name[0].isalpha() and name not in probe_t.RESERVED else "out_" + name


# --- segmentation ---------------------------------------------------------------------------------


def read_label_map(path: Any) -> tuple[np.ndarray, np.ndarray]:
    """A label map and its voxel -> RAS affine: a NIfTI image, or a DICOM Segmentation whose
    segment numbers are the labels (highdicom; frames placed by their own plane positions)."""
    path = Path(path)
    with open(path, "rb") as fh:
        is_dicom = fh.read(132)[128:] == b"DICM"
    if is_dicom:
        import highdicom as hd  # heavy: loaded only by the code path that reads or writes that format

        volume = hd.seg.segread(str(path)).get_volume(combine_segments=True)
        return np.asarray(volume.array).astype(np.int64), LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)
    import nibabel as nib  # heavy: loaded only by the code path that reads or writes that format

    img = nib.load(str(path))
    return np.asarray(img.dataobj).astype(np.int64), np.asarray(img.affine, dtype=np.float64)


def labels_on_grid(label_path: Any, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A label map (:func:`read_label_map`) on a grid: each grid voxel takes the label voxel
    nearest its centre, 0 outside the map. Rounded, not truncated, so a centre that lands a
    rounding error past the last label voxel (DICOM positions are decimal strings) still finds it."""
    data, label_affine = read_label_map(label_path)
    m = np.linalg.inv(label_affine) @ np.asarray(affine, dtype=np.float64)  # grid voxel -> label voxel
    shape = tuple(int(n) for n in shape[:3])
    out = np.zeros(shape, dtype=np.int64)
    ij = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), -1).reshape(-1, 2)
    for k in range(shape[2]):  # a plane at a time keeps memory to one plane of coordinates
        grid = np.column_stack([ij, np.full(len(ij), k)])
        idx = np.rint(grid @ m[:3, :3].T + m[:3, 3]).astype(np.int64)
        inside = ((idx >= 0) & (idx < np.asarray(data.shape[:3]))).all(axis=1)
        plane = np.zeros(len(ij), dtype=np.int64)
        plane[inside] = data[tuple(idx[inside].T)]
        out[:, :, k] = plane.reshape(shape[:2])
    return out


def _seg_layers(feature_layers: list[int]) -> list[int]:
    fl = sorted(feature_layers)
    return [fl[-1], fl[len(fl) // 2], fl[0]]


def _windows(pairs: list[Pair]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]]:
    """(layers (L, N, D), image (X, Y, Z), labels (X, Y, Z), grid) per tile window."""
    out = []
    for f, lab in pairs:
        for w in range(len(f.tile_layers)):
            image = f.tile_images[w]
            patch = f.view_shape[0] // f.grid[0]
            grid = tuple(int(s) // patch for s in image.shape)
            out.append((f.tile_layers[w], image, labels_on_grid(lab.mask, f.tile_affines[w], image.shape), grid))
    return out


def fit_segment(labels: LabelSet, train: list[Pair], val: list[Pair], opt: Options, model: Any) -> Fitted:
    torch.manual_seed(opt.seed)
    rng = np.random.default_rng(opt.seed)
    fl = train[0][0].feature_layers
    use = _seg_layers(fl)
    li = [fl.index(i) for i in use]
    tw, vw = _windows(train), _windows(val)
    n_classes = max(int(max(w[2].max() for w in tw + vw)) + 1, len(labels.classes), 2)
    classes = labels.classes or ["background"] + [f"label_{c}" for c in range(1, n_classes)]
    cfg = {
        "kind": "segment",
        "labels": classes,
        "layers": use,
        "output": "anatomy" if labels.classes else "mask",
        "widths": [32, 16, 8],
    }
    d = tw[0][0].shape[-1]
    # channels-last 3D convolutions train about twice as fast on CPU (oneDNN); the saved state is
    # made contiguous by _state, so the weights do not depend on it
    net = segment_t.build_net(d, cfg).to(memory_format=torch.channels_last_3d)
    counts = np.bincount(np.concatenate([w[2].ravel() for w in tw]), minlength=len(classes)).astype(float)
    freq = counts / counts.sum()
    # cross-entropy weights grow with the square root of rarity (capped): a class of a few hundred
    # voxels per window (lesions) is otherwise never predicted
    weight = torch.tensor(np.clip(np.sqrt(freq.max() / np.maximum(freq, 1e-6)), 1.0, 20.0), dtype=torch.float32)
    present = [[c for c in range(1, len(classes)) if (w[2] == c).any()] for w in tw]
    seen = [c for c in range(1, len(classes)) if counts[c] > 0]
    rare = min(seen, key=lambda c: counts[c]) if seen else None  # the rarest foreground class
    rare_windows = [i for i, p in enumerate(present) if rare in p]
    batch = opt.batch or 4

    def crop(i: int, focus: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        layers, image, lab, grid = tw[i]
        c = min(opt.crop_tokens, *grid)
        patch = image.shape[0] // grid[0]
        if focus is not None:
            fg = np.argwhere(lab == focus)
        else:
            fg = np.argwhere(lab == rng.choice(present[i])) if present[i] and rng.random() < 0.9 else np.empty((0, 3))
        centre = fg[rng.integers(len(fg))] // patch if len(fg) else rng.integers(0, grid)
        o = [int(np.clip(cc - c // 2 + rng.integers(0, 2), 0, g - c)) for cc, g in zip(centre, grid)]
        tsl = tuple(slice(v, v + c) for v in o)
        vsl = tuple(slice(v * patch, (v + c) * patch) for v in o)
        grids = [torch.from_numpy(layers[j]).T.reshape(-1, *grid)[(slice(None), *tsl)] for j in li]
        return grids, torch.from_numpy(image[vsl])[None], torch.from_numpy(lab[vsl])

    def loss(_: int) -> torch.Tensor:
        items = []
        for _ in range(batch):  # a share of the crops centred on the rarest class, from the windows that hold it
            if rare_windows and rng.random() < opt.rare_fraction:
                items.append(crop(int(rare_windows[rng.integers(len(rare_windows))]), rare))
            else:
                items.append(crop(int(rng.integers(0, len(tw)))))
        layers = [torch.stack([it[0][j] for it in items]) for j in range(3)]
        logits = net(layers, torch.stack([it[1] for it in items]).contiguous(memory_format=torch.channels_last_3d))
        target = torch.stack([it[2] for it in items])
        return focal_loss(logits, target, weight) + dice_loss(logits, target)

    _optimise(net, loss, opt.steps or 1500, opt.lr or 3e-3, log=opt.log, name="segment")
    dice = M.DiceCounter(classes)
    with torch.no_grad():
        for layers, image, lab, grid in vw:
            g = [torch.from_numpy(layers[j]).T.reshape(1, -1, *grid) for j in li]
            pred = net(g, torch.from_numpy(image)[None, None]).argmax(dim=1)[0].numpy()
            dice.add(pred, lab)
    mets = {"dice": dice.dice(), "chance_dice": dice.floor(), "windows": len(vw)} if vw else {}
    decl = [
        {
            "name": cfg["output"],
            "kind": "mask",
            "dtype": "uint8",
            "labels": classes,
            "activation": "softmax",
            "description": "Per-voxel label probabilities (softmax); stored as the argmax label on the native grid "
            "(probabilities resampled there first): a voxel is lesion when lesion is its most probable label.",
        }
    ]
    return Fitted(
        _state(net), cfg, mets, decl, {"view": "tiles", "image": True, "features": [f"layers[{i}]" for i in use]}
    )


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Class-weighted focal loss: cross-entropy scaled by (1 - p_true)^gamma, so the many easy
    background voxels stop drowning the few hard lesion-edge voxels."""
    logp = F.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    w = weight.to(logits.dtype)[target]
    return (-((1 - logp.exp()) ** gamma) * logp * w).sum() / w.sum()


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice over the foreground classes present in the batch."""
    c = logits.shape[1]
    probs = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target, c).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return (1 - dice[present]).mean() if present.any() else logits.sum() * 0


# --- boxes: localization and grounding (dense detectors, engine.fitting.detection_training) -------


def fit_kind(kind: str, labels: LabelSet, train: list[Pair], val: list[Pair], opt: Options, model: Any) -> Fitted:
    if kind in ("classify", "regress"):
        return fit_probe(kind, labels, train, val, opt)
    if kind == "segment":
        return fit_segment(labels, train, val, opt, model)
    if kind == "localize":
        return detection_training.fit_localize(labels, train, val, opt)
    return detection_training.fit_ground(labels, train, val, opt, model)
