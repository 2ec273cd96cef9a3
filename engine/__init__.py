"""mrfm's engine: the public API for users and plugin authors.

Plugin authors import only what is exported here (``import engine`` / ``@engine.hookimpl``):
heads the head base classes, spec and feature types; readers, exporters, backends, encoders and
sources their protocols and the few helpers the built-in ones use (each built-in plugin is
written as a third party would write it). Names from modules with heavy dependencies (pydicom,
nibabel, onnx) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import centre_boxes, errors, head_nets, token_boxes, vocabulary
from ._version import __version__
from .backends.base import Backend
from .errors import (
    BackendUnavailable,
    GeometryError,
    HeadError,
    InputError,
    LoadError,
    MrfmError,
    SkipSeries,
    SourceError,
    StoreError,
    StoreLocked,
    UsageError,
)
from .export import ExportContext, affine_of, hex_rgb
from .features import Features, HeadInput, TextFeatures, View, ViewInfo
from .geometry import Volume
from .heads import Head, HeadContext, HeadOutputError, NetHead
from .hookspecs import hookimpl
from .protocols import EncoderOutputs, Exporter, Reader
from .discover import ScanResult
from .series_ref import SeriesRef, sanitise_key
from .series_stream import SeriesStream, background_pages
from .sources import (
    PACS_READER,
    PacsReader,
    RemoteRef,
    Source,
    SourceOptions,
    http_session,
    instances_digest,
    is_url,
    public_url,
)

if TYPE_CHECKING:
    from .backends.cache import atomic_write_bytes, cache_key, device_identity
    from .backends.export import INPUT_NAME, OUTPUT_NAMES, check_onnx, export_onnx, export_versions
    from .dicom import DicomReader
    from .model import VisionTransformer3D, config_from_card
    from .nifti import NiftiReader
    from .token_boxes import basin_boxes, basins, box_iou3d, grow_from_peak, nms3d, region_boxes

# name -> module, imported on first access (PEP 562) so that ``import engine`` stays light
_LAZY = {
    # backend authors: the engine cache key, atomic writes, the ONNX graph every exported backend runs
    "atomic_write_bytes": "engine.backends.cache",
    "cache_key": "engine.backends.cache",
    "device_identity": "engine.backends.cache",
    "INPUT_NAME": "engine.backends.export",
    "OUTPUT_NAMES": "engine.backends.export",
    "check_onnx": "engine.backends.export",
    "export_onnx": "engine.backends.export",
    "export_versions": "engine.backends.export",
    # encoder architectures: the built-in 3D ViT and its card reader
    "VisionTransformer3D": "engine.model",
    "config_from_card": "engine.model",
    # the built-in readers, registered by plugins.readers
    "DicomReader": "engine.dicom",
    "NiftiReader": "engine.nifti",
    # heads: boxes from token-grid probabilities (view space)
    "is_safe_name": "engine.safe_paths",
    "basin_boxes": "engine.token_boxes",
    "basins": "engine.token_boxes",
    "box_iou3d": "engine.token_boxes",
    "grow_from_peak": "engine.token_boxes",
    "nms3d": "engine.token_boxes",
    "region_boxes": "engine.token_boxes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def run(*args, **kwargs):
    """Run the model and heads over archives into a store: see :func:`engine.pipeline.run`."""
    from .pipeline import run as _run  # the run path (torch, zarr, executors) loads only when used

    return _run(*args, **kwargs)


def scan(*args, **kwargs):
    """Find studies and series from headers only: see :func:`engine.discover.scan`."""
    from .discover import scan as _scan  # the walker and its readers load only when used

    return _scan(*args, **kwargs)


def open_store(*args, **kwargs):
    """Open a result store: see :func:`engine.store.open_store`."""
    from .store import open_store as _open  # zarr loads only when used

    return _open(*args, **kwargs)


__all__ = [
    # errors
    "BackendUnavailable",
    "GeometryError",
    "HeadError",
    "HeadOutputError",
    "InputError",
    "LoadError",
    "MrfmError",
    "SkipSeries",
    "SourceError",
    "StoreError",
    "StoreLocked",
    "UsageError",
    "errors",
    # modules heads build on
    "centre_boxes",
    "head_nets",
    "token_boxes",
    "vocabulary",
    # running: what the command line calls
    "open_store",
    "run",
    "scan",
    "__version__",
    # the plugin contract and its types
    "hookimpl",
    "Backend",
    "EncoderOutputs",
    "Exporter",
    "Reader",
    "Source",
    "SeriesRef",
    "PACS_READER",
    "PacsReader",
    "RemoteRef",
    "ScanResult",
    "SeriesStream",
    "background_pages",
    "SourceOptions",
    "http_session",
    "instances_digest",
    "is_url",
    "public_url",
    "sanitise_key",
    "Features",
    "Head",
    "HeadContext",
    "HeadInput",
    "NetHead",
    "TextFeatures",
    "View",
    "ViewInfo",
    "Volume",
    # helpers the built-in plugins use (exporters, backends, encoders, readers, heads)
    "ExportContext",
    "affine_of",
    "hex_rgb",
    "is_safe_name",
    "atomic_write_bytes",
    "cache_key",
    "device_identity",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "check_onnx",
    "export_onnx",
    "export_versions",
    "VisionTransformer3D",
    "config_from_card",
    "DicomReader",
    "NiftiReader",
    "basin_boxes",
    "basins",
    "box_iou3d",
    "grow_from_peak",
    "nms3d",
    "region_boxes",
]
