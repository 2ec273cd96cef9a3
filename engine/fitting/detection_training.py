"""Training the dense detectors of ``localize`` and ``ground`` on cached tiles-view features.

Both heads are :class:`engine.head_nets.CentreNet` on one tiles window (the image at the model's
spacing plus the deep, mid and shallow encoder layers); ground adds the query's text embedding by
FiLM. Training samples crops of whole tokens, most centred on a lesion (lesions are a few cells of
a large window), with the CenterNet focal loss on the centre map and L1 on size and offset at
centre cells. Validation decodes whole windows exactly as the heads do, maps boxes to world mm,
merges overlapping windows, and picks the score threshold by detection metrics (recall at IoU 0.3
under a false-box budget, clean lesion-free series), never by whether a box contains a centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.centre_boxes import centre_boxes, centre_targets
from engine.errors import UsageError
from engine.geometry import apply_affine, world_to_voxel
from engine.head_nets import CentreNet
from engine.token_boxes import nms3d

from .detection_metrics import DetectionCounter, as_boxes
from .detection_metrics import box_iou3d
from .fit_result import Fitted, optimise, state_of

STRIDE = CentreNet.stride
THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.05, 0.96, 0.05))
MAX_FALSE_PER_SERIES = 1.0
MIN_CLEAN = 0.8


@dataclass
class Window:
    """One tiles window of one series: token grids [deep, mid, shallow], image, world affine,
    true boxes in window voxel edges and their phrases, and the detection targets."""

    series: int
    layers: list[torch.Tensor]
    image: torch.Tensor
    affine: np.ndarray
    boxes: np.ndarray
    texts: list[str]
    targets: tuple[torch.Tensor, ...] = ()
    per_box: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def layer_order(feature_layers: list[int]) -> list[int]:
    """[deep, mid, shallow] encoder layers among those cached."""
    fl = sorted(feature_layers)
    return [fl[-1], fl[len(fl) // 2], fl[0]]


def to_window(box: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A world box (6,) as edges in a window's continuous voxel coordinates."""
    c = world_to_voxel(affine, np.stack([box[:3], box[3:]]))
    return np.concatenate([c.min(axis=0), c.max(axis=0)])


def to_world(boxes: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Window voxel boxes (N, 6) as world RAS boxes (views are axis-aligned RAS grids)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 6)
    lo, hi = apply_affine(affine, boxes[:, :3]), apply_affine(affine, boxes[:, 3:])
    return np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi)], axis=1)


