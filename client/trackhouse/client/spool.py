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

Every record is ``MAGIC kind:u8 length:u32 crc32:u32 payload`` (little-endian;
the crc covers kind and payload). ``scan`` checks every record; a damaged one is
reported as a ``Corruption`` (file, offset, bytes skipped) and reading resumes at
the next magic that starts a valid record, so one bad sector costs one batch.

``WriterSpool`` is used by one thread (the sender's worker); it creates its
directory on the first write, never in the constructor, raises every failure of
the disk as a ``SpoolError`` naming the file, and removes a directory with
nothing left in it before letting go of its lock (so no adopter replays it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from trackhouse.client.errors import SpoolError
from trackhouse.proto.v1 import ingest_pb2

MAGIC = b"THR1"
_HEADER = struct.Struct("<4sBII")
_MAX_RECORD = 1 << 30
LOCK, META, OPS, RUNS = "LOCK", "meta.json", "ops.spool", "runs.json"
SEGMENT_GLOB = "seg-*.spool"
LOCAL_RUN_TAG = "trackhouse.local_run_id"
EXPERIMENT_TAG = "trackhouse.experiment_name"


class Kind(IntEnum):
    BATCH = 1
    CREATE_RUN = 2
    LOG_PARAMS = 3
    SET_TAGS = 4
    UPDATE_RUN = 5


@dataclass(frozen=True)
class Location:
    """Where one record lives: segment number and the offset of its header."""

    segment: int
    offset: int
    length: int


@dataclass(frozen=True)
class Record:
    kind: Kind
    payload: bytes
    offset: int


@dataclass(frozen=True)
class Corruption:
    """A damaged stretch of a spool file, skipped when reading."""

    path: str
    offset: int
    skipped: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.skipped} bytes at offset {self.offset} skipped ({self.reason})"


def encode_record(kind: Kind, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes((kind,))))
    return _HEADER.pack(MAGIC, kind, len(payload), crc) + payload


def _record_at(data: bytes | memoryview, pos: int) -> tuple[Record | None, str]:
    if len(data) - pos < _HEADER.size:
        return None, "truncated header"
    magic, kind, length, crc = _HEADER.unpack_from(data, pos)
    if magic != MAGIC:
        return None, "bad magic"
    end = pos + _HEADER.size + length
    if kind not in Kind._value2member_map_ or length > _MAX_RECORD:
        return None, "bad header"
    if end > len(data):
        return None, "truncated record"
    payload = bytes(data[pos + _HEADER.size : end])
    if zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
        return None, "checksum mismatch"
    return Record(Kind(kind), payload, pos), ""


def scan(path: Path) -> Iterator[Record | Corruption]:
    """Every record of a spool file in order, and a ``Corruption`` for each damaged stretch."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpoolError(f"cannot read spool file {path}: {exc}") from exc
    pos = 0
    while pos < len(data):
        record, reason = _record_at(data, pos)
        if record is not None:
            yield record
            pos += _HEADER.size + len(record.payload)
            continue
        nxt = pos + 1
        while (nxt := data.find(MAGIC, nxt)) >= 0 and _record_at(data, nxt)[0] is None:
            nxt += 1
        end = nxt if nxt >= 0 else len(data)
        yield Corruption(str(path), pos, end - pos, reason)
        pos = end


def scan_ops(path: Path) -> Iterator[Record | Corruption]:
    """``scan`` of an operations file, where a record that is not its kind's request message (a
    whole record, checksum right, wrong content) is reported damaged too, not left to fail a sync."""
    pb = ingest_pb2
    types: dict[Kind, Any] = {Kind.CREATE_RUN: pb.CreateRunRequest, Kind.SET_TAGS: pb.SetTagsRequest,
                              Kind.LOG_PARAMS: pb.LogParamsRequest, Kind.UPDATE_RUN: pb.UpdateRunRequest}
    for item in scan(path):
        if isinstance(item, Record):
            try:
                types[item.kind].FromString(item.payload)
            except Exception:  # KeyError: a batch among the operations; protobuf's DecodeError
                item = Corruption(str(path), item.offset, _HEADER.size + len(item.payload),
                                  f"record of kind {item.kind.name} is not a run operation")
        yield item


def segment_number(path: Path) -> int:
    return int(path.name[4:-6])


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(SEGMENT_GLOB), key=segment_number)


def try_lock(directory: Path) -> int | None:
    """An fd holding ``directory``'s exclusive lock, or None when a live process holds it."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


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
                  and (p / META).exists())


