"""The built-in encoder backends, registered through the plugin layer like a third party's.

``torch`` (eager reference), ``onnxruntime`` (CPU), ``torch-compile`` (CUDA, inductor) and
``tensorrt`` (CUDA, compiled plans). ``auto`` tries them by ``auto_priority``.
"""

from __future__ import annotations

from collections.abc import Callable

import engine

from .onnx_runtime import OnnxRuntimeBackend
from .tensorrt import TensorRTBackend
from .torch_compile import TorchCompileBackend
from .torch_eager import TorchBackend

__all__ = ["OnnxRuntimeBackend", "TensorRTBackend", "TorchBackend", "TorchCompileBackend"]


@engine.hookimpl
def register_backends(register: Callable[[type], None]) -> None:
    for cls in (TensorRTBackend, TorchCompileBackend, OnnxRuntimeBackend, TorchBackend):
        register(cls)
