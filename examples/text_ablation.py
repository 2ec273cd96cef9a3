"""What report supervision adds: the embedded model's recipe run twice from the same seeded
initialisation and data, once as shipped (image-report alignment and grounding among the
pretraining objectives) and once image-only, each with the same heads fit on its frozen encoder,
both scored by ``mrfm evaluate`` on the same held-out archive; a third arm fits the same heads on
the seeded initialisation itself (no pretraining), the random-encoder floor.

    python examples/text_ablation.py --out /tmp/ablation [--studies 16] [--steps 300]
        [--heads classify,localize,ground] [--heldout DIR]

Without ``--heldout`` a held-out archive is written from seed 100 (44 studies, 107 series: no
training archive uses that seed). Each arm runs in its own process (``--arm``): pretrain into
``OUT/<arm>/model``, fit the heads into ``OUT/<arm>/heads``, register them in place of the
contrib heads of the same names and evaluate them with ``retrieve`` (which uses the model's joint
embedding and has no weights). The table prints both arms side by side with the chance floor.
Reduced budgets on purpose: both arms pay the same, so the difference is the objective's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

# arm -> report supervision in pretraining; None: no pretraining at all (the seeded initialisation),
# the random-encoder floor of the same heads through the same fit and evaluate path
ARMS = {"report-supervised": True, "image-only": False, "random-encoder": None}


def _register_fitted(heads_dir: Path, names: list[str]) -> None:
    """Put the fitted packages in place of the contrib heads of the same names (no pip install)."""
    from engine import plugins

    plugins.disable([f"contrib_heads.{name}" for name in names])
    for name in names:
        pkg = next(p for p in (heads_dir / name).iterdir() if (p / "__init__.py").exists())
        spec = importlib.util.spec_from_file_location(
            pkg.name, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[pkg.name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        plugins.pm.register(module, name=f"ablation_{name}")


def run_arm(arm: str, out: Path, heldout: Path, studies: int, steps: int, names: list[str]) -> dict:
    import torch

    from engine.default_model.dataset import write_training_archives
    from engine.default_model.pretrain import TrainConfig
    from engine.default_model.train import fit_heads, pretrain_model
    from engine.fitting.evaluation import evaluate

    torch.set_num_threads(2)
    archives = write_training_archives(out / "data", studies, first_seed=1)  # same seeds for both arms
    config = TrainConfig(studies=studies, steps=steps, report_supervision=ARMS[arm] is not False)
    model_dir = out / arm / "model"
    if not (model_dir / "model.json").exists():
        if ARMS[arm] is None:
            from engine.default_model import build

            build.build(model_dir, seed=config.seed)
        else:
            pretrain_model(config, model_dir, archives)
    fit_heads(
        model_dir,
        [m.root for m in archives],
        out / arm / "heads",
        names=tuple(names),
        cache_dir=out / arm / "features",
        floor=False,
    )
    _register_fitted(out / arm / "heads", names)
    return evaluate(heldout, store=out / arm / "heldout.zarr", model=model_dir, heads=[*names, "retrieve"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--studies", type=int, default=16, help="training studies (archive seeds 1, 2, ...)")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per arm")
    parser.add_argument("--heads", default="classify,localize,ground")
    parser.add_argument("--heldout", type=Path, help="held-out synthetic archive (default: seed 100, 44 studies)")
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [n for n in args.heads.split(",") if n]
    heldout = args.heldout or args.out / "heldout"
    if args.arm:
        result = run_arm(args.arm, args.out, heldout, args.studies, args.steps, names)
        (args.out / args.arm / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
        return 0
    if not args.heldout and not (heldout / "dicom").exists():
        from engine.synthetic import write_demo_archive

        write_demo_archive(heldout, studies=44, seed=100)
    results = {}
    for arm in ARMS:
        (args.out / arm).mkdir(parents=True, exist_ok=True)
        if (args.out / arm / "metrics.json").exists():  # a finished arm is not run again
            results[arm] = json.loads((args.out / arm / "metrics.json").read_text())
            continue
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--out",
                str(args.out),
                "--studies",
                str(args.studies),
                "--steps",
                str(args.steps),
                "--heads",
                args.heads,
                "--heldout",
                str(heldout),
                "--arm",
                arm,
            ],
            check=True,
        )
        results[arm] = json.loads((args.out / arm / "metrics.json").read_text())
    rows = {arm: {(r["head"], r["metric"]): r for r in res["rows"]} for arm, res in results.items()}
    first = next(iter(rows.values()))
    print(
        f"{results['report-supervised']['series']} held-out series; {args.studies} training studies, "
        f"{args.steps} pretraining steps per pretrained arm"
    )
    print(f"| head | metric | {' | '.join(ARMS)} | chance floor |\n|---|---|{'---|' * len(ARMS)}---|")
    for key, r in first.items():
        values = [rows[arm].get(key, {}).get("value") for arm in ARMS]
        print(f"| {key[0]} | {key[1]} | {' | '.join(_fmt(v) for v in values)} | {_fmt(r.get('floor'))} |")
    return 0


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "—" if value is None else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
