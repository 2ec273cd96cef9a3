"""pytest fixtures for head authors, loaded through the ``pytest11`` entry point when mrfm is
installed. Imports stay inside the fixtures so that pytest starts fast in any environment."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def mrfm_volume(request: pytest.FixtureRequest) -> Any:
    """A synthetic volume with known geometry (default ``"axial"``); parametrize it indirectly
    with a kind (``"oblique"``, ``"las"`` ...), a dict of :func:`engine.testing.synthetic_volume`
    arguments, or a NIfTI/DICOM path."""
    from engine.testing import (
        load_volume,
        synthetic_volume,
    )  # pytest loads this plugin in every session; the kit loads only when a fixture is used

    spec = getattr(request, "param", "axial")
    return synthetic_volume(**spec) if isinstance(spec, dict) else load_volume(spec)


@pytest.fixture
def mrfm_run_head(mrfm_volume: Any, tmp_path: Any) -> Any:
    """:func:`engine.testing.run_head` on ``mrfm_volume`` unless given another volume;
    ``store=True`` writes to a store in the test's temporary folder and reads it back."""
    from engine.testing import (
        run_head,
    )  # pytest loads this plugin in every session; the kit loads only when a fixture is used

    def run(head: Any, volume: Any = None, *, store: Any = None, **kw: Any) -> Any:
        where = tmp_path / "results.zarr" if store is True else store
        return run_head(head, mrfm_volume if volume is None else volume, store=where, **kw)

    return run
