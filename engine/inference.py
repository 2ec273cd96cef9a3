"""Accelerator-side stage: encode each view once, run every head on the shared features, check
outputs against the manifests and map them back to the native grid and world coordinates.

One process owns the accelerator; this module runs in it. A head that fails, returns something
its manifest does not declare or overruns its time budget fails only itself, on the series of
that batch; a head that overruns repeatedly is disabled for the rest of the run.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .distribution import UNSCORED, DistributionModel, pooled_features
from .enums import VIEW_KINDS
from .errors import HeadBudgetExceeded, HeadError, UsageError, one_line
from .features import Features, HeadInput, TextFeatures
from .heads import Head, HeadContext, HeadOutputError, check_output, load_weights, mask_mode, stored_declaration
from .mapping import blend_windows, boxes_to_native, mask_to_native, merge_window_boxes
from .prepare import Prepared
from .store import OutputArray

MAX_OVERRUNS = 3  # budget overruns after which a head is disabled for the rest of the run
Slot = tuple[int, str, int]  # (series index in the batch, view kind, window index)


@dataclass
class SeriesOutputs:
    """What inference produced for one series: outputs to write and per-head errors."""

    key: str
    outputs: list[OutputArray] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    distribution: dict[str, Any] = field(default_factory=lambda: dict(UNSCORED))


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _HeadThread:
    """One daemon thread per budgeted head. Calls run one at a time in order, so a head is never
    called concurrently with itself; Python cannot stop a thread, so a call the engine stopped
    waiting for keeps running in the background, and being a daemon it never delays exit."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=f"mrfm-head-{name}", daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn))
        return fut

    def close(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            fut, fn = job
            if not fut.set_running_or_notify_cancel():
                continue  # abandoned before it started: never run it
            try:
                fut.set_result(fn())
            except BaseException as exc:  # delivered to the waiting caller
                fut.set_exception(exc)


def _failure_reason(name: str, exc: BaseException) -> str:
    """One line naming the head: engine head errors already do, anything else is wrapped."""
    if isinstance(exc, HeadError):
        return str(exc)
    return f"head {name!r} raised {one_line(exc, named=True, fold=True)}"


def _check_results(name: str, results: Any, n: int) -> list[dict[str, Any]]:
    """predict must return one dict per input, in order."""
    if not isinstance(results, (list, tuple)):
        raise HeadOutputError(name, "*", f"predict must return a list of dicts, got {type(results).__name__}")
    if len(results) != n:
        raise HeadOutputError(name, "*", f"predict returned {len(results)} results for {n} inputs")
    for i, item in enumerate(results):
        if not isinstance(item, dict):
            raise HeadOutputError(name, "*", f"predict result {i} is a {type(item).__name__}, not a dict of outputs")
    return list(results)


class Inference:
    """Runs the encoder backend and the heads over batches of prepared series.

    ``budgets`` maps head names to seconds allowed per predict call (None: no limit); it
    overrides a manifest's ``budget_seconds``, which overrides ``default_budget``. A call over
    budget fails the head on that call's series; after ``max_overruns`` overruns the head is
    disabled for the rest of the run. ``on_event`` receives, around every predict call,
    ``{"event": "head", "head", "batch", "series", "state", "seconds"}`` with ``state`` one of
    ``started``, ``done``, ``failed``, ``over budget`` (and ``reason`` when it failed);
    ``batch`` counts that head's predict calls over the run, ``series`` lists the call's keys.
    Call :meth:`close` at the end of a run to let budgeted heads' threads end.
    """

    def __init__(
        self,
        backend: Any,
        heads: dict[str, Head],
        text: TextFeatures | None,
        batch_size: int = 4,
        *,
        budgets: dict[str, float | None] | None = None,
        default_budget: float | None = None,
        max_overruns: int = MAX_OVERRUNS,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        distribution: DistributionModel | None = None,
    ):
        self.backend = backend
        self.distribution = distribution
        self.heads = heads
        self.text = text
        self.batch_size = max(1, int(batch_size))
        self.budgets = {name: self._budget(name, head, budgets or {}, default_budget) for name, head in heads.items()}
        self.max_overruns = max(1, int(max_overruns))
        self.on_event = on_event or (lambda event: None)
        self.overruns: dict[str, int] = {name: 0 for name in heads}
        self.disabled: dict[str, str] = {}  # head name -> reason, for the rest of the run
        self._batches: dict[str, int] = {name: 0 for name in heads}
        self._threads: dict[str, _HeadThread] = {}

    @staticmethod
    def _budget(name: str, head: Head, budgets: dict[str, float | None], default: float | None) -> float | None:
        value = budgets[name] if name in budgets else head.spec.get("budget_seconds", default)
        return float(value) if value else None

    def view_kinds(self) -> tuple[str, ...]:
        kinds = {h.spec["inputs"]["view"] for h in self.heads.values()}
        if self.distribution is not None:
            kinds.add("global")  # the distribution score pools the global view's features
        return tuple(k for k in VIEW_KINDS if k in kinds)

    def close(self) -> None:
        """Let the heads' worker threads end once their current call returns."""
        for thread in self._threads.values():
            thread.close()
        self._threads.clear()

    def _encode(self, images: list[torch.Tensor]) -> list[Features]:
        feats: list[Features] = []
        for chunk in _chunks(images, self.batch_size):
            feats.extend(self.backend.encode(torch.stack(chunk)))
        return feats

    def run(self, batch: list[Prepared], only: list[set[str] | None] | None = None) -> list[SeriesOutputs]:
        """Encode every view window of ``batch`` once, then run each head over the batch.

        ``only[i]``, when given, names the heads series ``i`` still needs (resume); None: all.
        """
        slots: list[Slot] = []
        images: list[torch.Tensor] = []
        for s, prep in enumerate(batch):
            for kind, view in prep.views.items():
                for w, win in enumerate(view.windows or [view.full_window()]):
                    slots.append((s, kind, w))
                    images.append(view.image[(slice(None), *win)])
        feats = dict(zip(slots, self._encode(images))) if images else {}

        results = [SeriesOutputs(p.key) for p in batch]
        if self.distribution is not None:
            for s, res in enumerate(results):
                window_feats = [f for slot, f in feats.items() if slot[0] == s and slot[1] == "global"]
                res.distribution = self.distribution.judge(
                    pooled_features(window_feats, self.distribution.pooling) if window_feats else None
                )
        for name, head in self.heads.items():
            kind = head.spec["inputs"]["view"]
            items = [
                slot
                for slot in slots
                if slot[1] == kind and (only is None or only[slot[0]] is None or name in only[slot[0]])
            ]
            if items:
                self._run_head(name, head, batch, items, feats, results)
        return results

    def _run_head(
        self,
        name: str,
        head: Head,
        batch: list[Prepared],
        items: list[Slot],
        feats: dict[Slot, Features],
        results: list[SeriesOutputs],
    ) -> None:
        """Predict ``items`` in chunks; a failed chunk fails its series, the rest are mapped back."""
        predicted: dict[Slot, dict[str, Any]] = {}
        errors: dict[int, str] = {}
        for chunk in _chunks(items, self.batch_size):
            series = list(dict.fromkeys(slot[0] for slot in chunk))
            try:
                if name in self.disabled:
                    raise HeadError(self.disabled[name])
                inputs = [self._input_for(head, batch[s], kind, w, feats[(s, kind, w)]) for s, kind, w in chunk]
                outs = self._predict(name, head, inputs, [batch[s].key for s in series])
                predicted.update(zip(chunk, outs))
            except Exception as exc:  # one broken head costs only its own outputs on these series
                for s in series:
                    errors.setdefault(s, _failure_reason(name, exc))
        for s, reason in errors.items():
            results[s].errors[name] = reason
        per_series: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for (s, _, w), out in predicted.items():
            if s not in errors:
                per_series.setdefault(s, []).append((w, out))
        for s, outs in per_series.items():
            try:
                results[s].outputs.extend(self._finish(name, head, batch[s], head.spec["inputs"]["view"], outs))
            except Exception as exc:
                results[s].errors[name] = _failure_reason(name, exc)

    def _predict(self, name: str, head: Head, inputs: list[HeadInput], keys: list[str]) -> list[dict[str, Any]]:
        """One predict call within the head's budget, announced before and after."""
        self._batches[name] += 1
        event = {"event": "head", "head": name, "batch": self._batches[name], "series": keys}
        self.on_event({**event, "state": "started", "seconds": 0.0})
        t0 = time.perf_counter()
        try:
            results = _check_results(name, self._call(name, head, inputs, len(keys)), len(inputs))
        except Exception as exc:
            state = "over budget" if isinstance(exc, HeadBudgetExceeded) else "failed"
            self.on_event(
                {**event, "state": state, "seconds": time.perf_counter() - t0, "reason": _failure_reason(name, exc)}
            )
            raise
        self.on_event({**event, "state": "done", "seconds": time.perf_counter() - t0})
        return results

    def _call(self, name: str, head: Head, inputs: list[HeadInput], n_series: int) -> Any:
        budget = self.budgets.get(name)
        if budget is None:
            return head.predict(inputs)
        # grad and inference modes are per thread: carry the caller's into the head's thread
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def call() -> Any:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return head.predict(inputs)

        thread = self._threads.get(name) or self._threads.setdefault(name, _HeadThread(name))
        fut = thread.submit(call)
        try:
            return fut.result(timeout=budget)
        except FutureTimeout:
            queued = fut.cancel()  # still waiting behind an earlier abandoned call: drop it
            raise HeadBudgetExceeded(self._overrun(name, budget, n_series, queued)) from None

    def _overrun(self, name: str, budget: float, n_series: int, queued: bool) -> str:
        """Count an overrun, disable the head after too many, and say what happened."""
        self.overruns[name] += 1
        reason = f"head {name!r} exceeded its time budget of {budget:g} s on a batch of {n_series} series"
        if queued:
            reason += " (an earlier call over budget was still running)"
        if self.overruns[name] >= self.max_overruns:
            self.disabled[name] = (
                f"head {name!r} disabled after {self.overruns[name]} overruns of its time budget of {budget:g} s"
            )
            reason += "; disabled for the rest of the run"
        return reason

    def _input_for(self, head: Head, prep: Prepared, kind: str, w: int, features: Features) -> HeadInput:
        """What ``head`` may see of one view window: exactly what its manifest declares, plus
        the window's valid region and description."""
        inputs = head.spec["inputs"]
        view = prep.views[kind]
        win = view.windows[w] if view.windows else view.full_window()
        image = view.image[(slice(None), *win)]
        valid = view.valid[(slice(None), *win)] if view.valid is not None else None
        return HeadInput(
            prep.key,
            image if inputs.get("image") else None,
            features.only(inputs["features"]),
            self.text if "text" in inputs["features"] else None,
            tuple(int(n) for n in image.shape[-3:]),  # type: ignore[arg-type]
            valid,
            view.info(win),
        )

    def _finish(
        self, name: str, head: Head, prep: Prepared, kind: str, outs: list[tuple[int, dict[str, Any]]]
    ) -> list[OutputArray]:
        """Check a head's outputs for one series and map them back to the native grid."""
        view = prep.views[kind]
        window_shape = image_shape_of(view)
        declared = {d["name"] for d in head.spec["outputs"]}
        for _, out in outs:
            undeclared = set(out) - declared
            if undeclared:
                raise HeadOutputError(
                    name, sorted(undeclared)[0], f"output not declared in the manifest (declared: {sorted(declared)})"
                )
        written: list[OutputArray] = []
        for decl in head.spec["outputs"]:
            oname = decl["name"]
            values = []
            for _, out in outs:
                if oname not in out:
                    raise HeadOutputError(name, oname, "declared output missing from the head's result")
                values.append(check_output(name, decl, out[oname], window_shape))
            value = self._map_back(name, decl, view, prep, [w for w, _ in outs], values)
            written.append(OutputArray(name, head.spec["version"], stored_declaration(name, decl), value))
        return written

    @staticmethod
    def _map_back(
        name: str, decl: dict[str, Any], view: Any, prep: Prepared, windows: list[int], values: list[Any]
    ) -> Any:
        kind, oname = decl["kind"], decl["name"]
        if kind == "mask":
            mode, threshold = mask_mode(name, decl)
            all_windows = view.windows or [view.full_window()]
            probs = (
                blend_windows(values, [all_windows[w] for w in windows], view.shape) if len(values) > 1 else values[0]
            )
            return mask_to_native(probs, view.affine, prep.shape, prep.affine, decl["dtype"], mode, threshold)
        if kind == "boxes" and view.windows:  # tiles: one list of boxes in view coordinates
            values = [merge_window_boxes(values, [view.windows[w] for w in windows])]
        if len(values) != 1:
            raise HeadOutputError(name, oname, f"{kind} outputs are only supported on the global view")
        if kind != "boxes":
            return values[0]
        v = values[0]
        world, voxel, keep = boxes_to_native(v["boxes"], view.affine, prep.shape, prep.affine)
        value = {"world": world, "voxel": voxel, "scores": v["scores"][keep]}
        for extra in ("labels", "queries"):
            if extra in v:
                value[extra] = [v[extra][i] for i in keep]
        return value


def image_shape_of(view: Any) -> tuple[int, int, int]:
    """Shape of the image a head saw: the window size for tiles, the view for global."""
    if view.windows:
        return tuple(s.stop - s.start for s in view.windows[0])  # type: ignore[return-value]
    return view.shape


def load_heads(
    names: list[str] | None,
    model: Any,
    device: torch.device,
    params: dict[str, dict[str, Any]],
    text: TextFeatures | None,
    *,
    force: bool = False,
) -> tuple[dict[str, Head], list[str]]:
    """Instantiate the selected heads; text-reading heads get the run's queries in ``params``.

    A head fit on another encoder is skipped with a warning when it was not asked for by name,
    and refused with a :class:`~engine.errors.UsageError` when it was; ``force`` runs it anyway
    (only where the feature width matches) and says so in a warning the run records.
    """
    from .plugins import select_heads  # the plugin manager loads head plugins, which import engine

    registry = select_heads(names or None)  # UsageError for an unknown or broken head, with the reason
    heads: dict[str, Head] = {}
    warnings: list[str] = []
    for name in registry:
        cls = registry[name].obj
        spec = cls.manifest()
        want_fp, want_dim = spec["encoder"]["fingerprint"], spec["encoder"].get("embed_dim")
        if want_dim not in (None, model.embed_dim):
            why = f"head {name!r} expects embed_dim {want_dim}, model {model.name!r} has {model.embed_dim}"
            if names:
                raise UsageError(why)
            warnings.append(f"{why}; skipped")
            continue
        if want_fp not in ("any", model.fingerprint):
            why = f"head {name!r} was fit on encoder {want_fp}, not on this model's {model.fingerprint}"
            if names and not force:
                raise UsageError(f"{why}; refit it (mrfm fit) or pass --force to run it anyway")
            if not force:
                warnings.append(f"{why}; skipped")
                continue
            warnings.append(f"{why}; run anyway (--force)")
        if "text" in spec["inputs"]["features"]:
            # the queries are a parameter of text-reading heads: they enter the head's fingerprint
            params.setdefault(name, {})["queries"] = list(text.queries) if text else []
        ctx = HeadContext(
            device=device,
            embed_dim=model.embed_dim,
            grid=tuple(model.grid),
            input_size=tuple(model.input_size),
            model_fingerprint=model.fingerprint,
            params=params.get(name, {}),
            text=text,
        )
        head = cls(spec, load_weights(cls, device), ctx)
        heads[name] = head
    return heads, warnings
