"""A full disk (ENOSPC) or an exhausted quota (EDQUOT) is an expected error, not a crash.

Whatever raised it (the lock, a chunk, attributes, the index, the run record, an export file),
it becomes :class:`~engine.errors.DiskFull` (a StoreError: exit 3) naming the folder whose device
is full. Writers leave what they had written consistent, so a rerun after freeing space resumes.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DiskFull

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def no_space(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind ``exc`` (itself, its cause or context), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full(where: str | Path, exc: BaseException | None = None) -> DiskFull:
    """The DiskFull error for a write under ``where`` that failed with ``exc``."""
    cause = no_space(exc)
    what = "quota exceeded" if cause is not None and cause.errno == errno.EDQUOT else "no space left"
    return DiskFull(f"{what} on the device holding {where}; free space and rerun the same command to resume")


@contextmanager
def disk_full_is_store_error(where: str | Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block, however wrapped, into DiskFull naming ``where``."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if no_space(exc) is None:
            raise
        raise disk_full(where, exc) from exc
