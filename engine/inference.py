"""Accelerator-side stage: encode each view once, run every head on the shared features, check
outputs against the manifests and map them back to the native grid and world coordinates.

One process owns the accelerator; this module runs in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .features import Features, HeadInput, TextFeatures
from .heads import Head, HeadOutputError, check_output
from .mapping import blend_windows, boxes_to_native, mask_to_native
from .prepare import Prepared
from .store import OutputArray


@dataclass
class SeriesOutputs:
    """What inference produced for one series: outputs to write and per-head errors."""

    key: str
    outputs: list[OutputArray] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Inference:
    """Runs the encoder backend and the heads over batches of prepared series."""

    def __init__(self, backend: Any, heads: dict[str, Head], text: TextFeatures | None, batch_size: int = 4):
        self.backend = backend
        self.heads = heads
        self.text = text
        self.batch_size = max(1, int(batch_size))

    def view_kinds(self) -> tuple[str, ...]:
        kinds = {h.spec["inputs"]["view"] for h in self.heads.values()}
        return tuple(k for k in ("global", "tiles") if k in kinds)

    def _encode(self, images: list[torch.Tensor]) -> list[Features]:
        feats: list[Features] = []
        for chunk in _chunks(images, self.batch_size):
            feats.extend(self.backend.encode(torch.stack(chunk)))
        return feats

    def run(self, batch: list[Prepared], only: list[set[str] | None] | None = None) -> list[SeriesOutputs]:
        """Encode every view window of ``batch`` once, then run each head over the batch.

        ``only[i]``, when given, names the heads series ``i`` still needs (resume); None: all.
        """
        # 1. every image the encoder must see: (series index, view kind, window index)
        slots: list[tuple[int, str, int]] = []
        images: list[torch.Tensor] = []
        for s, prep in enumerate(batch):
            for kind, view in prep.views.items():
                windows = view.windows or [tuple(slice(0, n) for n in view.shape)]
                for w, win in enumerate(windows):
                    slots.append((s, kind, w))
                    images.append(view.image[(slice(None), *win)])
        feats = dict(zip(slots, self._encode(images))) if images else {}
        image_of = dict(zip(slots, images))

        results = [SeriesOutputs(p.key) for p in batch]
        for name, head in self.heads.items():
            kind = head.spec["inputs"]["view"]
            items = [slot for slot in slots if slot[1] == kind and (only is None or only[slot[0]] is None or name in only[slot[0]])]
            if not items:
                continue
            try:
                inputs = [self._input_for(head, batch[slot[0]].key, image_of[slot], feats[slot]) for slot in items]
                predicted: list[dict[str, Any]] = []
                for chunk in _chunks(inputs, self.batch_size):
                    out = head.predict(chunk)
                    if len(out) != len(chunk):
                        raise HeadOutputError(name, "*", f"predict returned {len(out)} results for {len(chunk)} inputs")
                    predicted.extend(out)
            except Exception as exc:  # one broken head costs only its own outputs
                for s in {slot[0] for slot in items}:
                    results[s].errors[name] = f"head {name!r} failed: {exc}"
                continue
            per_series: dict[int, list[tuple[int, dict[str, Any]]]] = {}
            for (s, _, w), out in zip(items, predicted):
                per_series.setdefault(s, []).append((w, out))
            for s, outs in per_series.items():
                try:
                    results[s].outputs.extend(self._finish(name, head, batch[s], kind, outs))
                except HeadOutputError as exc:
                    results[s].errors[name] = str(exc)
        return results

    def _input_for(self, head: Head, key: str, image: torch.Tensor, features: Features) -> HeadInput:
        """What ``head`` may see of one view window: exactly what its manifest declares."""
        inputs = head.spec["inputs"]
        return HeadInput(
            key,
            image if inputs.get("image") else None,
            features.only(inputs["features"]),
            self.text if "text" in inputs["features"] else None,
            tuple(int(n) for n in image.shape[-3:]),  # type: ignore[arg-type]
        )

    def _finish(self, name: str, head: Head, prep: Prepared, kind: str, outs: list[tuple[int, dict[str, Any]]]) -> list[OutputArray]:
        """Check a head's outputs for one series and map them back to the native grid."""
        view = prep.views[kind]
        window_shape = image_shape_of(view)
        spec, version = head.spec, head.spec["version"]
        written: list[OutputArray] = []
        for decl in spec["outputs"]:
            oname = decl["name"]
            values = []
            for w, out in outs:
                if oname not in out:
                    raise HeadOutputError(name, oname, "declared output missing from the head's result")
                values.append(check_output(name, decl, out[oname], window_shape))
            undeclared = set(outs[0][1]) - {d["name"] for d in spec["outputs"]}
            if undeclared:
                raise HeadOutputError(name, sorted(undeclared)[0], "output not declared in the manifest")
            if decl["kind"] == "mask":
                windows = view.windows or [tuple(slice(0, n) for n in view.shape)]
                probs = blend_windows(values, [windows[w] for w, _ in outs], view.shape) if len(values) > 1 else values[0]
                value: Any = mask_to_native(probs, view.affine, prep.shape, prep.affine, decl["dtype"])
            elif decl["kind"] == "boxes":
                if len(values) != 1:
                    raise HeadOutputError(name, oname, "boxes are only supported on the global view")
                v = values[0]
                world, voxel, keep = boxes_to_native(v["boxes"], view.affine, prep.shape, prep.affine)
                value = {"world": world, "voxel": voxel, "scores": v["scores"][keep]}
                for extra in ("labels", "queries"):
                    if extra in v:
                        value[extra] = [v[extra][i] for i in keep]
            else:
                if len(values) != 1:
                    raise HeadOutputError(name, oname, f"{decl['kind']} outputs are only supported on the global view")
                value = values[0]
            written.append(OutputArray(name, version, decl, value))
        return written


