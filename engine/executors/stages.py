"""The stages every executor runs, as plain functions: set up the model and heads, describe a
series, infer a batch, write one series. Whatever runs them (this process, a loader pool, a Ray
actor) gets the same attributes, statuses and reasons in the store."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..backends import select
from ..errors import DiskFull, MrfmError, StoreError, UsageError, one_line
from ..features import TextFeatures
from ..fingerprint import head_fingerprints, head_record, run_fingerprint
from ..geometry import axis_codes, orientation_name, spacing
from ..inference import Inference, SeriesOutputs, load_heads
from ..model import load_model
from ..prepare import Prepared
from ..series_ref import SeriesRef


@dataclass
class SeriesResult:
    key: str
    study_uid: str
    description: str
    status: str  # complete | failed | skipped | resumed
    reason: str | None = None
    seconds: float = 0.0
    out_of_distribution: bool | None = None  # None: not scored in this run


@dataclass
class WriteItem:
    """One series group ready for the store, and the result to report once it is written."""

    key: str
    attrs: dict[str, Any]
    outputs: list
    status: str
    reason: str | None
    result: SeriesResult
    replace: bool = False


@dataclass
class Loaded:
    """A series as its loader hands it on: the reference and its decoded views (or the error)."""

    ref: SeriesRef
    prep: Prepared


@dataclass
class ReadySeries:
    """A loaded series described for the store, waiting for inference with the heads it needs
    (``pending``: those resume found missing; None: every head)."""

    ref: SeriesRef
    prep: Prepared
    attrs: dict[str, Any]
    pending: set[str] | None


def result_for(ref: Any, status: str, why: str | None, seconds: float = 0.0) -> SeriesResult:
    return SeriesResult(ref.key, ref.study_uid, ref.description or "", status, why, seconds)


# ---- set-up ------------------------------------------------------------------------------------
def prepare_run(
    model: Any,
    backend: str,
    precision: str,
    batch_size: int,
    heads: list[str] | None,
    params: dict[str, dict[str, Any]],
    queries: list[str],
    force: bool = False,
) -> tuple[Any, Any, str, dict[str, Any], TextFeatures | None, list[str]]:
    """Model, backend, text and heads: everything a usage mistake can break, before any I/O."""

    try:
        mdl = load_model(model)
    except MrfmError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model {model}: not a usable model folder ({exc})") from exc
    enc, reason = select(backend, mdl, precision=precision, max_batch=batch_size)
    device = getattr(enc, "device", torch.device("cpu"))
    warnings: list[str] = []
    text: TextFeatures | None = None
    if queries:
        # text queries are encoded once per run and shared by every head that reads them
        tower = mdl.text_tower()
        if tower is None:
            warnings.append("--query given but the model has no text tower; text-reading heads get no queries")
        else:
            with torch.inference_mode():
                text = TextFeatures(queries, tower.encode(queries))
    loaded, head_warnings = load_heads(heads, mdl, device, params, text, force=force)
    warnings.extend(head_warnings)
    if not loaded:
        raise UsageError("no head can run: " + "; ".join(warnings or ["none selected"]))
    return mdl, enc, reason, loaded, text, warnings


def fingerprints(
    mdl: Any, loaded: dict[str, Any], params: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], str, dict[str, str]]:
    """Head records, the run's fingerprint and each head's: manifest, weights, parameters, code."""
    head_info = [head_record(n, type(h)) | {"manifest": h.spec} for n, h in loaded.items()]
    return (
        head_info,
        run_fingerprint(mdl.fingerprint, head_info, mdl.preprocessing, params),
        head_fingerprints(mdl.fingerprint, head_info, mdl.preprocessing, params),
    )


# ---- series attributes -------------------------------------------------------------------------
def _source_record(ref: Any, record_paths: bool) -> dict[str, Any]:
    """How a series' files are identified in the store: by label (archive name and index) and
    content digest, never by a path below the archive root unless ``record_paths`` is set."""
    if hasattr(ref, "source_record"):  # a PACS series: its URL (no credentials, no query) and count
        return ref.source_record()
    sources = list(ref.sources)
    first = sources[0] if sources else None
    rec: dict[str, Any] = {"count": len(sources), "first": str(first) if first is not None else None}
    digest = getattr(first, "digest", None)
    if digest:
        rec["digest"] = digest
    if record_paths and first is not None:
        rec["paths"] = [getattr(s, "path_text", None) or _path_text(s) for s in sources]
    return rec


def _path_text(source: Any) -> str:
    member = getattr(source, "member", None)
    return f"{source.path}!{member}" if member else str(getattr(source, "path", source))


# load notes that could carry a path or free text from the archive are not recorded
_PRIVATE_NOTES = {"problems", "source", "path", "paths", "file", "files"}


def series_attrs(
    ref: Any, run_id: str, fingerprint: str, prep: Prepared | None, record_paths: bool = False
) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "series_key": ref.key,
        "study_uid": ref.study_uid,
        "series_uid": ref.series_uid,
        "modality": ref.modality,
        "description": ref.description or "",
        "reader": ref.reader,
        "source": _source_record(ref, record_paths),
        "problems": list(ref.problems),
        "run_id": run_id,
        "fingerprint": fingerprint,
    }
    if prep is not None and prep.affine is not None:
        assert prep.shape is not None  # a Prepared with an affine has its shape
        attrs["geometry"] = {
            "shape": list(prep.shape),
            "affine": prep.affine.tolist(),
            "spacing": list(spacing(prep.affine)),
            "orientation": orientation_name(prep.affine),
            "axcodes": axis_codes(prep.affine),
            "frame": "RAS+ mm; affine maps voxel (i, j, k, 1) to world",
        }
        attrs["load_notes"] = {
            k: v
            for k, v in prep.meta.items()
            if isinstance(v, (str, int, float, bool, list)) and k not in _PRIVATE_NOTES
        }
        attrs["problems"] = list(dict.fromkeys([*ref.problems, *prep.meta.get("problems", [])]))
    return attrs


def safe_attrs(
    ref: Any,
    run_id: str,
    fingerprint: str,
    prep: Prepared | None,
    record_paths: bool,
    where: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Series attributes, or (attributes without geometry, reason) when the geometry cannot be
    described: one series' odd affine fails that series, never the run. ``where`` (executor,
    node, actor) says what processed the series."""
    try:
        attrs, why = series_attrs(ref, run_id, fingerprint, prep, record_paths), None
    except Exception as exc:
        where_from = ref.sources[0] if getattr(ref, "sources", None) else ref.key
        why = f"{where_from}: cannot describe the series geometry ({one_line(exc, named=True)})"
        attrs = series_attrs(ref, run_id, fingerprint, None, record_paths)
    return attrs | (where or {}), why


