"""The on-disk spool: append-only, checksummed segments of encoded messages.

One directory per writer (``<spool_dir>/<writer_id>/``) holds everything that
writer could not deliver, so a spool can be replayed with the writer's own
``(writer_id, seq)`` and the server's dedupe makes every replay exactly-once in
effect::

    LOCK                  flock held by the live owner; a replayer takes it first
    meta.json             writer id, mode (online/offline), server URL, pid, host
    seg-00000001.spool    MetricBatch records in seq order; rotated by size
    ops.spool             run records: CreateRun (offline), LogParams, SetTags, UpdateRun
    runs.json             written by a replay: local (offline) run id -> server run id

The records' format, and reading a file of them back (``scan``), are ``records.py``'s.

``WriterSpool`` is used by one thread (the sender's worker); it creates its
directory on the first write, never in the constructor, raises every failure of
the disk as a ``SpoolError`` naming the file, and leaves no partial record behind
a failed write. It keeps open only the segment it writes (and the last older one
read), so the fds it holds do not grow with the backlog.

A directory is removed (``remove_dir``) by the holder of its lock, renamed aside
first; ``try_lock`` then refuses it to a process that opened its LOCK earlier, so
nothing left in a directory being removed is ever replayed twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trackhouse.client.errors import SpoolError
from trackhouse.client.records import MAGIC as MAGIC  # the format's names, re-exported
from trackhouse.client.records import Corruption as Corruption
from trackhouse.client.records import Kind as Kind
from trackhouse.client.records import Record as Record
from trackhouse.client.records import encode_record as encode_record
from trackhouse.client.records import record_at
from trackhouse.client.records import scan as scan
from trackhouse.client.records import scan_ops as scan_ops

LOCK, META, OPS, RUNS = "LOCK", "meta.json", "ops.spool", "runs.json"
SEGMENT_GLOB = "seg-*.spool"
LOCAL_RUN_TAG = "trackhouse.local_run_id"
RESUMED_TAG = "trackhouse.resumed_at"  # ms a process resumed the run: a spooled final status before it is stale
EXPERIMENT_TAG = "trackhouse.experiment_name"


@dataclass(frozen=True)
class Location:
    """Where one record lives: segment number and the offset of its header."""

    segment: int
    offset: int
    length: int


def segment_number(path: Path) -> int:
    return int(path.name[4:-6])


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(SEGMENT_GLOB), key=segment_number)


def try_lock(directory: Path) -> int | None:
    """An fd holding ``directory``'s exclusive lock; None when a live process holds it or has removed the
    directory. A directory that cannot be written cannot be synced (a sync records its progress there, and
    removes it at the end): a ``SpoolError`` saying so."""
    path = directory / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # renamed aside by ``remove_dir`` since it was listed
        return None
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise SpoolError(f"spool directory {directory} is not writable ({exc.strerror}): a sync records its "
                             "progress in it and removes it when done; copy it somewhere writable and sync "
                             "the copy") from exc
        raise SpoolError(f"cannot lock spool directory {directory}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A LOCK opened before its holder removed the directory is locked once the holder is done, but
        # it is no longer the directory's: what was left there must not be replayed again.
        ours = os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        ours = False
    if not ours:
        os.close(fd)
        return None
    return fd


def rename_aside(directory: Path, target: Path) -> Path:
    """Rename ``directory`` (its lock held) to ``target`` before anything in it is deleted: no process finds it, nor
    locks a LOCK created anew in it, afterwards. Where it is: ``target``, else (parent not writable) ``directory``."""
    try:
        return directory.rename(target)
    except OSError:
        return directory


def remove_dir(directory: Path) -> None:
    """Delete a spool directory whose lock the caller holds: ``rename_aside`` first, else its files at least."""
    shutil.rmtree(rename_aside(directory, directory.with_name(f".{directory.name}.removed-{secrets.token_hex(4)}")),
                  ignore_errors=True)  # ``writer_dirs`` skips the hidden name


_HELD: set[int] = set()  # replay locks of this process (``hold_lock``)


def hold_lock(directory: Path) -> int | None:
    """``try_lock`` for a replay, whose lock a forked child must not keep: a flock belongs to the open
    file, which the child shares, so a DataLoader worker would hold the directory while it lives."""
    fd = try_lock(directory)
    if fd is not None:
        _HELD.add(fd)
    return fd


def release_lock(fd: int) -> None:
    _HELD.discard(fd)
    os.close(fd)


def _drop_held_in_child() -> None:
    while _HELD:
        with contextlib.suppress(OSError):
            os.close(_HELD.pop())


os.register_at_fork(after_in_child=_drop_held_in_child)


def read_meta(directory: Path) -> dict[str, Any]:
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def write_json_atomic(path: Path, value: Any) -> None:
    """Write-then-rename, fsynced: a crash leaves the old file or the new one."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def writer_dirs(root: Path) -> list[Path]:
    """The writer directories under a spool root, or ``[root]`` when it is one itself."""
    if (root / META).exists():
        return [] if root.name.endswith(".corrupt") else [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".corrupt")
                  and not p.name.startswith(".") and (p / META).exists())


