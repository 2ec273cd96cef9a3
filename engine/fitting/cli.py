"""Click commands for fitting, evaluation and model import: ``fit``, ``evaluate`` and the ``model``
group (``model import``). Each calls a library function; the main CLI adds them with
``cli.add_command``. Imports stay inside the commands so ``mrfm --help`` stays fast."""

from __future__ import annotations

import json
import shlex
from typing import Any

import click
from rich.console import Console
from rich.table import Table

console = Console()


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flat(f"{prefix}.{k}" if prefix else str(k), v)]
    return [(prefix, value)]


@click.command("fit")
@click.argument("kind", type=click.Choice(["classify", "regress", "segment", "localize", "ground"]))
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True),
    help="Label table (CSV/Parquet) or a synthetic archive's root.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the head package (pip install it).")
@click.option(
    "--archive",
    type=click.Path(exists=True),
    help="Images of the labelled series (default: the synthetic archive's dicom/).",
)
@click.option(
    "--model", type=click.Path(exists=True, file_okay=False), help="Model folder (default: the embedded model)."
)
@click.option("--backend", default="torch", show_default=True, help="Encoder backend for features not yet cached.")
@click.option("--name", help="Head name (default: the --out folder's name).")
@click.option(
    "--target", "targets", multiple=True, help="Label columns to fit (classify/regress; default: every column)."
)
@click.option("--classes", help="Segmentation label names, background first, comma-separated.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Feature store folder (default: $MRFM_FEATURE_CACHE or the user cache).",
)
@click.option("--val-fraction", default=0.25, show_default=True, type=click.FloatRange(0, 0.9))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", default=0, type=click.IntRange(0), help="Optimiser steps (0: the kind's default).")
@click.option("--hidden", default=0, type=click.IntRange(0), help="Probe hidden width (0: linear).")
@click.option("--no-floor", is_flag=True, help="Skip the random-encoder floor.")
@click.option("--json", "as_json", is_flag=True, help="Print the fit record as JSON.")
def fit_command(
    kind,
    data,
    out,
    archive,
    model,
    backend,
    name,
    targets,
    classes,
    cache_dir,
    val_fraction,
    seed,
    steps,
    hidden,
    no_floor,
    as_json,
) -> None:
    """Fit a KIND head on the frozen encoder's cached features and write it as a head package."""
    from .fitter import fit  # each command loads its own part of fitting

    result = fit(
        kind,
        data,
        out,
        archive=archive,
        model=model,
        backend=backend,
        name=name,
        targets=list(targets) or None,
        classes=classes.split(",") if classes else None,
        cache_dir=cache_dir,
        val_fraction=val_fraction,
        seed=seed,
        floor=not no_floor,
        steps=steps,
        hidden=hidden,
        log=None if as_json else (lambda m: console.print(f"[dim]{m}[/]", highlight=False)),
    )
    record = result.manifest["fit"]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": result.name,
                    "package": str(result.package) if result.package else None,
                    "encoded": result.encoded,
                    "seconds": result.seconds,
                    **record,
                },
                indent=2,
            )
        )
        return
    floor = dict(_flat("", result.floor or {}))
    table = Table(title=f"{result.name} ({kind}) on {record['data']['validation_series']} validation series")
    for col in ("metric", "value", "random-encoder floor"):
        table.add_column(col)
    for key, value in _flat("", result.metrics):
        table.add_row(key, _fmt(value), _fmt(floor.get(key)))
    console.print(table)
    console.print(
        f"features {result.seconds['features']}s ({result.encoded} views encoded), fit {result.seconds['fit']}s"
    )
    if result.package:
        # a path pip cannot take for a package name ("pip install region-head" asks the index)
        folder = result.package.parent.resolve()
        click.echo(f"wrote {folder}\ninstall it with: pip install {shlex.quote(str(folder))}")


