"""The encoder backend interface.

A backend runs the frozen encoder of a :class:`~engine.model.Model` and returns the same
:class:`~engine.Features` as plain torch, within its stated tolerance. Backends are registered
through the plugin layer (``register_backends``), so a third party can add one.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import UsageError
from ..features import Features
from ..model import EncoderOutputs, split_features

if TYPE_CHECKING:
    from ..model import Model

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ShapeRange:
    """Batch and spatial sizes a compiled artifact must accept (TensorRT optimization profile).

    ``opt_spatial`` is the size kernels are tuned for: the model's input size, which every
    global view and tile has.
    """

    min_spatial: tuple[int, int, int]
    opt_spatial: tuple[int, int, int]
    max_spatial: tuple[int, int, int]
    max_batch: int = 4

    def __post_init__(self) -> None:
        for lo, opt, hi in zip(self.min_spatial, self.opt_spatial, self.max_spatial):
            if not 0 < lo <= opt <= hi:
                raise UsageError(f"shape range needs 0 < min <= opt <= max per axis, got {self}")
        if self.max_batch < 1:
            raise UsageError(f"max_batch must be >= 1, got {self.max_batch}")

    @classmethod
    def default(cls, model: Model, max_batch: int = 4) -> ShapeRange:
        """Sizes from two patches per axis up to the model's input size."""
        p = model.patch_size
        return cls((2 * p,) * 3, model.input_size, model.input_size, max_batch)  # type: ignore[arg-type]

    @classmethod
    def covering(
        cls, shapes: list[tuple[int, int, int]], opt: tuple[int, int, int] | None = None, max_batch: int = 4
    ) -> ShapeRange:
        """The smallest range covering the given spatial shapes (opt: the first, unless given)."""
        if not shapes:
            raise UsageError("covering() needs at least one shape")
        lo = tuple(min(s[i] for s in shapes) for i in range(3))
        hi = tuple(max(s[i] for s in shapes) for i in range(3))
        return cls(lo, tuple(opt or shapes[0]), hi, max_batch)  # type: ignore[arg-type]

    def contains(self, batch: int, spatial: tuple[int, ...]) -> bool:
        return 1 <= batch <= self.max_batch and all(
            lo <= s <= hi for lo, s, hi in zip(self.min_spatial, spatial, self.max_spatial)
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class CastEncoder(nn.Module):
    """The encoder with weights cast to a compute dtype and float32 inputs and outputs.

    Exported graphs for TensorRT carry their precision this way (strongly typed networks): the
    weights and activations are bf16/fp16, LayerNorm runs in float32, and the I/O stays float32.
    """

    def __init__(self, encoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.encoder = copy.deepcopy(encoder).to(dtype) if dtype != torch.float32 else encoder

    def forward(self, x: torch.Tensor) -> EncoderOutputs:
        cls, tokens, layers, joint = self.encoder(x)
        return cls.float(), tokens.float(), layers.float(), joint.float()


class Backend:
    """Base class for encoder backends.

    Subclasses set ``name``, the ``precisions`` they support and an ``auto_priority`` (higher is
    tried first by ``--backend auto``; 0 keeps a backend out of auto selection), and implement
    :meth:`forward`. :meth:`encode` handles validation, batching to ``max_batch`` and splitting.
    """

    name: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    auto_priority: ClassVar[int] = 0
    tolerance: ClassVar[str] = "fp32: max abs difference <= 1e-4 vs torch eager fp32"

    def __init__(
        self,
        model: Model,
        *,
        precision: str = "fp32",
        device: str | torch.device | None = None,
        cache_dir: str | Path | None = None,
        max_batch: int = 4,
        shapes: ShapeRange | None = None,
    ):
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision {precision!r}; choose from {sorted(PRECISIONS)}")
        if precision not in self.precisions:
            raise UsageError(f"backend {self.name!r} supports precisions {list(self.precisions)}, not {precision!r}")
        if max_batch < 1:
            raise UsageError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.max_batch = max_batch
        self.device = torch.device(device) if device is not None else self.default_device()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.shapes = shapes if shapes is not None else ShapeRange.default(model, max_batch)
        if self.shapes.max_batch != max_batch:
            self.shapes = ShapeRange(
                self.shapes.min_spatial, self.shapes.opt_spatial, self.shapes.max_spatial, max_batch
            )
        self.artifact: Path | None = None
        self.cache_hit: bool | None = None
        self.build_seconds = 0.0

    @classmethod
    def available(cls, device: str | torch.device | None = None) -> tuple[bool, str]:
        """Whether this backend can run here (on ``device`` when given), and why (not)."""
        return True, "available"

    @classmethod
    def default_device(cls) -> torch.device:
        return torch.device("cpu")

    def engine_cache(self):
        """The artifact cache: ``<cache_dir>/engines`` when a cache dir was given, else the default."""
        from .cache import EngineCache  # the engine cache (filelock, platformdirs) only for backends that compile

        return EngineCache(self.cache_dir / "engines" if self.cache_dir is not None else None)

    def forward(self, images: torch.Tensor) -> EncoderOutputs:  # pragma: no cover - abstract
        """Run a batch of at most ``max_batch`` float32 images (CPU, or already on a CUDA device:
        see :meth:`to_device`); return the four outputs."""
        raise NotImplementedError

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """The batch on the backend's device. On CUDA the host copy is page-locked and the
        transfer non-blocking, so it overlaps with work already queued on the stream (the
        forward that follows is ordered after it on the same stream). Elsewhere: unchanged."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return images
        try:
            pinned = images if images.is_pinned() else images.pin_memory()
        except RuntimeError:  # no pinnable memory left: a plain copy still works
            pinned = images
        return pinned.to(self.device, non_blocking=True)

    def check_shape(self, batch: int, spatial: tuple[int, int, int]) -> None:
        """Raise when the artifact cannot take this shape (fixed-profile backends override)."""

    def encode(self, images: torch.Tensor) -> list[Features]:
        """Encode (B, 1, X, Y, Z) images into one :class:`Features` per image (float32, CPU)."""
        if images.ndim != 5 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, X, Y, Z), got shape {tuple(images.shape)}")
        spatial = tuple(int(s) for s in images.shape[2:])
        grid = self.model.grid_for(spatial)
        images = images.detach().to("cpu", torch.float32).contiguous()
        self.check_shape(min(images.shape[0], self.max_batch), spatial)  # type: ignore[arg-type]
        parts: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            for chunk in images.split(self.max_batch):
                parts.append([o.detach().float().cpu() for o in self.forward(self.to_device(chunk))])
        outputs = tuple(torch.cat([p[i] for p in parts]) for i in range(4))
        return split_features(outputs, grid, self.model.feature_layers)  # type: ignore[arg-type]

    def describe(self) -> dict[str, Any]:
        """What a run's provenance records about the backend."""
        return {
            "backend": self.name,
            "precision": self.precision,
            "device": str(self.device),
            "max_batch": self.max_batch,
            "shapes": self.shapes.as_dict(),
            "artifact": str(self.artifact) if self.artifact else None,
            "cache_hit": self.cache_hit,
            "build_seconds": round(self.build_seconds, 3),
            "tolerance": self.tolerance,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r}, device={str(self.device)!r})"
