"""``onnxruntime``: the encoder exported to ONNX (cached on disk) and run by onnxruntime.

CPU execution provider by default; the CUDA provider when it is installed and a CUDA device is
asked for. fp16 graphs run on both (on CPU mainly for checking them); bf16 graphs do not, since
onnxruntime lacks bf16 kernels for most operators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import engine
from engine import (
    INPUT_NAME,
    Backend,
    EncoderOutputs,
    cache_key,
    check_onnx,
    device_identity,
    export_onnx,
    export_versions,
)


def _providers(device: torch.device) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    precisions = ("fp32", "fp16")
    auto_priority = 20
    tolerance = "fp32: max abs difference <= 1e-4 vs torch eager fp32 (tested); fp16: <= 1e-2"

    @classmethod
    def available(cls, device: str | torch.device | None = None) -> tuple[bool, str]:
        try:
            import onnx  # noqa: F401
            import onnxruntime as ort  # optional: the backend reports itself unavailable without it
            import onnxscript  # noqa: F401
        except ImportError as exc:
            return False, f"{exc.name} is not installed"
        if device is None or torch.device(device).type == "cpu":
            return True, "CPU execution provider"
        if torch.device(device).type != "cuda":
            return False, f"runs on cpu or cuda, not {torch.device(device)}"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False, "onnxruntime has no CUDA execution provider here"
        return True, "CUDA execution provider"

    def __init__(self, model: Any, **kw: Any):
        super().__init__(model, **kw)
        import onnxruntime as ort  # optional: the backend reports itself unavailable without it

        if self.device.type not in ("cpu", "cuda"):
            raise engine.BackendUnavailable(f"onnxruntime runs on cpu or cuda, not {self.device}")
        self._ort = ort
        self.key_parts = {
            "fingerprint": model.fingerprint,
            "backend": self.name,
            "precision": self.precision,
            "shapes": {"batch": "dynamic", "spatial": f"dynamic multiples of {model.patch_size}"},
            "versions": {**export_versions(), "onnxruntime": ort.__version__},
            "device": device_identity(self.device),
        }
        cache = self.engine_cache()
        path = cache.path(self.name, cache_key(**self.key_parts), ".onnx")
        self.session, self.cache_hit, self.build_seconds = cache.get_or_build(
            path, lambda tmp: export_onnx(model, tmp, self.precision), self._open, meta=self.key_parts
        )
        self.artifact = path

    def _open(self, path: Path) -> Any:
        check_onnx(path)
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        return self._ort.InferenceSession(str(path), options, providers=_providers(self.device))

    def forward(self, images: torch.Tensor) -> EncoderOutputs:
        outputs = self.session.run(None, {INPUT_NAME: images.numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)  # type: ignore[return-value]
