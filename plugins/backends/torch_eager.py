"""``torch``: the reference backend, eager PyTorch in fp32 or with bf16/fp16 autocast."""

from __future__ import annotations

import copy
from typing import Any

import torch

from engine import Backend, EncoderOutputs


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32", "bf16", "fp16")
    auto_priority = 10
    tolerance = "reference (fp32); bf16/fp16 autocast differ from fp32 by the precision's rounding"

    def __init__(self, model: Any, **kw: Any):
        super().__init__(model, **kw)
        encoder = model.encoder
        if self.device.type != "cpu":
            encoder = copy.deepcopy(encoder).to(self.device)
        self.encoder = encoder.eval()

    @classmethod
    def default_device(cls) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def forward(self, images: torch.Tensor) -> EncoderOutputs:
        x = images.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.precision != "fp32"):
            return self.encoder(x)
