"""Encoder backends: parity with torch, selection, the engine cache, and the exported graph."""

from __future__ import annotations

import copy
import importlib.util
import re
import types

import onnx
import pytest

from engine.errors import BackendUnavailable, UsageError
import torch

import engine
from engine import plugins
from engine.backends import Backend, EngineCache, ShapeRange, cache_key, compile_backend, select
from engine.backends.cache import default_cache_dir, device_identity
from engine.model import load_model

# ONNX operators that TensorRT's ONNX parser supports ("Y" rows of the operator support matrix
# in onnx/onnx-tensorrt docs/operators.md, TensorRT 10.x; the TensorRT 10.0 parser accepts
# opsets 9 to 20). Only the operators an encoder could plausibly produce are listed.
TENSORRT_10_ONNX_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DepthToSpace Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
    GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual
    GroupNormalization HardSigmoid HardSwish Identity If InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization MatMul Max
    MaxPool Mean Min Mod Mul Neg Not OneHot Or Pad Pow PRelu Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize Round Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh Tile TopK Transpose Trilu
    Unsqueeze Where Xor
    """.split()
)
TENSORRT_10_MAX_OPSET = 20
TENSORRT_RESIZE_MODES = {"nearest", "linear"}
TENSORRT_RESIZE_COORDINATES = {
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "asymmetric",
    "align_corners",
}

FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mrfm-cache")


@pytest.fixture(scope="module")
def ort_backend(model, cache_dir):
    """One ONNX export for the whole module (exporting takes ~10 s)."""
    backend, _ = select("onnxruntime", model, cache_dir=cache_dir, max_batch=4)
    return backend


@pytest.fixture(scope="module")
def torch_backend(model):
    backend, _ = select("torch", model, device="cpu", max_batch=4)
    return backend


def max_abs_diff(a, b) -> float:
    diffs = []
    for fa, fb in zip(a, b):
        diffs += [(fa.cls - fb.cls).abs().max(), (fa.tokens - fb.tokens).abs().max(), (fa.joint - fb.joint).abs().max()]
        diffs += [(fa.layers[k] - fb.layers[k]).abs().max() for k in fb.layers]
    return float(max(diffs))


# --- parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(64, 64, 64), (48, 64, 56)])
def test_onnxruntime_matches_torch_fp32_over_batches_and_sizes(ort_backend, torch_backend, spatial):
    gen = torch.Generator().manual_seed(sum(spatial))
    for batch in (1, 2, 3, 4):
        x = torch.randn(batch, 1, *spatial, generator=gen)
        ours, ref = ort_backend.encode(x), torch_backend.encode(x)
        assert len(ours) == batch
        assert ours[0].grid == ref[0].grid and sorted(ours[0].layers) == sorted(ref[0].layers)
        assert max_abs_diff(ours, ref) <= FP32_TOLERANCE, (batch, spatial)


def test_batches_larger_than_max_batch_are_split(ort_backend, torch_backend):
    x = torch.randn(6, 1, 32, 32, 32)
    ours = ort_backend.encode(x)
    assert len(ours) == 6 and max_abs_diff(ours, torch_backend.encode(x)) <= FP32_TOLERANCE


def test_torch_reduced_precision_stays_close(model, torch_backend):
    x = torch.randn(2, 1, 64, 64, 64)
    bf16, _ = select("torch", model, device="cpu", precision="bf16")
    assert max_abs_diff(bf16.encode(x), torch_backend.encode(x)) < 0.1


def test_encode_rejects_malformed_input(torch_backend):
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        torch_backend.encode(torch.zeros(1, 64, 64, 64))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        torch_backend.encode(torch.zeros(1, 1, 64, 64, 63))


# --- exported graph --------------------------------------------------------------------------


def test_exported_graph_uses_only_tensorrt_supported_operators(ort_backend):
    graph = onnx.load(str(ort_backend.artifact))
    ops = {(n.domain or "ai.onnx", n.op_type) for n in graph.graph.node}
    assert {d for d, _ in ops} == {"ai.onnx"}, "custom-domain operators would need TensorRT plugins"
    assert {op for _, op in ops} <= TENSORRT_10_ONNX_OPS, {op for _, op in ops} - TENSORRT_10_ONNX_OPS
    opset = {o.domain or "ai.onnx": o.version for o in graph.opset_import}["ai.onnx"]
    assert 9 <= opset <= TENSORRT_10_MAX_OPSET
    for node in graph.graph.node:
        if node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs.get("mode", b"nearest").decode() in TENSORRT_RESIZE_MODES
            assert attrs.get("coordinate_transformation_mode", b"half_pixel").decode() in TENSORRT_RESIZE_COORDINATES
            assert not attrs.get("antialias", 0)


def test_exported_graph_has_dynamic_batch_and_spatial_sizes(ort_backend):
    graph = onnx.load(str(ort_backend.artifact)).graph
    (image,) = graph.input
    dims = image.type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, False, True, True, True]
    assert dims[1].dim_value == 1
    assert [o.name for o in graph.output] == ["cls", "tokens", "layers", "joint"]


# --- cache -----------------------------------------------------------------------------------

KEY_PARTS = {
    "fingerprint": "sha256:" + "0" * 64,
    "backend": "tensorrt",
    "precision": "fp16",
    "shapes": ShapeRange((16, 16, 16), (64, 64, 64), (64, 64, 64), 4).as_dict(),
    "versions": {"torch": "2.13.0", "tensorrt": "10.9.0"},
    "device": {"type": "cuda", "name": "NVIDIA H100", "capability": "9.0"},
}


# One change to each part that decides whether a compiled artifact is still valid.
KEY_CHANGES = [
    ("fingerprint", "sha256:" + "1" * 64),
    ("backend", "onnxruntime"),
    ("precision", "bf16"),
    ("shapes", ShapeRange((16, 16, 16), (64, 64, 64), (96, 96, 96), 4).as_dict()),
    ("shapes", ShapeRange((16, 16, 16), (64, 64, 64), (64, 64, 64), 8).as_dict()),
    ("versions", {"torch": "2.13.0", "tensorrt": "11.0.0"}),
    ("versions", {"torch": "2.14.0", "tensorrt": "10.9.0"}),
    ("device", {"type": "cuda", "name": "NVIDIA H200", "capability": "9.0"}),
    ("device", {"type": "cuda", "name": "NVIDIA H100", "capability": "8.9"}),
]


def _reordered(value):
    """An equal copy whose dicts are built in reverse insertion order, at every depth."""
    if isinstance(value, dict):
        return {k: _reordered(v) for k, v in reversed(list(value.items()))}
    return copy.deepcopy(value)


@pytest.mark.parametrize(("part", "value"), KEY_CHANGES)
def test_cache_key_changes_when_any_part_changes(part, value):
    base = cache_key(**KEY_PARTS)
    assert cache_key(**{**KEY_PARTS, part: value}) != base
    assert cache_key(**{**KEY_PARTS, part: _reordered(KEY_PARTS[part])}) == base  # an equal value does not


def test_every_change_gives_its_own_key():
    keys = {cache_key(**KEY_PARTS)} | {cache_key(**{**KEY_PARTS, part: value}) for part, value in KEY_CHANGES}
    assert len(keys) == len(KEY_CHANGES) + 1


def test_equal_parts_built_separately_give_equal_keys():
    rebuilt = {name: _reordered(value) for name, value in reversed(list(KEY_PARTS.items()))}
    assert rebuilt == KEY_PARTS and rebuilt["device"] is not KEY_PARTS["device"]
    assert list(rebuilt["device"]) != list(KEY_PARTS["device"])  # really another insertion order
    assert cache_key(**rebuilt) == cache_key(**KEY_PARTS)
    assert re.fullmatch(r"[0-9a-f]{32}", cache_key(**KEY_PARTS))


def test_a_backend_keys_its_artifact_on_model_precision_versions_and_device(model, ort_backend):
    import onnxruntime

    parts = ort_backend.key_parts
    assert parts["fingerprint"] == model.fingerprint and parts["precision"] == "fp32"
    assert parts["versions"]["onnxruntime"] == onnxruntime.__version__
    assert parts["versions"]["torch"] == torch.__version__
    assert parts["device"] == device_identity("cpu") and parts["shapes"]
    assert ort_backend.artifact.name == f"onnxruntime-{cache_key(**parts)}.onnx"


def test_a_cached_export_is_reused(model, cache_dir, ort_backend):
    again, _ = select("onnxruntime", model, cache_dir=cache_dir)
    assert again.cache_hit is True and again.artifact == ort_backend.artifact


def test_a_corrupt_cached_file_is_rebuilt(model, torch_backend, tmp_path):
    first, _ = select("onnxruntime", model, cache_dir=tmp_path)
    assert first.cache_hit is False
    first.artifact.write_bytes(b"not an onnx graph")
    rebuilt, _ = select("onnxruntime", model, cache_dir=tmp_path)
    assert rebuilt.cache_hit is False and rebuilt.artifact == first.artifact
    x = torch.randn(1, 1, 64, 64, 64)
    assert max_abs_diff(rebuilt.encode(x), torch_backend.encode(x)) <= FP32_TOLERANCE
    leftovers = [p.name for p in rebuilt.artifact.parent.iterdir() if ".tmp" in p.name]
    assert leftovers == []
    assert rebuilt.artifact.with_name(rebuilt.artifact.name + ".json").is_file()


def test_engine_cache_builds_once_and_removes_partial_files(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.path("demo", "k", ".bin")
    calls = []

    def build(tmp):
        calls.append(tmp)
        tmp.write_bytes(b"ok")

    assert cache.get_or_build(path, build, lambda p: p.read_bytes(), {"x": 1})[:2] == (b"ok", False)
    assert cache.get_or_build(path, build, lambda p: p.read_bytes())[:2] == (b"ok", True)
    assert len(calls) == 1

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("build failed")

    other = cache.path("demo", "j", ".bin")
    with pytest.raises(RuntimeError, match="build failed"):
        cache.get_or_build(other, failing, lambda p: p.read_bytes())
    assert not other.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_engine_cache_rejects_a_build_that_cannot_be_loaded(tmp_path):
    cache = EngineCache(tmp_path)
    path = cache.path("demo", "k", ".bin")
    with pytest.raises(RuntimeError, match="could not be loaded"):
        cache.get_or_build(path, lambda tmp: tmp.write_bytes(b"x"), lambda p: None)
    assert not path.exists()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MRFM_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("MRFM_CACHE_DIR")
    assert default_cache_dir().name == "mrfm"


# --- selection -------------------------------------------------------------------------------


def test_the_four_backends_are_registered_through_plugins():
    assert {"torch", "onnxruntime", "torch-compile", "tensorrt"} <= set(plugins.get_backends())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only choice")
def test_auto_on_cpu_picks_onnxruntime_and_says_why(model, cache_dir):
    backend, reason = select("auto", model, cache_dir=cache_dir)
    assert backend.name == "onnxruntime"
    assert reason.startswith("auto: ") and reason.endswith("-> onnxruntime")
    assert "tensorrt:" in reason and "torch-compile:" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_gpu_backends_explain_why_they_cannot_run_on_cpu(model):
    classes = {n: r.obj for n, r in plugins.get_backends().items()}
    ok, why = classes["torch-compile"].available()
    assert not ok and "CUDA" in why
    ok, why = classes["tensorrt"].available()
    assert not ok and why
    with pytest.raises(BackendUnavailable, match="'torch-compile' is not available: CUDA is not available"):
        select("torch-compile", model)


def test_unknown_backend_and_precision_are_reported(model):
    with pytest.raises(UsageError, match="unknown backend 'fast'; registered backends: .*onnxruntime"):
        select("fast", model)
    with pytest.raises(ValueError, match="supports precisions"):
        select("onnxruntime", model, precision="bf16")


def test_auto_skips_a_backend_that_fails_to_start(model, monkeypatch):
    class Broken(Backend):
        name = "broken"
        auto_priority = 99

        def __init__(self, model, **kw):
            raise RuntimeError("no luck")

    classes = {"broken": Broken, "torch": plugins.get_backends()["torch"].obj}
    monkeypatch.setattr("engine.backends.backend_classes", lambda: classes)
    backend, reason = select("auto", model, device="cpu")
    assert backend.name == "torch"
    assert "broken: failed to start (RuntimeError: no luck)" in reason


def test_a_third_party_backend_registers_through_the_plugin_manager(model):
    class Echo(Backend):
        name = "echo-test"

        def forward(self, images):
            return model.encoder(images)

    plugin = types.SimpleNamespace()

    @engine.hookimpl
    def register_backends(register):
        register(Echo)

    plugin.register_backends = register_backends
    plugins.load_plugins()
    plugins.pm.register(plugin, name="echo-test-plugin")
    try:
        backend, reason = select("echo-test", model)
        assert reason == "echo-test: requested"
        assert len(backend.encode(torch.zeros(2, 1, 32, 32, 32))) == 2
    finally:
        plugins.pm.unregister(plugin)
    assert "echo-test" not in plugins.get_backends()


def test_compile_reports_what_was_built_and_where(model, cache_dir, ort_backend):
    info = compile_backend(model, backend="onnxruntime", precision="fp32", max_batch=4, cache_dir=str(cache_dir))
    assert info["backend"] == "onnxruntime" and info["artifact"] == str(ort_backend.artifact)
    assert info["cache_hit"] is True and info["fingerprint"] == model.fingerprint
    assert info["seconds"] >= 0 and info["reason"] == "onnxruntime: requested"
    assert info["shapes"]["opt_spatial"] == [64, 64, 64]


def test_shape_ranges():
    r = ShapeRange.covering([(64, 64, 64), (48, 64, 56)], max_batch=2)
    assert r.min_spatial == (48, 64, 56) and r.max_spatial == (64, 64, 64) and r.opt_spatial == (64, 64, 64)
    assert r.contains(2, (56, 64, 60)) and not r.contains(3, (64, 64, 64)) and not r.contains(1, (72, 64, 64))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeRange((64, 64, 64), (32, 32, 32), (64, 64, 64))


# --- GPU backends (skipped where their libraries or a GPU are missing) -----------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed")


@pytest.mark.gpu
@needs_cuda
def test_torch_compile_matches_torch_on_cuda(model, torch_backend):
    compiled, _ = select("torch-compile", model)
    x = torch.randn(2, 1, 64, 64, 64)
    assert max_abs_diff(compiled.encode(x), torch_backend.encode(x)) <= 1e-3


@pytest.mark.gpu
@needs_cuda
@needs_tensorrt
def test_tensorrt_fp32_matches_torch_and_reuses_its_plan(model, torch_backend, tmp_path):
    trt_backend, _ = select("tensorrt", model, cache_dir=tmp_path)
    assert trt_backend.cache_hit is False and trt_backend.timing_cache_path.is_file()
    for spatial in ((64, 64, 64), (48, 64, 56)):
        x = torch.randn(3, 1, *spatial)
        assert max_abs_diff(trt_backend.encode(x), torch_backend.encode(x)) <= 1e-3
    again, _ = select("tensorrt", model, cache_dir=tmp_path)
    assert again.cache_hit is True
    trt_backend.artifact.write_bytes(b"corrupt plan")
    rebuilt, _ = select("tensorrt", model, cache_dir=tmp_path)
    assert rebuilt.cache_hit is False


@pytest.mark.gpu
@needs_cuda
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt_reduced_precision_is_close(model, torch_backend, tmp_path, precision):
    trt_backend, _ = select("tensorrt", model, cache_dir=tmp_path, precision=precision)
    x = torch.randn(2, 1, 64, 64, 64)
    assert max_abs_diff(trt_backend.encode(x), torch_backend.encode(x)) < 0.1