@click.command("evaluate")
@click.argument("archive", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--store",
    type=click.Path(file_okay=False),
    help="Result store to run into or score (default: ARCHIVE/evaluation.zarr).",
)
@click.option("--model", type=click.Path(exists=True, file_okay=False))
@click.option("--heads", "heads", multiple=True, help="Heads to score (default: all installed).")
@click.option("--backend", default="torch", show_default=True)
@click.option("--no-run", is_flag=True, help="Score the store as it is.")
@click.option("--overwrite", is_flag=True, help="Redo every series in the store.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the metrics as JSON.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), help="Write the table as Markdown.")
def evaluate_command(archive, store, model, heads, backend, no_run, overwrite, json_path, md_path) -> None:
    """Score heads on a labelled synthetic ARCHIVE (mrfm demo-archive), each metric beside its floor,
    or on a real set (a folder holding real_set.json: python -m engine.fitting.real_set OUT)."""
    from .evaluation import evaluate, write_reports  # each command loads its own part of fitting
    from .real_set import evaluate_real_set, is_real_set  # each command loads its own part of fitting

    if is_real_set(archive):
        from .real_set_report import print_real_set  # each command loads its own part of fitting

        real = evaluate_real_set(
            archive, store=store, model=model, backend=backend, run=not no_run, overwrite=overwrite
        )
        print_real_set(real, console, json_path, md_path)
        return
    names = [n for h in heads for n in h.split(",") if n] or None
    result = evaluate(
        archive, store=store, model=model, heads=names, backend=backend, run=not no_run, overwrite=overwrite
    )
    write_reports(result, json_path, md_path)
    table = Table(title=f"{result['series']} series, {result['studies']} studies")
    for col in ("head", "kind", "metric", "value", "floor", "n"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(r["head"], r["kind"], r["metric"], _fmt(r["value"]), _fmt(r["floor"]), str(r["n"]))
    console.print(table)
    for name, bins in (result.get("reliability") or {}).items():
        rel = Table(title=f"reliability, {name}")
        for col in ("confidence bin", "n", "mean confidence", "accuracy"):
            rel.add_column(col)
        for b in bins:
            rel.add_row(f"{b['low']:.1f}–{b['high']:.1f}", str(b["n"]), _fmt(b["confidence"]), _fmt(b["accuracy"]))
        console.print(rel)


@click.command("fit-temperature")
@click.argument("head_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True),
    help="Labelled validation studies: a label table or a synthetic archive's root.",
)
@click.option(
    "--archive",
    type=click.Path(exists=True),
    help="Images of the labelled series (default: the synthetic archive's dicom/).",
)
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False),
    help="Model folder the head was fit on (default: the embedded model).",
)
@click.option("--backend", default="torch", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False))
def fit_temperature_command(head_dir, data, archive, model, backend, cache_dir) -> None:
    """Calibrate the classification head in HEAD_DIR (its manifest.json and weights): fit one
    temperature per output on --data and store it in the manifest, which the head applies."""
    from .temperature import calibrate_head

    record = calibrate_head(
        head_dir,
        data,
        archive=archive,
        model=model,
        cache_dir=cache_dir,
        backend=backend,
        log=lambda m: console.print(f"[dim]{m}[/]", highlight=False),
    )
    table = Table(title=f"temperature scaling on {record['series']} series, {record['studies']} studies")
    for col in ("output", "temperature", "ECE before", "ECE after", "accuracy", "n"):
        table.add_column(col)
    for name, r in record.items():
        if isinstance(r, dict):
            table.add_row(
                name,
                _fmt(r["temperature"]),
                _fmt(r["ece_before"]),
                _fmt(r["ece_after"]),
                _fmt(r["accuracy"]),
                str(r["n"]),
            )
    console.print(table)


@click.group("model")
def model_group() -> None:
    """Model folders: import third-party checkpoints, calibrate the out-of-distribution flag."""


@model_group.command("import")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["monai-vit", "timm-vit3d"]))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option(
    "--num-heads", type=click.IntRange(1), help="Attention heads (not stored in weights; default embed_dim / 64)."
)
@click.option(
    "--spacing",
    type=click.FloatRange(min=0, min_open=True),
    help="Isotropic input spacing in mm (default: the default model's).",
)
@click.option("--feature-layers", help="Comma-separated block indices exported as layers[n].")
@click.option("--name", help="Model name (default: the checkpoint's file name).")
def model_import(checkpoint, fmt, out, num_heads, spacing, feature_layers, name) -> None:
    """Write a model folder (model.json, encoder.safetensors, the default text tower) from CHECKPOINT."""
    from .importing import import_checkpoint  # each command loads its own part of fitting

    layers = [int(x) for x in feature_layers.split(",")] if feature_layers else None
    fp = import_checkpoint(checkpoint, fmt, out, num_heads=num_heads, spacing=spacing, feature_layers=layers, name=name)
    console.print(f"wrote {out} ({fp}); run it with: mrfm run ARCHIVE --model {out}")


@model_group.command("calibrate")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.argument("archives", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--keep",
    default=0.98,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Fraction of held-out in-distribution series the threshold must keep unflagged.",
)
@click.option(
    "--val-fraction",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0.05, 0.9),
    help="Studies held out to choose the threshold.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Study split seed.")
@click.option("--backend", default="torch", show_default=True)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Feature store folder (default: $MRFM_FEATURE_CACHE or the user cache).",
)
@click.option(
    "--pooling",
    default="cls+token_mean_std+layer_mean_std",
    show_default=True,
    type=click.Choice(["cls+token_mean_std+layer_mean_std", "cls+mean_token"]),
    help="Pooled features the statistics describe (the first adds token and layer spreads).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the card's distribution section as JSON.")
def model_calibrate(model, archives, keep, val_fraction, seed, backend, cache_dir, pooling, as_json) -> None:
    """Compute MODEL's distribution statistics from in-distribution ARCHIVES (split by study) and
    write them into the model folder; every later run flags series beyond the threshold."""
    from .calibration import calibrate

    section = calibrate(
        model,
        list(archives),
        keep=keep,
        val_fraction=val_fraction,
        seed=seed,
        cache_dir=cache_dir,
        backend=backend,
        pooling=pooling,
        log=None if as_json else (lambda m: console.print(f"[dim]{m}[/]", highlight=False)),
    )
    if as_json:
        click.echo(json.dumps(section, indent=2))
        return
    fit = section["fit"]
    console.print(
        f"{model}: threshold {section['threshold']} keeps {fit['heldout_kept']:.3f} of {fit['heldout_series']} held-out "
        f"series ({fit['train_series']} training series, shrinkage {section['shrinkage']:.3f}); "
        f"wrote {section['statistics']} and the card's distribution section",
        highlight=False,
    )


COMMANDS = (fit_command, evaluate_command, model_group, fit_temperature_command)
