"""Text a caller hands mrfm (a search query, a run's ``--query``) is UTF-8 or it is refused.

Bytes that are not UTF-8 reach Python as lone surrogates (``os.fsdecode``, ``sys.argv``) or stay
bytes; no tokenizer, store or terminal can take either. The command line and the Python API
refuse them alike: a :class:`~engine.errors.UsageError` naming what was given, never a TypeError
deep in the text tower, nor the ``repr`` of the bytes searched for instead.
"""

from __future__ import annotations

from typing import Any

from .errors import UsageError


def utf8_text(value: Any, what: str) -> str:
    """``value`` as a str when it is UTF-8 text (bytes are decoded strictly), else UsageError."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{what}: {ascii(bytes(value))} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise UsageError(f"{what}: expected text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what}: {ascii(value)} is not UTF-8 text") from None
    return value


__all__ = ["utf8_text"]
