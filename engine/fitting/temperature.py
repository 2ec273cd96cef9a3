"""Temperature scaling of a fitted classification head on labelled validation studies.

``mrfm fit`` already fits a temperature per classification output on its own validation split;
this recalibrates an existing head (a package from ``mrfm fit classify``, or the contrib classify
head, whose net has the same parameter names) without refitting it: encode the labelled series
(feature cache), compute the head's logits, fit T per output by minimising the negative
log-likelihood, and write T into the manifest's ``fit.config.outputs`` (where the head reads it)
with the expected calibration error before and after under ``fit.calibration``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import UsageError
from . import metrics as M


def calibrate_head(
    head_dir: str | Path,
    data: str | Path,
    *,
    archive: str | Path | None = None,
    model: Any = None,
    cache_dir: str | Path | None = None,
    backend: str = "torch",
    write: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fit and (``write``) store the temperatures of the head in ``head_dir`` (its manifest.json
    and weights.safetensors) on the labels in ``data``; returns the ``fit.calibration`` record."""
    from safetensors.torch import load_file

    from engine.discover import scan
    from engine.model import load_model

    from .cache import FeatureCache
    from .heads.probe import build_net
    from .labels import archive_root, match, read_labels

    folder = Path(head_dir)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise UsageError(f"{folder}: no manifest.json (give the folder holding the head's manifest and weights)")
    manifest = json.loads(manifest_path.read_text())
    cfg = (manifest.get("fit") or {}).get("config") or {}
    outputs = [o for o in cfg.get("outputs", []) if o.get("task") == "classification"]
    if manifest.get("fit", {}).get("kind") != "classify" or not outputs:
        raise UsageError(
            f"{folder}: not a fitted classification head (its manifest has no fit.config classification outputs)"
        )
    mdl = load_model(model) if not hasattr(model, "fingerprint") else model
    want = manifest.get("encoder", {}).get("fingerprint")
    if want and want != mdl.fingerprint:
        raise UsageError(f"{folder}: the head was fit on encoder {want[:19]}…, the model is {mdl.fingerprint[:19]}…")
    net = build_net(mdl.embed_dim, {**cfg, "outputs": cfg["outputs"]})
    net.load_state_dict(load_file(str(folder / manifest.get("weights", "weights.safetensors"))))
    net.eval()

    targets = [o["column"] for o in outputs]
    labels = read_labels(data, "classify", targets)
    root = archive or archive_root(data)
    if root is None:
        raise UsageError("--archive is needed: the folder holding the labelled series")
    pairs = match(labels, list(scan([Path(root)]).series))
    feats = FeatureCache(mdl, cache_dir, backend=backend).get_many([r for r, _ in pairs], log=log)
    x = torch.from_numpy(np.stack([np.concatenate([f.cls, f.tokens.mean(axis=0)]) for f in feats])).float()
    with torch.no_grad():
        raw = {k: v.numpy() for k, v in net(x).items()}
    record: dict[str, Any] = {
        "data": labels.source,
        "series": len(pairs),
        "studies": len({lab.study_uid for _, lab in pairs}),
        "method": "temperature scaling (NLL), ECE over 10 equal-width confidence bins",
    }
    declared = {d["name"]: d.get("labels") for d in manifest.get("outputs", [])}
    for o in outputs:
        # the net's rows follow the declared labels (the contrib head reorders them), else the fit's
        idx = {c: i for i, c in enumerate(declared.get(o["name"]) or o["labels"])}
        y = np.asarray([idx.get(lab.values.get(o["column"]), -1) for _, lab in pairs])
        ok = y >= 0
        logits = raw[o["name"]][ok]
        t = M.fit_temperature(logits, y[ok])
        before = torch.from_numpy(logits).softmax(-1).numpy()
        after = torch.from_numpy(logits / t).softmax(-1).numpy()
        record[o["name"]] = {
            "temperature": round(t, 4),
            "ece_before": M.r4(M.ece(before, y[ok])),
            "ece_after": M.r4(M.ece(after, y[ok])),
            "accuracy": M.r4(M.accuracy(after, y[ok])),
            "n": int(ok.sum()),
        }
        o["temperature"] = round(t, 4)
    if write:
        manifest["fit"]["calibration"] = record
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return record
