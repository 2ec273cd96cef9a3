"""Reproduce the embedded default model and its heads from scratch, in one command:

    python -m engine.default_model.train --out DIR [--seed 0] [--studies 40] [--steps 1400]
        [--fit-steps N] [--no-floor] [--write-into contrib_heads] [--heads classify,...] [--image-only]

or, to refit only the heads on the frozen shipped encoder (no initialisation, no pretraining):

    python -m engine.default_model.train --out DIR --refit [--studies 96] [--heads classify,segment]
        [--write-weights-into contrib_heads]

1. initialisation: tokenizer, text tower and encoder from a seed (:mod:`.build`);
2. data: synthetic training archives from seeds 1, 2, ... (seed 0, the demo archive, is held out);
3. pretraining: encoder and text tower with auxiliary head objectives (:mod:`.pretrain`),
   written as a model folder to ``DIR/model``;
4. heads: each one fit on the frozen pretrained encoder by :func:`engine.fitting.fit` (features
   cached in ``DIR/features``, split by study, random-encoder floor), written as a head package
   to ``DIR/heads/<name>``;
5. ``--write-into FOLDER``: each head's module files (template, manifest, weights) written whole
   into ``FOLDER/<name>/``. Nothing edits a file in place.

``--refit`` skips steps 1 and 3: the heads are fit on the frozen encoder of ``--model`` (default:
the shipped one, whose weights are never touched). ``--write-weights-into FOLDER`` then replaces
only ``FOLDER/<name>/weights.safetensors`` and the manifest's ``fit`` record and fitted parameter
defaults, keeping each head's own module (the contrib heads' nets share the templates' parameter
names; class rows are put in the module's label order).
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

from engine.errors import UsageError
from engine.model import compute_fingerprint, read_card

from .dataset import prepare_samples, write_training_archives
from .pretrain import (
    HEAD_NAMES,
    LOSS_WEIGHTS,
    TEXT_LOSSES,
    SEG_CLASS_WEIGHTS,
    TrainConfig,
    initial_nets,
    save_model,
    train,
)

__all__ = [
    "contrib_weights",
    "fit_heads",
    "pretrain_model",
    "refit_recipe",
    "run_recipe",
    "write_into",
    "write_weights_into",
]


def pretrain_model(config: TrainConfig, model_dir: Path, archives: list[Any], log: Any = print) -> str:
    """Build the seeded initialisation, pretrain on ``archives``, write ``model_dir``; returns its fingerprint."""
    from . import build  # the recipe loads the run path and fitting only when it runs

    with tempfile.TemporaryDirectory(prefix="mrfm-init-") as tmp:
        init_dir = Path(tmp) / "init"
        build.build(init_dir, seed=config.seed)
        nets, tokenizer, card = initial_nets(init_dir, seed=config.seed)
        samples = prepare_samples(
            archives, card["preprocessing"], nets.encoder.config.patch_size, config.seed, config.tiles_per_series
        )
        n_global = sum(s.kind == "global" for s in samples)
        log(f"data: {config.studies} studies, {n_global} series, {len(samples) - n_global} tiles")
        history = train(nets, tokenizer, samples, config, log)
        card["training"] = {
            "status": "trained",
            "recipe": (
                f"python -m engine.default_model.train --out DIR --seed {config.seed} --studies {config.studies} "
                f"--steps {config.steps}{'' if config.report_supervision else ' --image-only'}"
            ),
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
            "optimizer": {
                "name": "AdamW",
                "lr": config.lr,
                "weight_decay": config.weight_decay,
                "schedule": "linear warmup, cosine",
            },
            "losses": {k: v for k, v in LOSS_WEIGHTS.items() if config.report_supervision or k not in TEXT_LOSSES},
            "segmentation_class_weights": list(SEG_CLASS_WEIGHTS),
            "final_loss": round(float(np.mean(history[-20:])), 4),
            "heads": "fit afterwards on the frozen encoder by engine.fitting.fit",
        }
        save_model(nets, init_dir, model_dir, card)
    return compute_fingerprint(read_card(model_dir), model_dir)


def fit_heads(
    model_dir: Path,
    archive_roots: list[Path],
    heads_dir: Path,
    *,
    names: tuple[str, ...] = HEAD_NAMES,
    cache_dir: Path | None = None,
    steps: int = 0,
    floor: bool = True,
    seed: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Fit each head kind on the frozen encoder of ``model_dir`` (labels: the archives' ground
    truth) and write its package to ``heads_dir/<name>``; returns the fit results by name."""
    from engine.fitting import fit  # the recipe loads the run path and fitting only when it runs
    from engine.model import load_model  # the recipe loads the run path and fitting only when it runs

    model = load_model(model_dir)  # loaded once, shared by every fit
    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = fit(
            name,
            list(archive_roots),
            heads_dir / name,
            model=model,
            name=name,
            cache_dir=cache_dir,
            steps=steps,
            floor=floor,
            seed=seed,
        )
        if log:
            log(f"{name}: {json.dumps(results[name].metrics)} ({time.perf_counter() - t0:.0f}s)")
    return results


