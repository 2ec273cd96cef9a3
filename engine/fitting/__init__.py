"""Fitting and evaluating heads on a frozen encoder: ``mrfm fit``, ``mrfm evaluate``, ``mrfm model
import``. A library beside the runtime: the run path (engine.pipeline and what it imports) never
imports it. Features are cached per model fingerprint (:mod:`engine.fitting.cache`)."""

from __future__ import annotations

from typing import Any

__all__ = ["FeatureCache", "evaluate", "fit", "import_checkpoint", "read_labels"]


def __getattr__(name: str) -> Any:  # light import: the CLI loads these only when a command runs
    if name == "fit":
        from .fitter import fit  # fitting loads its parts on first use (torch training code stays off the CLI start-up)

        return fit
    if name == "evaluate":
        from .evaluation import (
            evaluate,
        )  # fitting loads its parts on first use (torch training code stays off the CLI start-up)

        return evaluate
    if name == "import_checkpoint":
        from .importing import (
            import_checkpoint,
        )  # fitting loads its parts on first use (torch training code stays off the CLI start-up)

        return import_checkpoint
    if name == "read_labels":
        from .labels import (
            read_labels,
        )  # fitting loads its parts on first use (torch training code stays off the CLI start-up)

        return read_labels
    if name == "FeatureCache":
        from .cache import (
            FeatureCache,
        )  # fitting loads its parts on first use (torch training code stays off the CLI start-up)

        return FeatureCache
    raise AttributeError(name)
