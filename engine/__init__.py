"""mrfm's engine: the public API for users and plugin authors.

Plugin authors import only what is exported here (``import engine`` / ``@engine.hookimpl``).
"""

from __future__ import annotations

from .features import Features, HeadInput, TextFeatures, View
from .geometry import Volume
from .heads import Head, HeadContext, HeadOutputError
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Features",
    "Head",
    "HeadContext",
    "HeadInput",
    "HeadOutputError",
    "TextFeatures",
    "View",
    "Volume",
    "hookimpl",
    "__version__",
]
