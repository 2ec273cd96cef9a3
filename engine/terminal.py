"""Text from archives and stores, made safe to print: control characters are shown escaped.

A SeriesDescription, series key, head name or reason may hold ESC sequences (ANSI colours, OSC
window titles, screen clears), BEL or other C0/C1 controls. Printed raw they drive the user's
terminal; :func:`printable` turns each into a visible ``\\x1b``-style escape instead, so nothing is
lost and nothing is executed. Rich markup is a separate matter: :func:`engine.cli.esc` applies
both. The JSON log needs nothing here: ``json.dumps`` escapes every control character.
"""

from __future__ import annotations

import re
from typing import Any

# C0 (tab and newline included: a data string must not break a line or a table row), DEL, C1,
# and the Unicode bidi overrides and isolates that reorder what the terminal shows
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: Any) -> str:
    """``value`` as text with every control character written as a visible escape."""
    text = "" if value is None else str(value)
    return _UNSAFE.sub(_escaped, text)


__all__ = ["printable"]
