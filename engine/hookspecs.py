"""The plugin contract. Every hook receives a ``register`` callback rather than returning values,
so the plugin manager can record which plugin registered what and reject duplicates."""

from __future__ import annotations

from typing import Callable

import click
import pluggy

hookspec = pluggy.HookspecMarker("mrfm")
hookimpl = pluggy.HookimplMarker("mrfm")


@hookspec
def register_heads(register: Callable[[type], None]) -> None:
    """Register head classes (subclasses of ``engine.Head``) with ``register(HeadClass)``."""


@hookspec
def register_backends(register: Callable[[type], None]) -> None:
    """Register encoder backends (subclasses of ``engine.Backend``) with ``register(BackendClass)``."""


@hookspec
def register_readers(register: Callable[[object], None]) -> None:
    """Register series readers (objects implementing ``engine.Reader``) with ``register(reader)``."""


@hookspec
def register_encoders(register: Callable[[object], None]) -> None:
    """Register encoder architectures (objects with ``name`` and ``build(card) -> nn.Module``) with ``register(architecture)``."""


@hookspec
def register_exporters(register: Callable[[object], None]) -> None:
    """Register result exporters (objects implementing ``engine.Exporter``: store -> DICOM SEG/SR, NIfTI, OME-Zarr, Parquet ...) with ``register(exporter)``."""


@hookspec
def register_sources(register: Callable[[object], None]) -> None:
    """Register archive sources (objects implementing ``engine.Source``: folders, DICOMweb, DIMSE ...) with ``register(source)``."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands or groups to the ``mrfm`` command line."""
