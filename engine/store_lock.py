"""The result store's lock (one writer at a time): :class:`StoreLock`, which a
:class:`engine.store.ResultStore` holds and its lock methods hand to, and the helpers that create,
judge and break a lock.

Separate from :mod:`engine.store` because it is a protocol of its own; it touches the store only
through ``path``, ``remote``, ``read_only``, ``root``, ``_get_head`` and ``mark_abandoned``.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .errors import StoreError, StoreLocked
from .faults import killpoint
from .zarr_nodes import now

if TYPE_CHECKING:
    from .store import ResultStore

LOCK_NAME = ".mrfm-lock"
LOCK_MAX_BYTES = 4096  # a lock record is ~150 bytes: a larger lock file is damaged, and is never read whole
# an empty or unreadable lock this old is a leftover (a lock is linked into place whole, and older
# versions wrote one in microseconds): broken like a stale one, and reported
UNREADABLE_GRACE_SECONDS = 5.0
# space held beside the lock while a run writes: freed when the disk fills, so that the small
# write marking the run interrupted still fits (a rewritten run record is a few KiB)
RESERVE_NAME = f"{LOCK_NAME}.reserve"
RESERVE_BYTES = 16 * 1024
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


class StoreLock:
    """The lock of a result store, a collaborator the store holds (``ResultStore.locking``)."""

    def __init__(self, store: "ResultStore"):
        self.store = store
        self.held: dict[str, Any] | None = None  # the record of the lock this store object holds
        self._heartbeat: _Heartbeat | None = None
        self.lock_notes: list[str] = []  # what acquire_lock broke on its way in (set per call)

    # ---- lock ---------------------------------------------------------------------------------
    # Local stores: a file created with O_EXCL. Object stores: an object created with a
    # conditional write (If-None-Match: *), which the holder refreshes with a heartbeat, since a
    # pid on another machine cannot be checked.
    @property
    def lock_path(self) -> Path | str:
        return f"{self.store.path}/{LOCK_NAME}" if self.store.remote else Path(self.store.path) / LOCK_NAME

    def lock_holder(self) -> dict[str, Any] | None:
        """The lock's record: None when unlocked, {} when unreadable (being written or damaged)."""
        try:
            raw = (
                self.store._get_head(LOCK_NAME, LOCK_MAX_BYTES + 1)
                if self.store.remote
                else _read_head(self.lock_path, LOCK_MAX_BYTES + 1)
            )
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        if raw is None:
            return None
        if len(raw) > LOCK_MAX_BYTES:
            return {}
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return {}
        return record if isinstance(record, dict) else {}

    def acquire_lock(self, run_id: str) -> dict[str, Any]:
        """Take the store's lock for ``run_id``; marks runs left ``running`` as abandoned.

        A lock of a dead process on this host, or a remote lock whose heartbeat stopped, is
        broken; any other lock raises StoreLocked.
        """
        if self.store.read_only:
            raise StoreError(f"{self.store.path}: opened read-only; cannot take the lock")
        self.lock_notes = []
        record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id, "started": now()}
        if self.store.remote:
            record.update({"token": secrets.token_hex(8), "heartbeat": time.time()})
        for _ in range(5):
            self._refuse_linked_lock()
            if self._create_lock(record):
                self.held = record
                if self.store.remote:
                    self._heartbeat = _Heartbeat(self, record)
                else:
                    self._hold_reserve()
                self.store.mark_abandoned(current=run_id)
                return record
            holder = self.lock_holder()
            if holder is None:
                continue  # released in between: try again
            state = _holder_state(holder)
            age = self._unreadable_lock_age(state)
            if state != "stale" and age is None:
                raise StoreLocked(_locked_message(self.store.path, self.lock_path, holder, state))
            self._break_lock(holder)
            self.lock_notes.append(
                f"{LOCK_NAME}: broke "
                + (
                    f"an unreadable lock file left {age:.0f} s ago by a run that never finished writing it"
                    if age is not None
                    else f"the stale lock of run {holder.get('run_id')} ({self._stale_why(holder)})"
                )
            )
        raise StoreLocked(f"{self.lock_path}: the lock keeps changing hands; try again")

    def _unreadable_lock_age(self, state: str) -> float | None:
        """Seconds since a local lock that cannot be read was last written, when that is longer
        than UNREADABLE_GRACE_SECONDS (a leftover, no live holder); None otherwise."""
        if state != "unknown" or self.store.remote:
            return None
        try:
            age = time.time() - os.lstat(self.lock_path).st_mtime
        except OSError:
            return None
        grace = float(os.environ.get("MRFM_LOCK_UNREADABLE_SECONDS") or UNREADABLE_GRACE_SECONDS)
        return age if age > grace else None

    def _refuse_linked_lock(self) -> None:
        """A symbolic link where the lock belongs is not mrfm's (it never makes one): say what it
        is and leave it alone, rather than read through it or report the lock as changing hands."""
        if self.store.remote or not os.path.islink(self.lock_path):
            return
        target = os.readlink(self.lock_path)
        dangling = "" if os.path.exists(self.lock_path) else ", which does not exist"
        raise StoreError(
            f"{self.lock_path} is a symbolic link to {target!r}{dangling}; mrfm never makes its lock a link "
            f"and leaves it alone. If no run writes {self.store.path}, remove the link"
        )

    def _stale_why(self, holder: dict[str, Any]) -> str:
        if "heartbeat" in holder and holder.get("host") != socket.gethostname():
            return f"no heartbeat since {_ago(holder['heartbeat'])}"
        return f"pid {holder.get('pid')} on {holder.get('host')} is not running"

    def _create_lock(self, record: dict[str, Any]) -> bool:
        if not self.store.remote:
            return _create_exclusive(self.lock_path, record)
        return _create_object_exclusive(self.store.root.store, LOCK_NAME, json.dumps(record).encode())

    def _hold_reserve(self) -> None:
        """Best effort: a disk already too full for the reserve simply has none."""
        reserve = Path(self.store.path) / RESERVE_NAME
        try:
            with open(reserve, "wb") as fh:
                fh.write(b"\0" * RESERVE_BYTES)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            reserve.unlink(missing_ok=True)

    def free_reserve(self) -> None:
        """Give back the space held beside the lock (a full disk, or the end of the run)."""
        if not self.store.remote:
            try:
                (Path(self.store.path) / RESERVE_NAME).unlink(missing_ok=True)
            except OSError:
                pass

    def release_lock(self) -> None:
        """Remove the lock if this store object holds it (never someone else's)."""
        if self.held:
            self.free_reserve()
        mine, self.held = self.held, None
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if not mine:
            return
        holder = self.lock_holder()
        if self.store.remote:
            if holder and holder.get("token") == mine.get("token"):
                sync(self.store.root.store.delete(LOCK_NAME))
        elif holder == mine:
            self.lock_path.unlink(missing_ok=True)

    @contextmanager
    def lock(self, run_id: str) -> Iterator[dict[str, Any]]:
        """``with store.lock(run_id):`` holds the store for one run; see acquire_lock."""
        record = self.acquire_lock(run_id)
        try:
            yield record
        finally:
            self.release_lock()

    def _break_lock(self, holder: dict[str, Any]) -> None:
        """Remove a stale lock, unless another process replaced it since we read it."""
        if self.store.remote:
            # best effort: object stores offer no compare-and-delete, so re-read just before
            if self.lock_holder() == holder:
                sync(self.store.root.store.delete(LOCK_NAME))
            return
        aside = self.lock_path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            os.rename(self.lock_path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(_read_head(aside, LOCK_MAX_BYTES + 1))
        except (OSError, ValueError):
            moved = {}
        if moved != holder:  # a live writer took the lock in between: give it back, never overwrite
            try:
                os.link(aside, self.lock_path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def lock_problem(self) -> str | None:
        """'path: message' for a lock left by a dead process or unreadable; None otherwise."""
        if not self.store.remote and os.path.islink(self.lock_path):
            return f"{LOCK_NAME}: a symbolic link to {os.readlink(self.lock_path)!r}, not a lock mrfm made; remove it"
        holder = self.lock_holder()
        if holder is None:
            return None
        state = _holder_state(holder)
        if state == "stale":
            return f"{LOCK_NAME}: stale lock of run {holder.get('run_id')} ({self._stale_why(holder)}); the next run breaks it"
        if state == "unknown" and self._unreadable_lock_age(state) is not None:
            return f"{LOCK_NAME}: unreadable lock file left by a run that never finished writing it; the next run breaks it"
        if state == "unknown":
            return f"{LOCK_NAME}: unreadable lock file; if no run is writing this store, remove {self.lock_path}"
        return None


def _create_exclusive(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` holding ``record`` unless it exists. The record is written to a private file
    first and hard-linked into place (link(2) fails when the name exists), so the lock is never
    seen empty or half-written, and a write that fails (a full disk) leaves no lock behind."""
    data = json.dumps(record).encode()
    tmp = path.with_name(f"{LOCK_NAME}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        _write_new(tmp, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
    finally:
        tmp.unlink(missing_ok=True)
    # a filesystem without hard links: O_EXCL creates the name, and a failed write removes it again
    try:
        _write_new(path, data)
    except FileExistsError:
        return False
    return True


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (O_CREAT|O_EXCL) holding ``data``, synced; removed again when writing fails."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            killpoint("lock-write")
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def _holder_state(holder: dict[str, Any]) -> str:
    """live | stale | foreign (another host, no heartbeat: cannot tell) | unknown.

    On this host the pid decides; elsewhere a heartbeat older than MRFM_LOCK_STALE_SECONDS
    (default 600) means the holder is gone."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or not holder.get("host"):
        return "unknown"
    if holder["host"] == socket.gethostname():
        return "live" if _pid_alive(pid) else "stale"
    beat = holder.get("heartbeat")
    if isinstance(beat, (int, float)):
        return "stale" if time.time() - beat > lock_stale_seconds() else "live"
    return "foreign"


def lock_stale_seconds() -> float:
    return float(os.environ.get("MRFM_LOCK_STALE_SECONDS") or 600)


def _ago(stamp: float) -> str:
    return _dt.datetime.fromtimestamp(stamp, _dt.timezone.utc).isoformat(timespec="seconds")


def _locked_message(store: Path | str, path: Path | str, holder: dict[str, Any], state: str) -> str:
    who = f"run {holder.get('run_id')} (pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')})"
    if state == "live":
        return f"{store} is in use by {who}; wait for it to finish or stop it"
    if state == "foreign":
        return (
            f"{store} is locked by {who}; this machine cannot tell whether that process still runs. "
            f"If it does not, remove {path}"
        )
    return f"{store} is locked ({path} is unreadable: being written, or damaged). If no run writes this store, remove {path}"


def _create_object_exclusive(zstore: Any, key: str, data: bytes) -> bool:
    """Create object ``key`` unless it exists: a conditional PUT (If-None-Match: *) where the
    filesystem offers one (s3fs), else write, read back and compare (best effort: two writers
    racing within one round trip may both believe they won)."""
    fs, path = zstore.fs, f"{zstore.path.rstrip('/')}/{key}"
    try:
        sync(fs._pipe_file(path, data, mode="create"))
        return True
    except FileExistsError:
        return False
    except Exception as exc:
        if not _unsupported_conditional(exc):
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise
    if sync(zstore.get(key, prototype=default_buffer_prototype())) is not None:
        return False
    sync(zstore.set(key, default_buffer_prototype().buffer.from_bytes(data)))
    back = sync(zstore.get(key, prototype=default_buffer_prototype()))
    return back is not None and back.to_bytes() == data


def _unsupported_conditional(exc: Exception) -> bool:
    text = str(exc)
    return (
        isinstance(exc, (TypeError, NotImplementedError))
        or "NotImplemented" in text
        or "not implemented" in text.lower()
    )


class _Heartbeat:
    """Refreshes a remote lock's heartbeat every MRFM_LOCK_HEARTBEAT_SECONDS (default 60) while
    it is held, so that other machines can tell a live writer from a dead one."""

    def __init__(self, lock: StoreLock, record: dict[str, Any]):
        self.lock, self.record = lock, record
        self.every = float(os.environ.get("MRFM_LOCK_HEARTBEAT_SECONDS") or 60)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mrfm-lock-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.beat()
            except Exception:
                pass  # a missed beat is retried; staleness needs many of them

    def beat(self) -> None:
        holder = self.lock.lock_holder()
        if not holder or holder.get("token") != self.record.get("token"):
            return  # no longer ours: never overwrite another writer's lock
        self.record["heartbeat"] = time.time()
        raw = json.dumps(self.record).encode()
        sync(self.lock.store.root.store.set(LOCK_NAME, default_buffer_prototype().buffer.from_bytes(raw)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _read_head(path: Path, nbytes: int) -> bytes:
    """At most the first ``nbytes`` of the file at ``path``."""
    with open(path, "rb") as fh:
        return fh.read(nbytes)
