"""What every ``mrfm`` command shares: the two consoles, stored text printed literally, the
status colours, UTF-8 text arguments, and opening a store to read. Kept apart from
:mod:`engine.cli` so that commands loaded on demand (:mod:`engine.store_cli`, ``show``, ``report``)
use them without importing the command group."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from .errors import StoreError, UsageError
from .terminal import printable

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error is one line, however long

STATUS_STYLE = {
    "complete": "green",
    "resumed": "cyan",
    "skipped": "yellow",
    "failed": "red",
    "incomplete": "magenta",
    "damaged": "red",
    "interrupted": "yellow",
    "abandoned": "red",
}


def esc(value: Any) -> str:
    """Data from archives and stores (descriptions, reasons, names) printed literally: rich
    markup in a SeriesDescription such as ``[/]`` must neither crash nor style the output, and
    control characters (ANSI/OSC escapes, BEL) are shown escaped, never sent to the terminal."""
    return escape(printable(value))


def styled(status: Any) -> str:
    status = esc(status)
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


def short(uid: str, keep: int = 14) -> str:
    """The distinctive tail of a long UID-derived key, for tables."""
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def utf8_text(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Text arguments must be UTF-8: other bytes reach Python as lone surrogates, which no
    tokenizer, store or terminal can take. One line and exit 2, not a traceback."""
    for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(
                    f"{param.opts[0] if param.opts else param.name}: {ascii(item)} is not UTF-8 text"
                ) from None
    return value


def open_existing(path: str, opener: Any) -> Any:
    """Open a store for reading; one that cannot be read is a store error (exit 3), not a crash."""
    try:
        return opener(path)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{path}: not a readable result store ({type(exc).__name__}: {exc})") from exc