class WriterSpool:
    """The spool directory of one live writer (used by one thread)."""

    def __init__(self, root: str | os.PathLike[str], writer_id: str, segment_bytes: int,
                 meta: dict[str, Any]) -> None:
        self.path = Path(root).absolute() / writer_id
        self._segment_bytes = segment_bytes
        self._meta = {"writer_id": writer_id, **meta}
        self._lock_fd: int | None = None
        self._fds: dict[int, int] = {}  # segment number -> fd (open segments)
        self._current = 0
        self._size = 0
        self._live: dict[int, int] = {}  # segment -> records not yet released
        self._ops_fd: int | None = None
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
        if self._current == 0 or (self._size + size > self._segment_bytes and self._size > 0):
            path = self._segment_path(self._current + 1)
            try:  # opened before any state changes: a failure leaves the current segment in use
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise SpoolError(f"cannot create spool segment {path}: {exc}") from exc
            if self._current and self._live.get(self._current, 0) == 0:
                self._drop_segment(self._current)
            self._current += 1
            self._size = 0
            self._fds[self._current] = fd
        return self._fds[self._current]

    def append_batch(self, payload: bytes) -> Location:
        """Append one serialized MetricBatch; its location for ``read``/``release``."""
        if not self.opened:
            self._open()
        record = encode_record(Kind.BATCH, payload)
        fd = self._segment_fd(len(record))
        self._write_all(fd, record)
        loc = Location(self._current, self._size, len(record))
        self._size += len(record)
        self._live[self._current] = self._live.get(self._current, 0) + 1
        self.records += 1
        self.bytes += len(record)
        return loc

    def _write_all(self, fd: int, record: bytes) -> None:
        """Append all of ``record`` to the current segment (``os.write`` may write part of it)."""
        view, done = memoryview(record), 0
        try:
            while done < len(record):
                written = os.write(fd, view[done:])
                if written == 0:
                    raise OSError(f"wrote 0 of {len(record) - done} bytes")
                done += written
        except OSError as exc:
            # ``_size`` must stay the file's size, or every later record's location is wrong: the
            # partial record is cut off, or (if even that fails) left for ``scan`` to skip.
            try:
                if done:
                    os.ftruncate(fd, self._size)
            except OSError:
                self._size += done
            raise SpoolError(f"cannot write spool segment {self._segment_path(self._current)}: {exc}") from exc

    def _segment_path(self, segment: int) -> Path:
        return self.path / f"seg-{segment:08d}.spool"

    def append_op(self, kind: Kind, payload: bytes) -> None:
        if not self.opened:
            self._open()
        try:
            if self._ops_fd is None:
                self._ops_fd = os.open(self.path / OPS, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            os.write(self._ops_fd, encode_record(kind, payload))
            os.fsync(self._ops_fd)
        except OSError as exc:
            raise SpoolError(f"cannot write {self.path / OPS}: {exc}") from exc
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
        self.ops = 0

    def read(self, loc: Location) -> bytes:
        """The payload at ``loc``; SpoolError when it no longer checks out."""
        fd = self._fds.get(loc.segment)
        if fd is None:
            raise SpoolError(f"spool segment {loc.segment} of {self.path} is gone")
        try:
            data = os.pread(fd, loc.length, loc.offset)
        except OSError as exc:
            raise SpoolError(f"cannot read spool segment {self._segment_path(loc.segment)}: {exc}") from exc
        record, reason = _record_at(data, 0)
        if record is None:
            raise SpoolError(f"spool record at {loc} of {self.path} is damaged ({reason})")
        return record.payload

    def release(self, loc: Location) -> None:
        """The record at ``loc`` was acknowledged; a segment with none left is deleted."""
        left = self._live.get(loc.segment, 0) - 1
        self._live[loc.segment] = left
        self.records -= 1
        self.bytes -= loc.length
        if left <= 0 and loc.segment != self._current:
            self._drop_segment(loc.segment)

    def _drop_segment(self, segment: int) -> None:
        """Close and delete a segment nothing is left in. A failure (EIO at close, a read-only remount)
        is ignored: a file left behind holds acknowledged batches, which a sync resends as duplicates."""
        fd = self._fds.pop(segment, None)
        self._live.pop(segment, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self._segment_path(segment).unlink()

    def sync(self) -> None:
        """Make every appended record durable (fsync)."""
        files = [(self._segment_path(n), fd) for n, fd in self._fds.items()]
        if self._ops_fd is not None:
            files.append((self.path / OPS, self._ops_fd))
        for path, fd in files:
            try:
                os.fsync(fd)
            except OSError as exc:
                raise SpoolError(f"cannot sync spool file {path}: {exc}") from exc

    def close(self, *, ops_done: bool) -> bool:
        """Sync and close; remove the directory when nothing is left in it. True when removed."""
        if not self.opened:
            return True
        try:
            self.sync()
            empty = self.records == 0 and (ops_done or self.ops == 0)
            if empty:  # while the lock is held: no adopter can lock (and re-send) a spool being removed
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._close_fds()
        return empty

    def _close_fds(self) -> None:
        for fd in (*self._fds.values(), self._ops_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._ops_fd = self._lock_fd = None

    def abandon(self) -> None:
        """In a forked child: close the inherited fds (the parent keeps its lock and files)."""
        self._close_fds()
