"""``mrfm report STORE --out DIR``: the command over :func:`engine.report.write_report`."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("store")
@click.option(
    "--out", "-o", "out", required=True, type=click.Path(file_okay=False), help="Folder for index.html and img/."
)
@click.option(
    "--archive",
    multiple=True,
    type=click.Path(exists=True),
    help="Where the source series are (default: the archive roots recorded in the store's runs).",
)
def report_command(store: str, out: str, archive: tuple[str, ...]) -> None:
    """Write a static HTML report of STORE (a path or URL) into OUT: runs, series by status,
    flagged series, and per series its slice montages with masks and boxes, scores and matches.
    Open OUT/index.html in a browser; it needs no server and fetches nothing."""
    from .cli import _open_existing, console, esc
    from .report import write_report
    from .store import open_store

    s = _open_existing(store, open_store)
    done = write_report(s, out, archive=list(archive) or None)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(done.counts.items())) or "no series"
    console.print(
        f"{esc(done.out / 'index.html')}: {done.series} series ({esc(counts)}), {done.images} images "
        f"({done.drawn} drawn now), {done.seconds:.1f} s",
        highlight=False,
    )