def _append(fd: int, record: bytes, size: int, *, durable: bool = False) -> tuple[int, OSError | None]:
    """Append all of ``record`` (``os.write`` may write part of it) to the ``size``-byte file ``fd`` opened
    with O_APPEND, fsynced when ``durable``: the file's size after, and the error that stopped it. A
    failed append cuts the partial record off (if even that fails, ``scan`` skips what is left)."""
    view, done = memoryview(record), 0
    try:
        while done < len(record):
            written = os.write(fd, view[done:])
            if written == 0:
                raise OSError(errno.EIO, f"wrote 0 of {len(record) - done} bytes")
            done += written
        if durable:
            os.fsync(fd)
    except OSError as exc:
        try:
            if done:
                os.ftruncate(fd, size)
        except OSError:
            return size + done, exc
        return size, exc
    return size + done, None


class WriterSpool:
    """The spool directory of one live writer (used by one thread)."""

    def __init__(self, root: str | os.PathLike[str], writer_id: str, segment_bytes: int,
                 meta: dict[str, Any]) -> None:
        self.path = Path(root).absolute() / writer_id
        self._segment_bytes = segment_bytes
        self._meta = {"writer_id": writer_id, **meta}
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the current segment, the only one written to
        self._reader: tuple[int, int] | None = None  # (segment, fd): the older segment read last
        self._current = 0
        self._size = 0
        self._live: dict[int, int] = {}  # segment -> records not yet released
        self._ops_fd: int | None = None
        self._ops_size = 0
        self.records = 0
        self.bytes = 0
        self.ops = 0

    @property
    def opened(self) -> bool:
        return self._lock_fd is not None

    def _open(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = try_lock(self.path)
            if fd is None:
                raise SpoolError(f"spool directory {self.path} is locked by another process")
            try:  # opened only with its meta.json: without it a sync or an adoption never finds the directory
                write_json_atomic(self.path / META, {**self._meta, "pid": os.getpid(), "host": socket.gethostname()})
            except OSError:
                os.close(fd)
                raise
            self._lock_fd = fd
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {self.path}: {exc}") from exc

    def _segment_fd(self, size: int) -> int:
        if self._fd is not None and (self._size + size <= self._segment_bytes or self._size == 0):
            return self._fd
        path = self._segment_path(self._current + 1)
        try:  # opened before any state changes: a failure leaves the current segment in use
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SpoolError(f"cannot create spool segment {path}: {exc}") from exc
        try:
            self._retire_current()
        except SpoolError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._fd, self._current, self._size = fd, self._current + 1, 0
        return fd

    def _retire_current(self) -> None:
        """Close the segment written so far, made durable first (``sync`` reaches only the current one),
        or deleted when nothing in it is left unacknowledged."""
        if self._fd is None:
            return
        if self._live.get(self._current, 0) > 0:
            self._fsync(self._segment_path(self._current), self._fd)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        if self._live.get(self._current, 0) == 0:
            self._drop_segment(self._current)

    def append_batch(self, payload: bytes) -> Location:
        """Append one serialized MetricBatch; its location for ``read``/``release``."""
        if not self.opened:
            self._open()
        record = encode_record(Kind.BATCH, payload)
        fd = self._segment_fd(len(record))
        # ``_size`` stays the file's size even when the write fails, or every later location is wrong
        end, error = _append(fd, record, self._size)
        loc, self._size = Location(self._current, self._size, len(record)), end
        if error is not None:
            raise SpoolError(f"cannot write spool segment {self._segment_path(self._current)}: {error}") from error
        self._live[self._current] = self._live.get(self._current, 0) + 1
        self.records += 1
        self.bytes += len(record)
        return loc

    def _segment_path(self, segment: int) -> Path:
        return self.path / f"seg-{segment:08d}.spool"

    def append_op(self, kind: Kind, payload: bytes) -> None:
        """Append one run operation, durably; when that fails (a ``SpoolError``) the file is as it was."""
        if not self.opened:
            self._open()
        path = self.path / OPS
        if self._ops_fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
                try:
                    self._ops_size = os.fstat(fd).st_size
                except OSError:
                    os.close(fd)
                    raise
            except OSError as exc:
                raise SpoolError(f"cannot write {path}: {exc}") from exc
            self._ops_fd = fd
        self._ops_size, error = _append(self._ops_fd, encode_record(kind, payload), self._ops_size, durable=True)
        if error is not None:
            raise SpoolError(f"cannot write {path}: {error}") from error
        self.ops += 1

    def clear_ops(self) -> None:
        """Forget the run operations recorded so far, all delivered (online, with no batch on disk left
        to replay them for); kept when the file cannot be truncated."""
        if self._ops_fd is not None:
            try:
                os.ftruncate(self._ops_fd, 0)
                os.fsync(self._ops_fd)
            except OSError:
                return
            self._ops_size = 0
        self.ops = 0

    def read(self, loc: Location) -> bytes:
        """The payload at ``loc``; SpoolError when it no longer checks out."""
        if loc.segment not in self._live:
            raise SpoolError(f"spool segment {loc.segment} of {self.path} is gone")
        try:
            data = os.pread(self._read_fd(loc.segment), loc.length, loc.offset)
        except OSError as exc:
            raise SpoolError(f"cannot read spool segment {self._segment_path(loc.segment)}: {exc}") from exc
        record, reason = record_at(data, 0)
        if record is None:
            raise SpoolError(f"spool record at {loc} of {self.path} is damaged ({reason})")
        return record.payload

    def _read_fd(self, segment: int) -> int:
        """The current segment's fd, or an older one's, opened to read (records are read in seq order: one
        kept open serves the reads of a whole segment)."""
        if segment == self._current and self._fd is not None:
            return self._fd
        if self._reader is None or self._reader[0] != segment:
            self._close_reader()
            self._reader = (segment, os.open(self._segment_path(segment), os.O_RDONLY | os.O_CLOEXEC))
        return self._reader[1]

    def _close_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(OSError):
                os.close(self._reader[1])
            self._reader = None

    def release(self, loc: Location) -> None:
        """The record at ``loc`` was acknowledged; a segment with none left is deleted."""
        left = self._live.get(loc.segment, 0) - 1
        self._live[loc.segment] = left
        self.records -= 1
        self.bytes -= loc.length
        if left <= 0 and loc.segment != self._current:
            self._drop_segment(loc.segment)

    def _drop_segment(self, segment: int) -> None:
        """Delete a closed segment nothing is left in. A failure (a read-only remount) is ignored: a
        file left behind holds acknowledged batches, which a sync resends as duplicates."""
        self._live.pop(segment, None)
        if self._reader is not None and self._reader[0] == segment:
            self._close_reader()
        with contextlib.suppress(OSError):
            self._segment_path(segment).unlink()

    def _fsync(self, path: Path, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            raise SpoolError(f"cannot sync spool file {path}: {exc}") from exc

    def sync(self) -> None:
        """Make every appended record durable (fsync; older segments were when they were closed)."""
        if self._fd is not None:
            self._fsync(self._segment_path(self._current), self._fd)
        if self._ops_fd is not None:
            self._fsync(self.path / OPS, self._ops_fd)

    def close(self, *, ops_done: bool) -> bool:
        """Sync and close; remove the directory when nothing is left in it. True when removed."""
        if not self.opened:
            return True
        try:
            self.sync()
            empty = self.records == 0 and (ops_done or self.ops == 0)
            if empty:  # while the lock is held: no adopter can lock (and re-send) a spool being removed
                remove_dir(self.path)
        finally:
            self._close_fds()
        return empty

    def _close_fds(self) -> None:
        self._close_reader()
        for fd in (self._fd, self._ops_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._ops_fd = self._lock_fd = None

    def abandon(self) -> None:
        """In a forked child: close the inherited fds (the parent keeps its lock and files)."""
        self._close_fds()