def write_into(folder: Path, results: dict[str, Any]) -> list[Path]:
    """Write each fitted head's module (template ``__init__.py``, ``manifest.json`` by json.dump,
    safetensors weights) whole into ``folder/<name>/``, e.g. the repository's ``contrib_heads``."""
    from engine.fitting.package import write_module  # the recipe loads the run path and fitting only when it runs

    return [write_module(Path(folder) / name, r.kind, r.manifest, r.fitted.state) for name, r in results.items()]


def contrib_weights(result: Any, manifest: dict[str, Any], shipped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fitted head's state in the layout of an existing head module (``manifest`` and its
    ``shipped`` weights): the same parameter names and shapes, score rows in the manifest's label
    order. Raises UsageError when the nets differ (e.g. a probe fit with a hidden layer)."""
    state = {k: v.clone() for k, v in result.fitted.state.items()}
    fitted_outputs = {o["name"]: o for o in result.manifest["outputs"]}
    for out in manifest["outputs"]:
        fo = fitted_outputs.get(out["name"])
        if out["kind"] == "scores" and fo is not None and fo.get("labels") != out.get("labels"):
            if sorted(fo["labels"]) != sorted(out["labels"]):
                raise UsageError(f"{manifest['name']}/{out['name']}: fitted labels {fo['labels']} != {out['labels']}")
            order = [fo["labels"].index(label) for label in out["labels"]]
            for suffix in ("weight", "bias"):
                key = f"{out['name']}.{suffix}"
                if key in state:
                    state[key] = state[key][order].contiguous()
        if out["kind"] == "mask" and fo is not None and fo.get("labels") != out.get("labels"):
            raise UsageError(
                f"{manifest['name']}/{out['name']}: fitted labels {fo.get('labels')} != {out.get('labels')}"
            )
    got = {k: tuple(v.shape) for k, v in state.items()}
    want = {k: tuple(v.shape) for k, v in shipped.items()}
    if got != want:
        raise UsageError(
            f"{manifest['name']}: the fitted net does not match the module's ({sorted(set(got) ^ set(want)) or 'shapes differ'})"
        )
    return state


def write_weights_into(folder: Path, results: dict[str, Any]) -> list[Path]:
    """Replace each head's ``weights.safetensors`` in ``folder/<name>/`` with the fitted weights
    and record the fit in its manifest (``fit``, encoder fingerprint, fitted parameter defaults),
    keeping the module that is there. Heads whose nets differ are refused before anything is written."""
    from safetensors.torch import load_file, save_file  # heavy: only building or training the default model needs it

    from engine import schemas  # the recipe loads the run path and fitting only when it runs

    staged = []
    for name, r in results.items():
        head_dir = Path(folder) / name
        manifest = json.loads((head_dir / "manifest.json").read_text())
        weights = head_dir / manifest["weights"]
        state = contrib_weights(r, manifest, load_file(str(weights)))
        manifest["encoder"]["fingerprint"] = r.manifest["encoder"]["fingerprint"]
        for key, spec in r.manifest.get("parameters", {}).items():
            if key in manifest.get("parameters", {}) and "default" in spec:
                manifest["parameters"][key]["default"] = spec["default"]
        manifest["fit"] = r.manifest["fit"]
        schemas.validate("head", manifest, f"head {name!r}")
        staged.append((head_dir, manifest, weights, state, r.kind))
    for head_dir, manifest, weights, state, kind in staged:
        save_file(state, str(weights), metadata={"fit_kind": kind})
        (head_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return [s[0] for s in staged]


def refit_recipe(
    out: Path,
    *,
    studies: int = 96,
    names: tuple[str, ...] = HEAD_NAMES,
    model_dir: Path | None = None,
    fit_steps: int = 0,
    floor: bool = False,
    seed: int = 0,
    threads: int = 2,
    write_to: Path | None = None,
    anatomy_studies: int = 0,
    assets: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Fit ``names`` on the frozen encoder of ``model_dir`` (default: the shipped model) from
    training archives of seeds 1, 2, ... (never 0), plus ``anatomy_studies`` studies from real
    anatomy (seeds 101, ...; needs ``assets``); optionally write the weights into ``write_to``."""
    from engine.default_model.assets import require  # the recipe loads the run path and fitting only when it runs
    from engine.model import DEFAULT_MODEL_DIR  # the recipe loads the run path and fitting only when it runs

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out = Path(out)
    if anatomy_studies:
        require(assets)  # before any archive is written
    archives = write_training_archives(out / "data", studies, first_seed=1)
    if anatomy_studies:
        from .anatomy_data import write_anatomy_training_archives  # needs nibabel and the assets: only this recipe

        archives += write_anatomy_training_archives(out / "data", anatomy_studies, assets)  # type: ignore[arg-type]
    results = fit_heads(
        Path(model_dir or DEFAULT_MODEL_DIR),
        [m.root for m in archives],
        out / "heads",
        names=names,
        cache_dir=out / "features",
        steps=fit_steps,
        floor=floor,
        seed=seed,
        log=log,
    )
    seeds = sorted(m.seed for m in archives)
    generators = "engine.synthetic.write_demo_archive" + (
        " (seeds < 100) and engine.synthetic.anatomy_archive.write_anatomy_archive (seeds >= 101)"
        if anatomy_studies
        else ""
    )
    for r in results.values():  # name the data by generator and seeds, not by this machine's paths
        r.manifest["fit"]["data"]["labels"] = f"synthetic ground truth ({generators})"
        r.manifest["fit"]["data"]["archive_seeds"] = seeds
        anatomy = f" --anatomy-studies {anatomy_studies} --assets ASSETS" if anatomy_studies else ""
        r.manifest["fit"]["recipe"] = (
            f"python -m engine.default_model.train --out DIR --refit --studies {studies}{anatomy} "
            f"--heads {r.name}{' --no-floor' if not floor else ''} --write-weights-into contrib_heads"
        )
    if write_to is not None:
        write_weights_into(write_to, results)
    return {
        "archive_seeds": sorted(m.seed for m in archives),
        "seconds": round(time.perf_counter() - t0, 1),
        "heads": {n: {"metrics": r.metrics, "floor": r.floor, "seconds": r.seconds} for n, r in results.items()},
    }