def image_shape_of(view: Any) -> tuple[int, int, int]:
    """Shape of the image a head saw: the window size for tiles, the view for global."""
    if view.windows:
        return tuple(s.stop - s.start for s in view.windows[0])  # type: ignore[return-value]
    return view.shape


def load_heads(names: list[str] | None, model: Any, device: torch.device, params: dict[str, dict[str, Any]], text: TextFeatures | None) -> tuple[dict[str, Head], list[str]]:
    """Instantiate the selected heads; heads fit on another encoder are refused with a warning.

    Text-reading heads get the run's queries added to their entry in ``params``.
    """
    from .heads import HeadContext, load_weights
    from .plugins import get_head_classes

    registry = get_head_classes()
    wanted = names or sorted(registry)
    missing = [n for n in wanted if n not in registry]
    if missing:
        from .errors import UsageError

        raise UsageError(f"unknown head(s) {', '.join(missing)}; installed: {', '.join(sorted(registry)) or 'none'}")
    heads: dict[str, Head] = {}
    warnings: list[str] = []
    for name in wanted:
        cls = registry[name].obj
        spec = cls.manifest()
        want_fp = spec["encoder"]["fingerprint"]
        if want_fp not in ("any", model.fingerprint):
            warnings.append(f"head {name!r} was fit on encoder {want_fp[:19]}…, not {model.fingerprint[:19]}…; skipped")
            continue
        if spec["encoder"].get("embed_dim") not in (None, model.embed_dim):
            warnings.append(f"head {name!r} expects embed_dim {spec['encoder']['embed_dim']}, model has {model.embed_dim}; skipped")
            continue
        if "text" in spec["inputs"]["features"]:
            # the queries are a parameter of text-reading heads: they enter the head's fingerprint
            params.setdefault(name, {})["queries"] = list(text.queries) if text else []
        ctx = HeadContext(device=device, embed_dim=model.embed_dim, grid=tuple(model.grid), input_size=tuple(model.input_size),
                          model_fingerprint=model.fingerprint, params=params.get(name, {}), text=text)
        head = cls(spec, load_weights(cls, device), ctx)
        heads[name] = head
    return heads, warnings
