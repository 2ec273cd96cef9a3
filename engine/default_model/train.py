"""Reproduce the embedded default model and its heads from scratch, in one command:

    python -m engine.default_model.train --out DIR [--seed 0] [--studies 40] [--steps 1400]
        [--fit-steps N] [--no-floor] [--write-into contrib_heads]

1. initialisation: tokenizer, text tower and encoder from a seed (:mod:`.build`);
2. data: synthetic training archives from seeds 1, 2, ... (seed 0, the demo archive, is held out);
3. pretraining: encoder and text tower with auxiliary head objectives (:mod:`.pretrain`),
   written as a model folder to ``DIR/model``;
4. heads: each one fit on the frozen pretrained encoder by :func:`engine.fitting.fit` (features
   cached in ``DIR/features``, split by study, random-encoder floor), written as a head package
   to ``DIR/heads/<name>``;
5. ``--write-into FOLDER``: each head's module files (template, manifest, weights) written whole
   into ``FOLDER/<name>/``. Nothing edits a file in place.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.model import compute_fingerprint, read_card

from .dataset import prepare_samples, write_training_archives
from .pretrain import HEAD_NAMES, LOSS_WEIGHTS, SEG_CLASS_WEIGHTS, TrainConfig, initial_nets, save_model, train, write_card

__all__ = ["fit_heads", "pretrain_model", "run_recipe", "write_into"]


def pretrain_model(config: TrainConfig, model_dir: Path, archives: list[Any], log: Any = print) -> str:
    """Build the seeded initialisation, pretrain on ``archives``, write ``model_dir``; returns its fingerprint."""
    from . import build

    with tempfile.TemporaryDirectory(prefix="mrfm-init-") as tmp:
        init_dir = Path(tmp) / "init"
        build.build(init_dir, seed=config.seed)
        nets, tokenizer, card = initial_nets(init_dir, seed=config.seed)
        samples = prepare_samples(archives, card["preprocessing"], nets.encoder.config.patch_size, config.seed, config.tiles_per_series)
        n_global = sum(s.kind == "global" for s in samples)
        log(f"data: {config.studies} studies, {n_global} series, {len(samples) - n_global} tiles")
        history = train(nets, tokenizer, samples, config, log)
        card["training"] = {
            "status": "trained",
            "recipe": f"python -m engine.default_model.train --out DIR --seed {config.seed} --studies {config.studies} --steps {config.steps}",
            "seed": config.seed,
            "initialisation": f"python -m engine.default_model.build --seed {config.seed}",
            "data": {
                "generator": "engine.synthetic.write_demo_archive",
                "archive_seeds": sorted(m.seed for m in archives),
                "studies": config.studies,
                "series": n_global,
                "tiles": len(samples) - n_global,
                "held_out": "seed 0 (the demo archive)",
            },
            "steps": config.steps,
            "batch": config.batch,
            "optimizer": {"name": "AdamW", "lr": config.lr, "weight_decay": config.weight_decay, "schedule": "linear warmup, cosine"},
            "losses": dict(LOSS_WEIGHTS),
            "segmentation_class_weights": list(SEG_CLASS_WEIGHTS),
            "final_loss": round(float(np.mean(history[-20:])), 4),
            "heads": "fit afterwards on the frozen encoder by engine.fitting.fit",
        }
        save_model(nets, init_dir, model_dir, card)
    return compute_fingerprint(read_card(model_dir), model_dir)


def fit_heads(model_dir: Path, archive_roots: list[Path], heads_dir: Path, *, names: tuple[str, ...] = HEAD_NAMES,
              cache_dir: Path | None = None, steps: int = 0, floor: bool = True, seed: int = 0,
              log: Any = print) -> dict[str, Any]:
    """Fit each head kind on the frozen encoder of ``model_dir`` (labels: the archives' ground
    truth) and write its package to ``heads_dir/<name>``; returns the fit results by name."""
    from engine.fitting import fit
    from engine.model import load_model

    model = load_model(model_dir)  # loaded once, shared by every fit
    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = fit(name, list(archive_roots), heads_dir / name, model=model, name=name, cache_dir=cache_dir,
                            steps=steps, floor=floor, seed=seed)
        if log:
            log(f"{name}: {json.dumps(results[name].metrics)} ({time.perf_counter() - t0:.0f}s)")
    return results


def write_into(folder: Path, results: dict[str, Any]) -> list[Path]:
    """Write each fitted head's module (template ``__init__.py``, ``manifest.json`` by json.dump,
    safetensors weights) whole into ``folder/<name>/``, e.g. the repository's ``contrib_heads``."""
    from engine.fitting.package import write_module

    return [write_module(Path(folder) / name, r.kind, r.manifest, r.fitted.state) for name, r in results.items()]


def run_recipe(config: TrainConfig, out: Path, *, fit_steps: int = 0, floor: bool = True, write_to: Path | None = None,
               log: Any = print) -> dict[str, Any]:
    """Initialise, generate data, pretrain, fit every head; ``out/model``, ``out/heads``, ``out/features``."""
    torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    out = Path(out)
    archives = write_training_archives(out / "data", config.studies, first_seed=1)
    fingerprint = pretrain_model(config, out / "model", archives, log)
    log(f"pretrained in {time.perf_counter() - t0:.0f}s; model {fingerprint}")
    results = fit_heads(out / "model", [m.root for m in archives], out / "heads", cache_dir=out / "features",
                        steps=fit_steps, floor=floor, seed=config.seed, log=log)
    if write_to is not None:
        write_into(write_to, results)
    log(f"recipe done in {time.perf_counter() - t0:.0f}s")
    return {"fingerprint": fingerprint, "config": asdict(config), "seconds": round(time.perf_counter() - t0, 1),
            "heads": {n: {"metrics": r.metrics, "floor": r.floor} for n, r in results.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, required=True, help="output folder: model/, heads/, features/, data/")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--studies", type=int, default=defaults.studies, help="training studies (archive seeds 1, 2, ...)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="pretraining steps")
    parser.add_argument("--fit-steps", type=int, default=0, help="head fitting steps (0: each kind's default)")
    parser.add_argument("--no-floor", action="store_true", help="skip the random-encoder floor of each head")
    parser.add_argument("--write-into", type=Path, help="also write each head module whole into FOLDER/<name>/")
    args = parser.parse_args(argv)
    config = TrainConfig(seed=args.seed, studies=args.studies, steps=args.steps)
    result = run_recipe(config, args.out, fit_steps=args.fit_steps, floor=not args.no_floor, write_to=args.write_into)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