def _t(*arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def windows_of(pairs: list[Any], per_box: bool = False) -> list[Window]:
    out = []
    for s, (f, lab) in enumerate(pairs):
        use = [f.feature_layers.index(i) for i in layer_order(f.feature_layers)]
        patch = f.view_shape[0] // f.grid[0]
        for w in range(len(f.tile_layers)):
            image = f.tile_images[w]
            grid = tuple(int(n) // patch for n in image.shape)
            layers = [torch.from_numpy(f.tile_layers[w][j]).T.reshape(-1, *grid).contiguous() for j in use]
            affine = np.asarray(f.tile_affines[w], np.float64)
            boxes = np.stack([to_window(b, affine) for b in lab.boxes]) if lab.boxes else np.zeros((0, 6))
            out_grid = tuple(-(-int(n) // STRIDE) for n in image.shape)
            win = Window(s, layers, torch.from_numpy(image)[None], affine, boxes, list(lab.texts))
            win.targets = _t(*centre_targets(boxes, out_grid, STRIDE))
            if per_box:
                win.per_box = [_t(*centre_targets(b[None], out_grid, STRIDE)) for b in boxes]
            out.append(win)
    return out


def focal_centre_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of centres (at least 1)."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat >= 1.0
    pos_loss = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    neg_loss = -((1 - heat) ** 4 * p**2 * torch.log(1 - p))[~pos].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def box_loss(
    size: torch.Tensor, off: torch.Tensor, t_size: torch.Tensor, t_off: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    m = mask[:, None].expand_as(size)
    if not m.any():
        return size.sum() * 0
    return F.l1_loss(size[m], t_size[m]) + F.l1_loss(off[m], t_off[m])


class Cropper:
    """Crops of ``tokens`` tokens a side, a share centred on a true box (lesion-aware sampling)."""

    def __init__(self, windows: list[Window], tokens: int, focus: float, rng: np.random.Generator):
        self.windows, self.tokens, self.focus, self.rng = windows, tokens, focus, rng
        self.with_box = [i for i, w in enumerate(windows) if len(w.boxes)]

    def pick(self) -> int:
        if self.with_box and self.rng.random() < self.focus:
            return int(self.with_box[self.rng.integers(len(self.with_box))])
        return int(self.rng.integers(len(self.windows)))

    def crop(self, i: int, box: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor, tuple[slice, ...]]:
        """Token grids, image and the output-grid slices of one crop of window ``i``."""
        w = self.windows[i]
        grid = w.layers[0].shape[1:]
        patch = w.image.shape[1] // grid[0]
        c = [min(self.tokens, g) for g in grid]
        if len(w.boxes) and (box is not None or self.rng.random() < 0.8):
            b = w.boxes[box if box is not None else self.rng.integers(len(w.boxes))]
            centre = ((b[:3] + b[3:]) / 2 + 0.5) // patch
        else:
            centre = self.rng.integers(0, grid)
        o = [int(np.clip(cc - n // 2 + self.rng.integers(-1, 2), 0, g - n)) for cc, n, g in zip(centre, c, grid)]
        tsl = tuple(slice(a, a + n) for a, n in zip(o, c))
        vsl = tuple(slice(a * patch, (a + n) * patch) for a, n in zip(o, c))
        osl = tuple(slice(a * patch // STRIDE, (a + n) * patch // STRIDE) for a, n in zip(o, c))
        return [g[(slice(None), *tsl)] for g in w.layers], w.image[(slice(None), *vsl)], osl


def decode_series(
    net: CentreNet, windows: list[Window], threshold: float, max_boxes: int, text: torch.Tensor | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """World boxes and scores per series (windows merged by NMS), as the head and engine produce them."""
    by_series: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    with torch.no_grad():
        for w in windows:
            heat, size, off = net([g[None] for g in w.layers], w.image[None], text)
            boxes, scores = centre_boxes(
                torch.sigmoid(heat[0]), size[0], off[0], STRIDE, threshold, max_boxes, image_shape=w.image.shape
            )
            by_series.setdefault(w.series, []).append((to_world(boxes, w.affine), scores))
    out = []
    for s in sorted(by_series):
        boxes = np.concatenate([b for b, _ in by_series[s]])
        scores = np.concatenate([sc for _, sc in by_series[s]])
        keep = nms3d(boxes, scores, 0.3)[:max_boxes] if len(boxes) else np.zeros(0, int)
        out.append((boxes[keep], scores[keep]))
    return out


def choose_threshold(
    preds: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray]
) -> tuple[float, dict[str, Any]]:
    """The score threshold on the validation series: the highest recall at IoU 0.3 with at most
    one false box per series and no box on most lesion-free series; failing that, the best F1."""
    rows = []
    for t in THRESHOLDS:
        det = DetectionCounter()
        for (b, s), truth in zip(preds, truths):
            keep = s >= t
            det.add(b[keep], s[keep], truth)
        rec, fps = det.recall(0.3) or 0.0, det.false_per_series(0.3) or 0.0
        clean, _ = det.clean_fraction()
        tp = rec * det.n_truth
        n_pred = tp + fps * det.n_series
        f1 = 2 * tp / (n_pred + det.n_truth) if n_pred + det.n_truth else 0.0
        rows.append((t, rec, fps, 1.0 if clean is None else clean, f1, det))
    ok = [r for r in rows if r[2] <= MAX_FALSE_PER_SERIES and r[3] >= MIN_CLEAN]
    best = max(ok, key=lambda r: (r[1], -r[2])) if ok else max(rows, key=lambda r: r[4])
    det = best[5]
    mets = {
        "recall@0.3": round(best[1], 4),
        "recall@0.5": round(det.recall(0.5) or 0.0, 4),
        "false_boxes_per_series": round(best[2], 4),
        "mean_best_iou": round(det.mean_best_iou() or 0.0, 4),
        "clean_fraction": round(best[3], 4),
        "ap@0.3": round(det.average_precision(0.3) or 0.0, 4),
        "threshold": best[0],
        "lesions": det.n_truth,
        "series": det.n_series,
    }
    return float(best[0]), mets


def fit_centre_net(
    train: list[Any],
    val: list[Any],
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    crop_tokens: int = 4,
    focus: float = 0.7,
    width: int = 24,
    log: Callable[[str], None] | None = None,
    text: dict[str, torch.Tensor] | None = None,
) -> tuple[CentreNet, list[Window]]:
    """Train a CentreNet (FiLM-conditioned on ``text`` phrases when given); returns it and the
    validation windows."""

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    grounding = text is not None
    tw, vw = windows_of(train, per_box=grounding), windows_of(val, per_box=grounding)
    d = tw[0].layers[0].shape[0]
    net = CentreNet(d, width, next(iter(text.values())).shape[-1] if grounding else 0)
    cropper = Cropper(tw, crop_tokens, focus, rng)
    phrases = sorted(text) if grounding else []

    def loss(_: int) -> torch.Tensor:
        items, queries, targets = [], [], []
        for _ in range(batch):
            i = cropper.pick()
            w = tw[i]
            k = int(rng.integers(len(w.boxes))) if len(w.boxes) else None
            layers, image, osl = cropper.crop(i, k)
            if grounding:
                absent = k is None or rng.random() < 0.25
                phrase = phrases[rng.integers(len(phrases))] if absent else w.texts[k]
                if absent and phrase in w.texts:  # a phrase that names a lesion of this window is its own target
                    k, absent = w.texts.index(phrase), False
                if absent:
                    tg = tuple(torch.zeros_like(t) for t in w.targets)
                else:
                    tg = w.per_box[k]
                queries.append(text[phrase])
            else:
                tg = w.targets
            items.append((layers, image))
            targets.append(tuple(t[(slice(None), *osl)] if t.dim() == 4 else t[osl] for t in tg))
        layers = [torch.stack([it[0][j] for it in items]) for j in range(3)]
        heat, size, off = net(layers, torch.stack([it[1] for it in items]), torch.stack(queries) if grounding else None)
        t_heat, t_size, t_off, t_mask = (torch.stack([t[j] for t in targets]) for j in range(4))
        return focal_centre_loss(heat, t_heat) + 0.5 * box_loss(size, off, t_size, t_off, t_mask)

    optimise(net, loss, steps, lr, wd=1e-4, log=log, name="ground" if grounding else "localize")
    return net, vw


def world_truths(val: list[Any]) -> list[np.ndarray]:
    return [as_boxes(np.stack(lab.boxes)) if lab.boxes else np.zeros((0, 6)) for _, lab in val]


def best_iou(box: np.ndarray, truth: np.ndarray) -> float:
    return float(box_iou3d(as_boxes(box), as_boxes(truth))[0, 0])


def _inputs(feature_layers: list[int], text: bool = False) -> dict[str, Any]:
    feats = [f"layers[{i}]" for i in layer_order(feature_layers)]
    return {"view": "tiles", "image": True, "features": feats + (["text"] if text else [])}


def _fit_with_options(train: list[Any], val: list[Any], opt: Any, width: int, text: Any = None) -> Any:
    """fit_centre_net with the fit's options and the dense heads' defaults."""
    return fit_centre_net(
        train,
        val,
        steps=opt.steps or 1500,
        lr=opt.lr or 2e-3,
        batch=opt.batch or 8,
        seed=opt.seed,
        crop_tokens=opt.crop_tokens,
        width=width,
        log=opt.log,
        text=text,
    )


def fit_localize(labels: Any, train: list[Any], val: list[Any], opt: Any) -> Any:

    width = opt.hidden or 24
    net, vw = _fit_with_options(train, val, opt, width)
    threshold, mets = 0.3, {}
    if val:
        threshold, mets = choose_threshold(decode_series(net, vw, min(THRESHOLDS), 16), world_truths(val))
    cfg = {"kind": "localize", "width": width, "label": "lesion", "layers": layer_order(train[0][0].feature_layers)}
    decl = [
        {
            "name": "lesions",
            "kind": "boxes",
            "dtype": "float32",
            "shape": ["N", 6],
            "labels": [cfg["label"]],
            "description": "Boxes (i0, j0, k0, i1, j1, k1) around detected lesions with their centre probability.",
        }
    ]
    params = {
        "threshold": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": threshold,
            "description": "Minimum centre probability of a box (chosen on the validation studies by recall at IoU 0.3 with at most one false box per series).",
        },
        "iou": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.3,
            "description": "3D IoU above which a lower-scoring box is dropped.",
        },
        "max_boxes": {
            "type": "integer",
            "minimum": 1,
            "default": 16,
            "description": "At most this many boxes per window.",
        },
    }
    return Fitted(state_of(net), cfg, mets, decl, _inputs(train[0][0].feature_layers), params)


def fit_ground(labels: Any, train: list[Any], val: list[Any], opt: Any, model: Any) -> Any:

    tower = model.text_tower()
    if tower is None:
        raise UsageError("grounding needs a model with a text tower")
    texts = sorted({t for _, lab in train + val for t in lab.texts})
    if not any(lab.texts for _, lab in train):
        raise UsageError("no training series has a text with a box")
    emb = {t: e.detach().float() for t, e in zip(texts, tower.encode(texts))}
    width = opt.hidden or 24
    net, vw = _fit_with_options(train, val, opt, width, text=emb)
    threshold, mets = 0.1, {}
    if val:
        threshold, mets = _ground_metrics(net, vw, val, emb)
    cfg = {
        "kind": "ground",
        "width": width,
        "text_dim": int(next(iter(emb.values())).shape[-1]),
        "layers": layer_order(train[0][0].feature_layers),
    }
    decl = [
        {
            "name": "regions",
            "kind": "boxes",
            "dtype": "float32",
            "shape": ["N", 6],
            "labels": ["found", "not found"],
            "description": "One box per text query (i0, j0, k0, i1, j1, k1) at its best centre, its query and centre probability; labelled 'not found' when that probability is below the threshold.",
        }
    ]
    params = {
        "queries": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Text queries (--query TEXT, repeatable, or the job file).",
        },
        "threshold": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": threshold,
            "description": "A query whose best centre probability is below this is labelled 'not found' (chosen on the validation studies).",
        },
    }
    return Fitted(state_of(net), cfg, mets, decl, _inputs(train[0][0].feature_layers, text=True), params)


def _ground_metrics(
    net: CentreNet, vw: list[Window], val: list[Any], emb: dict[str, torch.Tensor]
) -> tuple[float, dict[str, Any]]:
    """Each validation series asked for its own lesions' phrases (hit at IoU 0.3) and for a phrase
    of another series' lesion (should get no box); the threshold maximises the share answered right."""
    rng = np.random.default_rng(0)
    phrases = sorted(emb)
    present, absent = [], []  # (best score, IoU with the target) / best score
    for s, (_, lab) in enumerate(val):
        wins = [w for w in vw if w.series == s]
        asked = list(zip(lab.texts, lab.boxes))
        other = [p for p in phrases if p not in lab.texts]
        for q in [t for t, _ in asked] + ([other[rng.integers(len(other))]] if other else []):
            ((boxes, scores),) = decode_series(net, wins, 0.0, 1, emb[q][None])
            target = dict(asked).get(q)
            score = float(scores[0]) if len(scores) else 0.0
            if target is not None:
                present.append((score, best_iou(boxes[0], target) if len(boxes) else 0.0))
            else:
                absent.append(score)
    rows = []
    for t in (0.0, *THRESHOLDS):
        right = sum(sc >= t and iou >= 0.3 for sc, iou in present) + sum(sc < t for sc in absent)
        rows.append((right / max(len(present) + len(absent), 1), -t, t))
    threshold = max(rows)[2]
    hits = [sc >= threshold and iou >= 0.3 for sc, iou in present]
    return threshold, {
        "hit@0.3": round(float(np.mean(hits)), 4) if hits else None,
        "hit@0.3_any_score": round(float(np.mean([iou >= 0.3 for _, iou in present])), 4) if present else None,
        "absent_rejected": round(float(np.mean([sc < threshold for sc in absent])), 4) if absent else None,
        "threshold": threshold,
        "queries": len(present),
    }
