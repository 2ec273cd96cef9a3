"""ONNX export of the encoder (torch.onnx.export with dynamo=True), shared by the onnxruntime
and TensorRT backends.

The graph takes ``image`` (B, 1, X, Y, Z) float32 with dynamic batch and spatial sizes (each a
multiple of the patch size) and returns ``cls``, ``tokens``, ``layers`` and ``joint`` in float32.
Reduced precisions are carried inside the graph (cast weights and activations), as strongly
typed TensorRT networks require. Opset 18 keeps GELU as Erf arithmetic, which every TensorRT
10.x ONNX parser accepts.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .base import PRECISIONS, CastEncoder

if TYPE_CHECKING:
    from ..model import Model

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("cls", "tokens", "layers", "joint")
# Export-time bounds of the symbolic sizes; the runtime range is the backend's ShapeRange.
MAX_EXPORT_BATCH = 1024
MAX_EXPORT_GRID = 64


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a line per optional operator library it skips; hide them."""
    names = ["torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core", "torch.onnx"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: Model, path: Path, precision: str = "fp32") -> None:
    """Export the model's encoder to ``path`` (a single self-contained .onnx file)."""
    from torch.export import Dim  # heavy: only exporting an ONNX graph needs it

    module = CastEncoder(model.encoder, PRECISIONS[precision]).eval()
    p = model.patch_size
    batch = Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    gx, gy, gz = (Dim(n, min=1, max=MAX_EXPORT_GRID) for n in ("gx", "gy", "gz"))
    example = torch.zeros(2, 1, *model.input_size)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"x": {0: batch, 2: p * gx, 3: p * gy, 4: p * gz}},
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)


def check_onnx(path: Path) -> None:
    """Raise when ``path`` is not a complete, valid encoder graph."""
    import onnx  # heavy: only exporting an ONNX graph needs it

    onnx.checker.check_model(str(path), full_check=False)
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
        raise ValueError(f"{path}: graph I/O {inputs} -> {outputs} is not the encoder's")


def export_versions() -> dict[str, str]:
    """Library versions an exported graph depends on (part of every ONNX-based cache key)."""
    import onnx  # heavy: only exporting an ONNX graph needs it
    import onnxscript  # heavy: only exporting an ONNX graph needs it

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "opset": str(OPSET),
    }