# ---- inference and writing ---------------------------------------------------------------------
def infer_batch(
    inference: Inference, batch: list[ReadySeries], store: Any, run_id: str, head_fps: dict[str, str], resume: bool
) -> tuple[list[WriteItem], float]:
    """Run the heads each series still needs; returns what to write and the inference seconds.

    Each series' ``pending`` heads are those resume found missing (ignored when ``resume`` is
    false, i.e. --overwrite); a series whose grid changed since it was stored runs every head and
    replaces the group.
    """
    only: list[set[str] | None] = []
    for s in batch:
        stored = store.series_attrs(s.ref.key) if resume else None
        same_grid = stored is not None and stored.get("geometry") == s.attrs.get("geometry")
        only.append(s.pending if resume and same_grid else None)
    t = time.perf_counter()
    results = run_isolated(inference, [s.prep for s in batch], only)
    seconds = time.perf_counter() - t
    per = seconds / len(batch)
    items = []
    for s, res, ran in zip(batch, results, only):
        ref, prep, attrs = s.ref, s.prep, s.attrs
        if isinstance(res, str):  # the encoder itself failed on this series
            items.append(
                WriteItem(ref.key, attrs, [], "failed", res, result_for(ref, "failed", res, prep.seconds + per))
            )
            continue
        written_heads = {o.head for o in res.outputs}
        # heads still answer on a flagged series; the series, each head's record and each output carry the flag
        flag = res.distribution.get("out_of_distribution")
        attrs["distribution"] = dict(res.distribution)
        for out in res.outputs:
            out.distribution = attrs["distribution"]
        attrs["heads"] = {
            name: {
                "version": h.spec["version"],
                "outputs": [d["name"] for d in h.spec["outputs"]] if name in written_heads else [],
                "error": res.errors.get(name),
                "fingerprint": head_fps[name],
                "run_id": run_id,
                "out_of_distribution": flag,
            }
            for name, h in inference.heads.items()
            if ran is None or name in ran
        }
        status = "failed" if res.errors else "complete"
        reason = "; ".join(res.errors.values()) if res.errors else None
        result = result_for(ref, status, reason, prep.seconds + per)
        result.out_of_distribution = flag
        items.append(WriteItem(ref.key, attrs, res.outputs, status, reason, result, ran is None))
    return items, seconds


def run_isolated(inference: Inference, preps: list[Prepared], only: list[set[str] | None]) -> list[SeriesOutputs | str]:
    """Inference over a batch; when the encoder fails on the batch, each series is retried alone
    so only the one that breaks it fails (with the reason as a string in its place)."""
    try:
        return list(inference.run(preps, only))
    except Exception as exc:
        if len(preps) == 1:
            return [f"{preps[0].key}: the encoder failed on this series ({one_line(exc, named=True)})"]
    return [r for p, o in zip(preps, only) for r in run_isolated(inference, [p], [o])]


def write_item(store: Any, item: WriteItem) -> SeriesResult:
    """Write one series group (its status last, so it is never read half-written as complete).
    A write failure is that series' failure, not the run's, except a full disk (DiskFull), which
    would fail every series after it: that one stops the run."""
    result = item.result
    try:
        store.write_series(item.key, item.attrs, item.outputs, item.status, item.reason, replace=item.replace)
    except DiskFull:
        raise
    except Exception as exc:
        # the store marks the group failed with this reason where it still can
        result.status, result.reason = (
            "failed",
            str(exc) if isinstance(exc, StoreError) else f"could not write series group: {exc}",
        )
    return result
