"""``torch-compile``: the encoder compiled by TorchInductor on a CUDA device.

``mode`` is torch.compile's (``default``, ``reduce-overhead`` for CUDA graphs, ``max-autotune``,
``max-autotune-no-cudagraphs``); ``MRFM_TORCH_COMPILE_MODE`` sets it when not given. Inductor
keeps its own on-disk cache of compiled kernels.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch

import engine
from engine import Backend, EncoderOutputs

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class TorchCompileBackend(Backend):
    name = "torch-compile"
    precisions = ("fp32", "bf16", "fp16")
    auto_priority = 30
    tolerance = "fp32: max abs difference <= 1e-3 vs torch eager fp32 (kernel fusion reorders sums)"

    @classmethod
    def available(cls, device: str | torch.device | None = None) -> tuple[bool, str]:
        if device is not None and torch.device(device).type != "cuda":
            return False, f"needs a CUDA device, not {torch.device(device)}"
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed (inductor needs it for CUDA kernels)"
        return True, f"inductor on {torch.cuda.get_device_name()}"

    @classmethod
    def default_device(cls) -> torch.device:
        return torch.device("cuda")

    def __init__(self, model: Any, *, mode: str | None = None, dynamic: bool | None = None, **kw: Any):
        super().__init__(model, **kw)
        if self.device.type != "cuda":
            raise engine.BackendUnavailable(f"torch-compile runs on CUDA devices, not {self.device}")
        self.mode = mode or os.environ.get("MRFM_TORCH_COMPILE_MODE", "default")
        if self.mode not in MODES:
            raise engine.UsageError(f"unknown torch.compile mode {self.mode!r}; choose from {MODES}")
        encoder = copy.deepcopy(model.encoder).to(self.device).eval()
        dtype, autocast = self.dtype, self.precision != "fp32"

        def run(x: torch.Tensor) -> EncoderOutputs:
            with torch.autocast("cuda", dtype=dtype, enabled=autocast):
                return encoder(x)

        self._compiled = torch.compile(run, mode=self.mode, dynamic=dynamic, fullgraph=True)
        self._warm = False

    def warm_up(self) -> None:
        """Compile now, at the tuned shape, rather than on the first batch."""
        start = time.perf_counter()
        x = torch.zeros(self.max_batch, 1, *self.shapes.opt_spatial)
        self.forward(x)
        torch.cuda.synchronize(self.device)
        self.build_seconds = time.perf_counter() - start
        self._warm = True

    def forward(self, images: torch.Tensor) -> EncoderOutputs:
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        outputs = self._compiled(images.to(self.device, non_blocking=True))
        if self.mode == "reduce-overhead":  # CUDA-graph outputs are overwritten by the next replay
            outputs = tuple(o.clone() for o in outputs)
        return outputs  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mode": self.mode}
