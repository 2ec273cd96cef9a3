"""``tensorrt``: a TensorRT engine built from the encoder's ONNX export and cached on disk.

Written to the TensorRT 10.x / 11.x Python API: a strongly typed network (the precision is the
exported graph's: fp32, or weights and activations cast to bf16/fp16 with float32 LayerNorm and
I/O; TensorRT 11 removed the FP16/BF16 builder flags and always types strongly), the ONNX parser,
one optimization profile over batch and volume size, a timing cache kept beside the plans, and
``execute_async_v3`` on torch's current CUDA stream with torch tensors' addresses.

Verification status: the ONNX graph this backend parses is tested on CPU (operators against
TensorRT's ONNX support matrix, numerics against torch through onnxruntime). The TensorRT calls
themselves have not been run: TensorRT cannot be installed on the development machines.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

import engine
from engine import (
    INPUT_NAME,
    OUTPUT_NAMES,
    Backend,
    EncoderOutputs,
    atomic_write_bytes,
    cache_key,
    check_onnx,
    device_identity,
    export_onnx,
    export_versions,
)

WORKSPACE_BYTES = 4 << 30


def _trt() -> Any:
    import tensorrt as trt  # optional: the backend reports itself unavailable without it

    return trt


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    for name, tdtype in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdtype
    if dtype not in table:
        raise TypeError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTBackend(Backend):
    name = "tensorrt"
    precisions = ("fp32", "bf16", "fp16")
    auto_priority = 40
    tolerance = "fp32: expected <= 1e-3 vs torch eager fp32 (TF32 disabled); not yet measured on a GPU"

    @classmethod
    def available(cls, device: str | torch.device | None = None) -> tuple[bool, str]:
        try:
            trt = _trt()
        except ImportError:
            return False, "tensorrt is not installed"
        if device is not None and torch.device(device).type != "cuda":
            return False, f"needs a CUDA device, not {torch.device(device)}"
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"

    @classmethod
    def default_device(cls) -> torch.device:
        return torch.device("cuda")

    def __init__(self, model: Any, **kw: Any):
        super().__init__(model, **kw)
        if self.device.type != "cuda":
            raise engine.BackendUnavailable(f"tensorrt runs on CUDA devices, not {self.device}")
        trt = _trt()
        self._trt_mod = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        cache = self.engine_cache()
        gpu = device_identity(self.device)

        onnx_parts = {
            "fingerprint": model.fingerprint,
            "backend": "onnx",
            "precision": self.precision,
            "shapes": {"batch": "dynamic", "spatial": f"dynamic multiples of {model.patch_size}"},
            "versions": export_versions(),
            "device": {"type": "any"},
        }
        onnx_path = cache.path("onnx", cache_key(**onnx_parts), ".onnx")
        cache.get_or_build(
            onnx_path,
            lambda tmp: export_onnx(model, tmp, self.precision),
            lambda p: (check_onnx(p), p)[1],
            meta=onnx_parts,
        )

        self.key_parts = {
            "fingerprint": model.fingerprint,
            "backend": self.name,
            "precision": self.precision,
            "shapes": self.shapes.as_dict(),
            "versions": {**export_versions(), "tensorrt": trt.__version__},
            "device": gpu,
        }
        slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu["name"]).strip("-").lower()
        self.timing_cache_path = (
            cache.root / f"tensorrt-{trt.__version__}-{slug}-sm{gpu['capability'].replace('.', '')}.timing"
        )
        path = cache.path(self.name, cache_key(**self.key_parts), ".plan")
        self.engine, self.cache_hit, self.build_seconds = cache.get_or_build(
            path, lambda tmp: self._build_plan(onnx_path, tmp), self._deserialize, meta=self.key_parts
        )
        self.artifact = path
        with torch.cuda.device(self.device):
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")

    # -- build --------------------------------------------------------------------------------

    def _build_plan(self, onnx_path: Path, out: Path) -> None:
        trt = self._trt_mod
        builder = trt.Builder(self._logger)
        flags = 0
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed is not None:  # required on 10.x; accepted (always on) on 11.x
            flags |= 1 << int(strongly_typed)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if self.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32 matmuls, as in torch's default
        s = self.shapes
        profile = builder.create_optimization_profile()
        profile.set_shape(
            INPUT_NAME,
            (1, 1, *s.min_spatial),
            (s.max_batch, 1, *s.opt_spatial),
            (s.max_batch, 1, *s.max_spatial),
        )
        config.add_optimization_profile(profile)
        with FileLock(str(self.timing_cache_path) + ".lock"):
            timing = self._timing_cache(config)
            config.set_timing_cache(timing, ignore_mismatch=False)
            with torch.cuda.device(self.device):
                plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
            atomic_write_bytes(self.timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        with open(out, "wb") as fh:
            fh.write(memoryview(plan))

    def _timing_cache(self, config: Any) -> Any:
        """The saved timing cache for this TensorRT version and GPU, or a fresh one."""
        data = self.timing_cache_path.read_bytes() if self.timing_cache_path.exists() else b""
        try:
            cache = config.create_timing_cache(data)
        except Exception:
            cache = None
        return cache if cache is not None else config.create_timing_cache(b"")

    def _deserialize(self, path: Path) -> Any:
        """The engine, or None when the plan is corrupt or from another TensorRT/GPU."""
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            return None
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        return engine if names == {INPUT_NAME, *OUTPUT_NAMES} else None

    # -- run ----------------------------------------------------------------------------------

    def check_shape(self, batch: int, spatial: tuple[int, int, int]) -> None:
        if not self.shapes.contains(batch, spatial):
            s = self.shapes
            raise ValueError(
                f"the TensorRT engine accepts batch 1..{s.max_batch} and sizes {s.min_spatial}..{s.max_spatial}, "
                f"not batch {batch} of {spatial}; rebuild it with a shape range covering these volumes"
            )

    def forward(self, images: torch.Tensor) -> EncoderOutputs:
        trt, ctx = self._trt_mod, self.context
        x = images.to(self.device, non_blocking=True).contiguous()
        if not ctx.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise ValueError(f"TensorRT rejected input shape {tuple(x.shape)}")
        ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
        outputs = []
        for name in OUTPUT_NAMES:
            shape = tuple(ctx.get_tensor_shape(name))
            out = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)), device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        return tuple(outputs)  # type: ignore[return-value]