def run_recipe(
    config: TrainConfig,
    out: Path,
    *,
    names: tuple[str, ...] = HEAD_NAMES,
    fit_steps: int = 0,
    floor: bool = True,
    write_to: Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Initialise, generate data, pretrain, fit every head; ``out/model``, ``out/heads``, ``out/features``."""
    torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    out = Path(out)
    archives = write_training_archives(out / "data", config.studies, first_seed=1)
    fingerprint = pretrain_model(config, out / "model", archives, log)
    log(f"pretrained in {time.perf_counter() - t0:.0f}s; model {fingerprint}")
    results = fit_heads(
        out / "model",
        [m.root for m in archives],
        out / "heads",
        names=names,
        cache_dir=out / "features",
        steps=fit_steps,
        floor=floor,
        seed=config.seed,
        log=log,
    )
    if write_to is not None:
        write_into(write_to, results)
    log(f"recipe done in {time.perf_counter() - t0:.0f}s")
    return {
        "fingerprint": fingerprint,
        "config": asdict(config),
        "seconds": round(time.perf_counter() - t0, 1),
        "heads": {n: {"metrics": r.metrics, "floor": r.floor} for n, r in results.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, required=True, help="output folder: model/, heads/, features/, data/")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--studies", type=int, default=defaults.studies, help="training studies (archive seeds 1, 2, ...)"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="pretraining steps")
    parser.add_argument("--fit-steps", type=int, default=0, help="head fitting steps (0: each kind's default)")
    parser.add_argument("--no-floor", action="store_true", help="skip the random-encoder floor of each head")
    parser.add_argument("--write-into", type=Path, help="also write each head module whole into FOLDER/<name>/")
    parser.add_argument(
        "--refit", action="store_true", help="no pretraining: fit the heads on the frozen encoder of --model"
    )
    parser.add_argument("--model", type=Path, help="with --refit: the model folder (default: the shipped model)")
    parser.add_argument("--heads", default=",".join(HEAD_NAMES), help="comma-separated heads to fit")
    parser.add_argument(
        "--image-only",
        action="store_true",
        help="ablation: pretrain without report supervision (no image-report alignment, no grounding)",
    )
    parser.add_argument(
        "--anatomy-studies",
        type=int,
        default=0,
        help="with --refit: also this many studies from real anatomy (engine.synthetic.anatomy_archive; needs --assets)",
    )
    parser.add_argument(
        "--assets", type=Path, help="anatomy assets folder (python -m engine.default_model.assets fetch DIR)"
    )
    parser.add_argument(
        "--write-weights-into",
        type=Path,
        help="with --refit: replace FOLDER/<name>/weights.safetensors and its manifest's fit record, keeping the module",
    )
    args = parser.parse_args(argv)
    names = tuple(n for n in args.heads.split(",") if n)
    unknown = set(names) - set(HEAD_NAMES)
    if unknown:
        parser.error(f"unknown heads {sorted(unknown)}; choose from {', '.join(HEAD_NAMES)}")
    if args.refit:
        if args.image_only:
            parser.error("--image-only changes pretraining; --refit does not pretrain")
        result = refit_recipe(
            args.out,
            studies=args.studies,
            names=names,
            model_dir=args.model,
            fit_steps=args.fit_steps,
            floor=not args.no_floor,
            seed=args.seed,
            write_to=args.write_weights_into,
            anatomy_studies=args.anatomy_studies,
            assets=args.assets,
        )
        print(json.dumps(result, indent=2, default=str))
        return
    config = TrainConfig(seed=args.seed, studies=args.studies, steps=args.steps, report_supervision=not args.image_only)
    result = run_recipe(
        config, args.out, names=names, fit_steps=args.fit_steps, floor=not args.no_floor, write_to=args.write_into
    )
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
