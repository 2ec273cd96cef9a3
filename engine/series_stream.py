"""A PACS query's series as they arrive, so the first series is fetched and run while the query
is still paging (QIDO-RS ``limit``/``offset``, C-FIND pending responses).

A :class:`SeriesStream` is consumed once, page by page. The run triages each page as it comes
(resume is answered per page) and hands its series to the loaders, which fetch them; nothing
waits for the whole listing. A query that fails after its first page (the server went away)
ends the stream with a warning: the series listed so far are run, the rest wait for a rerun, and
the run exits 1. A query that fails on its first page fails before the run begins (exit 2).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

from .errors import SourceError


class SeriesStream:
    """Pages (lists) of series refs, pulled from ``pages`` only as the run asks for them."""

    def __init__(self, pages: Iterable[list[Any]], warnings: list[str] | None = None) -> None:
        self._pages = iter(pages)
        self._peeked: list[list[Any]] = []
        self._started = False
        self.by_key: dict[str, Any] = {}  # every series listed so far, by key
        self.studies: set[str] = set()
        self.warnings = warnings if warnings is not None else []
        self.incomplete = False  # the query stopped before its end

    @classmethod
    def chain(cls, parts: Iterable[Any]) -> "SeriesStream":
        """One stream over lists and streams, in order (each archive argument's series)."""
        parts = list(parts)
        warnings: list[str] = []
        streams = [p for p in parts if isinstance(p, SeriesStream)]
        joined = cls(
            itertools.chain.from_iterable(p._raw_pages() if isinstance(p, SeriesStream) else [list(p)] for p in parts),
            warnings,
        )
        joined._children = streams  # type: ignore[attr-defined]
        return joined

    def _raw_pages(self) -> Iterator[list[Any]]:
        """The pages, recording nothing (a chained stream records them); query failures become
        warnings of the stream that ends."""
        yield from self._peeked
        self._peeked = []
        while True:
            try:
                page = next(self._pages)
            except StopIteration:
                return
            except SourceError as exc:
                self.incomplete = True
                self.warnings.append(
                    f"the series query stopped early ({exc}); the series listed before it ran, rerun to run the rest"
                )
                return
            yield page

    def _pull(self) -> list[Any] | None:
        if not hasattr(self, "_raw"):
            self._raw = self._raw_pages()
        page = next(self._raw, None)
        if page is not None:
            for ref in page:
                self.by_key[ref.key] = ref
                self.studies.add(ref.study_uid)
        return page

    def __bool__(self) -> bool:
        """Whether the query found any series: pulls pages until one holds a series."""
        while not self.by_key:
            page = self._pull()
            if page is None:
                return False
            self._peeked.append(page)
        return True

    def pages(self) -> Iterator[list[Any]]:
        """Each page once, as it arrives."""
        if self._started:
            raise RuntimeError("a series stream is consumed once")
        self._started = True
        while self._peeked:
            yield self._peeked.pop(0)
        while (page := self._pull()) is not None:
            yield page

    def __iter__(self) -> Iterator[Any]:
        for page in self.pages():
            yield from page

    def late_warnings(self) -> list[str]:
        """Warnings raised while the run consumed the stream (a query that stopped early)."""
        return self.warnings + [w for s in getattr(self, "_children", []) for w in s.warnings]

    @property
    def stopped_early(self) -> bool:
        return self.incomplete or any(s.incomplete for s in getattr(self, "_children", []))


def background_pages(produce: Callable[[Callable[[Any], None]], None], name: str) -> Iterator[list[Any]]:
    """Pages of one series each, produced on a thread of their own: ``produce(put)`` calls
    ``put(ref)`` for each series as its query response arrives. A DIMSE query runs this way, at
    the peer's pace rather than the run's: a C-FIND left pending while the run works for minutes
    would time out at the peer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()
    end = object()

    def work() -> None:
        try:
            produce(q.put)
        except BaseException as exc:  # handed to the consumer, which turns it into a warning
            q.put(exc if isinstance(exc, SourceError) else SourceError(f"{type(exc).__name__}: {exc}"))
        finally:
            q.put(end)

    threading.Thread(target=work, name=name, daemon=True).start()
    while True:
        item = q.get()
        if item is end:
            return
        if isinstance(item, SourceError):
            raise item
        yield [item]
