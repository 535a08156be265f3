"""The spool format (checksummed records, corruption resync), the writer's segments and disk faults, the pure policy."""

from __future__ import annotations

import errno
import os
import shutil
import types
from pathlib import Path
from typing import Any, cast

import pytest

from trackhouse.client import policy
from trackhouse.client import spool as spool_module
from trackhouse.client.errors import SpoolError
from trackhouse.client.policy import retry_delay
from trackhouse.client.replay import replay_dir
from trackhouse.client.spool import (
    LOCK,
    MAGIC,
    OPS,
    Corruption,
    Kind,
    Record,
    WriterSpool,
    encode_record,
    hold_lock,
    release_lock,
    scan,
    scan_ops,
    segments,
    try_lock,
    writer_dirs,
)  # fmt: skip
from trackhouse.client.transport import Transport
from trackhouse.proto.v1 import common_pb2, ingest_pb2


def _write(path: Path, payloads: list[bytes]) -> list[int]:
    offsets, data = [], b""
    for p in payloads:
        offsets.append(len(data))
        data += encode_record(Kind.BATCH, p)
    path.write_bytes(data)
    return offsets


def test_scan_reads_back_every_record(tmp_path: Path) -> None:
    payloads = [b"a" * 10, b"", b"\x00" * 1000]
    offsets = _write(tmp_path / "s", payloads)
    assert list(scan(tmp_path / "s")) == [Record(Kind.BATCH, p, o) for p, o in zip(payloads, offsets, strict=True)]


@pytest.mark.parametrize("where", ["payload", "length", "magic", "truncated tail"])
def test_a_damaged_record_is_reported_and_the_rest_read(tmp_path: Path, where: str) -> None:
    payloads = [bytes([i]) * 200 for i in range(5)]
    offsets = _write(tmp_path / "s", payloads)
    data = bytearray((tmp_path / "s").read_bytes())
    if where == "payload":
        data[offsets[2] + 50] ^= 0xFF
    elif where == "length":
        data[offsets[2] + 5 : offsets[2] + 9] = (10**6).to_bytes(4, "little")
    elif where == "magic":
        data[offsets[2]] = 0
    else:
        data = data[: offsets[4] + 100]
    (tmp_path / "s").write_bytes(bytes(data))
    items = list(scan(tmp_path / "s"))
    good = [i.payload for i in items if isinstance(i, Record)]
    bad = [i for i in items if isinstance(i, Corruption)]
    lost = 4 if where == "truncated tail" else 2
    assert good == [p for i, p in enumerate(payloads) if i != lost]
    assert len(bad) == 1 and bad[0].offset == offsets[lost] and bad[0].skipped > 0
    assert str(tmp_path / "s") in str(bad[0])


def test_a_payload_containing_the_magic_does_not_confuse_resync(tmp_path: Path) -> None:
    payloads = [MAGIC * 20, b"x" * 30, MAGIC + b"y" * 30]
    offsets = _write(tmp_path / "s", payloads)
    data = bytearray((tmp_path / "s").read_bytes())
    data[offsets[0] + 20] ^= 1
    (tmp_path / "s").write_bytes(bytes(data))
    good = [i.payload for i in scan(tmp_path / "s") if isinstance(i, Record)]
    assert good == payloads[1:]


def test_writer_spool_is_lazy_rotates_reads_releases_and_cleans_up(tmp_path: Path) -> None:
    spool = WriterSpool(tmp_path / "root", "w1", segment_bytes=4096, meta={"mode": "online", "url": "x:1"})
    assert not (tmp_path / "root").exists()  # no I/O until something is spooled
    locs = [spool.append_batch(bytes([i]) * 1500) for i in range(6)]
    assert len(segments(spool.path)) == 3 and spool.records == 6
    assert [spool.read(loc) for loc in locs] == [bytes([i]) * 1500 for i in range(6)]
    assert writer_dirs(tmp_path / "root") == [spool.path]
    assert try_lock(spool.path) is None  # held by its live owner
    for loc in locs[:2]:
        spool.release(loc)
    assert len(segments(spool.path)) == 2  # a fully acknowledged segment is deleted
    assert spool.close(ops_done=True) is False  # records remain: the directory stays
    assert len(segments(spool.path)) == 2
    fd = try_lock(spool.path)  # released at close
    assert fd is not None
    os.close(fd)


def test_writer_spool_removes_its_directory_when_everything_was_acknowledged(tmp_path: Path) -> None:
    spool = WriterSpool(tmp_path, "w2", segment_bytes=4096, meta={})
    loc = spool.append_batch(b"x" * 100)
    spool.append_op(Kind.UPDATE_RUN, b"op")
    spool.release(loc)
    assert spool.close(ops_done=False) is False  # an op not yet delivered keeps it
    spool = WriterSpool(tmp_path, "w3", segment_bytes=4096, meta={})
    spool.release(spool.append_batch(b"x"))
    assert spool.close(ops_done=True) is True and not spool.path.exists()


def test_a_fully_acknowledged_directory_is_removed_while_its_lock_is_still_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adopter that looks while ``close`` removes the directory finds it locked, never replayable."""
    spool = WriterSpool(tmp_path, "w1", segment_bytes=4096, meta={})
    spool.append_op(Kind.UPDATE_RUN, b"op")
    spool.release(spool.append_batch(b"x"))
    adopter_locked: list[bool] = []

    def remove(path: Path, ignore_errors: bool = False) -> None:
        fd = try_lock(Path(path))  # what an adopting process does first
        adopter_locked.append(fd is not None)
        if fd is not None:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(spool_module, "shutil", types.SimpleNamespace(rmtree=remove))
    assert spool.close(ops_done=True) is True
    assert adopter_locked == [False] and not spool.path.exists()


class _Os(types.SimpleNamespace):
    """``os`` as the spool module sees it, with some calls replaced (a flaky disk)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "os", _Os(write=lambda fd, data: os.write(fd, bytes(data[:7]))))
    spool = WriterSpool(tmp_path, "w1", segment_bytes=1 << 20, meta={})
    payloads = [bytes([i]) * (50 + i) for i in range(5)]
    locs = [spool.append_batch(p) for p in payloads]
    assert [spool.read(loc) for loc in locs] == payloads
    (segment,) = segments(spool.path)
    assert list(scan(segment)) == [Record(Kind.BATCH, p, loc.offset) for p, loc in zip(payloads, locs, strict=True)]


def test_a_write_failing_part_way_leaves_no_partial_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = WriterSpool(tmp_path, "w1", segment_bytes=1 << 20, meta={})
    first = spool.append_batch(b"a" * 50)
    calls: list[int] = []

    def write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, bytes(data[:7]))

    monkeypatch.setattr(spool_module, "os", _Os(write=write))
    with pytest.raises(SpoolError, match="No space left"):
        spool.append_batch(b"b" * 50)
    monkeypatch.undo()
    last = spool.append_batch(b"c" * 50)
    assert spool.read(first) == b"a" * 50 and spool.read(last) == b"c" * 50
    (segment,) = segments(spool.path)
    assert list(scan(segment)) == [Record(Kind.BATCH, b"a" * 50, first.offset),
                                   Record(Kind.BATCH, b"c" * 50, last.offset)]  # nothing to skip


def _fail(*args: object) -> None:
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("call", ["open", "pread", "fsync"])
def test_disk_errors_are_spool_errors_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    spool = WriterSpool(tmp_path, "w1", segment_bytes=100, meta={})
    loc = spool.append_batch(b"x" * 80)  # the next batch needs a new segment
    monkeypatch.setattr(spool_module, "os", _Os(**{call: _fail}))
    with pytest.raises(SpoolError, match="Input/output error") as raised:
        if call == "open":
            spool.append_batch(b"y" * 80)
        elif call == "pread":
            spool.read(loc)
        else:
            spool.sync()
    name = "seg-00000002.spool" if call == "open" else "seg-00000001.spool"
    assert str(spool.path / name) in str(raised.value)
    monkeypatch.undo()  # the disk is back: the spool carries on where it was
    assert spool.read(spool.append_batch(b"z" * 80)) == b"z" * 80 and spool.read(loc) == b"x" * 80


def test_backoff_is_jittered_exponential_capped_and_the_server_delay_wins() -> None:
    low, high = (lambda a, b: a), (lambda a, b: b)
    assert policy.backoff_delay(0, initial=0.5, maximum=30, retry_after=None, rand=high) == 0.5
    assert policy.backoff_delay(3, initial=0.5, maximum=30, retry_after=None, rand=low) == 2.0
    assert policy.backoff_delay(99, initial=0.5, maximum=30, retry_after=None, rand=high) == 30
    assert policy.backoff_delay(5, initial=0.5, maximum=30, retry_after=7.5, rand=low) == 7.5


def test_spill_decision() -> None:
    decide = policy.spill_decision
    assert decide(memory_bytes=0, budget=10, away_since=0.0, now=100.0, grace=1.0) is policy.Spill.NONE
    assert decide(memory_bytes=5, budget=10, away_since=99.5, now=100.0, grace=1.0) is policy.Spill.NONE
    assert decide(memory_bytes=5, budget=10, away_since=99.0, now=100.0, grace=1.0) is policy.Spill.ALL
    assert decide(memory_bytes=11, budget=10, away_since=None, now=100.0, grace=1.0) is policy.Spill.OLDEST
    assert policy.stalled(in_flight=True, last_progress=0.0, now=60.0, timeout=60.0)
    assert not policy.stalled(in_flight=True, last_progress=0.0, now=59.0, timeout=60.0)
    assert not policy.stalled(in_flight=False, last_progress=0.0, now=1e9, timeout=60.0)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([("retry-delay", "1.5")], 1.5),
        ([("retry-delay", "2s")], 2.0),
        ([("other", "x"), ("grpc-retry-pushback-ms", "250")], 0.25),
        ([("retry-delay", "soon")], None),
        ([], None),
    ],
)
def test_server_retry_delay_from_trailing_metadata(metadata: list[tuple[str, str]], expected: float | None) -> None:
    assert retry_delay(metadata) == expected


def test_an_operations_file_that_cannot_be_opened_is_a_spool_error(tmp_path: Path) -> None:
    spool = WriterSpool(tmp_path, "w1", segment_bytes=1 << 20, meta={})
    spool.append_batch(b"batch")
    (spool.path / "ops.spool").mkdir()  # opening it fails (EISDIR), as a read-only remount would (EROFS)
    with pytest.raises(SpoolError, match=r"ops\.spool"):
        spool.append_op(Kind.SET_TAGS, b"op")


def test_a_spool_whose_meta_could_not_be_written_is_opened_again_with_it(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory without meta.json is invisible to a sync and to adoption: the first write that
    meets a failing disk must not leave the spool opened without it."""
    write, failures = spool_module.write_json_atomic, [1]

    def failing(path: Path, data: Any) -> None:
        if failures:
            failures.pop()
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(spool_module, "write_json_atomic", failing)
    spool = WriterSpool(tmp_path, "w1", segment_bytes=1 << 20, meta={"mode": "offline"})
    with pytest.raises(SpoolError, match="No space left"):
        spool.append_batch(b"batch")
    spool.append_batch(b"batch")  # the disk works again
    assert spool.close(ops_done=True) is False
    assert [d.name for d in writer_dirs(tmp_path)] == ["w1"]


def test_a_forked_child_does_not_keep_a_replay_lock(tmp_path: Path) -> None:
    """A flock belongs to the open file, which a forked child shares: a DataLoader worker forked
    while a replay held a directory used to keep it locked for as long as it lived."""
    directory = tmp_path / "w1"
    directory.mkdir()
    fd = hold_lock(directory)
    assert fd is not None
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its at-fork handlers have run) lives until the parent has looked
        os.close(write_end)
        os.write(ready_write, b"r")
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 1) == b"r"
        release_lock(fd)
        again = try_lock(directory)
        assert again is not None  # free although the child is alive
        os.close(again)
    finally:
        os.close(write_end)
        os.close(ready_read)
        os.waitpid(pid, 0)


def _op(value: str) -> bytes:
    return ingest_pb2.SetTagsRequest(run_id="r", tags=[common_pb2.Tag(key="t", value=value)]).SerializeToString()


@pytest.mark.parametrize("fails", ["write", "fsync"])
def test_an_operation_the_disk_fails_part_way_is_reported_and_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """A disk filling up mid-record (a short write, then ENOSPC) used to go unnoticed: the operation was
    counted spooled but lost, and the torn record was skipped at sync (a torn CreateRun: a run never made)."""
    spool = WriterSpool(tmp_path, "w1", segment_bytes=1 << 20, meta={})
    spool.append_op(Kind.SET_TAGS, _op("first"))
    writes: list[int] = []

    def write(fd: int, data: bytes) -> int:
        writes.append(len(data))
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, bytes(data[:7]))

    flaky = _Os(write=write) if fails == "write" else _Os(fsync=_fail)
    monkeypatch.setattr(spool_module, "os", flaky)
    with pytest.raises(SpoolError, match=r"ops\.spool.*(No space left|Input/output error)"):
        spool.append_op(Kind.SET_TAGS, _op("lost"))
    monkeypatch.undo()
    assert spool.ops == 1  # not counted: the caller keeps the operation (retried offline, sent online)
    spool.append_op(Kind.SET_TAGS, _op("last"))
    items = [i.payload if isinstance(i, Record) else i for i in scan_ops(spool.path / OPS)]
    assert items == [_op("first"), _op("last")]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
def test_the_fds_held_do_not_grow_with_the_backlog(tmp_path: Path) -> None:
    """One fd per segment with an unacknowledged record used to be held: a long outage with small segments
    ran the process out of fds (EMFILE), for the spool and for the application."""
    before = _open_fds()
    spool = WriterSpool(tmp_path, "w1", segment_bytes=4096, meta={})
    payloads = [bytes([i % 256]) * 5000 for i in range(300)]  # each bigger than a segment: one segment each
    locs = [spool.append_batch(p) for p in payloads]
    assert len(segments(spool.path)) == 300
    assert _open_fds() - before <= 2  # the lock, the current segment
    assert [spool.read(loc) for loc in locs] == payloads
    assert [spool.read(loc) for loc in reversed(locs)] == payloads[::-1]
    assert _open_fds() - before <= 3  # and one older segment, read
    for loc in locs:
        spool.release(loc)
    assert len(segments(spool.path)) == 1 and _open_fds() - before <= 2
    assert spool.close(ops_done=True) is True and _open_fds() == before


def test_an_older_segment_is_read_checksum_verified_and_a_deleted_one_is_gone(tmp_path: Path) -> None:
    spool = WriterSpool(tmp_path, "w1", segment_bytes=100, meta={})
    first, second, third = (spool.append_batch(bytes([i]) * 80) for i in range(3))
    path = segments(spool.path)[0]
    data = bytearray(path.read_bytes())
    data[first.offset + 20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolError, match="damaged"):
        spool.read(first)
    assert spool.read(second) == bytes([1]) * 80
    spool.release(second)  # its segment deleted
    with pytest.raises(SpoolError, match="is gone"):
        spool.read(second)
    assert spool.read(third) == bytes([2]) * 80


def test_a_segment_that_cannot_be_made_durable_stays_the_current_one(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``sync`` reaches only the segment being written: one rotated out is fsynced first, and a failure
    is the append's, with nothing changed."""
    spool = WriterSpool(tmp_path, "w1", segment_bytes=100, meta={})
    first = spool.append_batch(b"x" * 80)
    monkeypatch.setattr(spool_module, "os", _Os(fsync=_fail))
    with pytest.raises(SpoolError, match=r"seg-00000001\.spool.*Input/output error"):
        spool.append_batch(b"y" * 80)
    monkeypatch.undo()
    assert [p.name for p in segments(spool.path)] == ["seg-00000001.spool"]
    second = spool.append_batch(b"z" * 80)
    assert (first.segment, second.segment) == (1, 2)
    assert spool.read(first) == b"x" * 80 and spool.read(second) == b"z" * 80


def test_an_adopter_arriving_while_a_directory_is_removed_finds_nothing_to_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing the directory deletes LOCK too: an adopter that listed it and opened LOCK after it was
    deleted created a new one, locked it, and replayed what was still there (acknowledged batches, ops)."""
    spool = WriterSpool(tmp_path, "w1", segment_bytes=4096, meta={})
    spool.append_op(Kind.UPDATE_RUN, b"op")
    spool.release(spool.append_batch(b"x"))
    seen: list[tuple[bool, list[Path]]] = []

    def remove(path: Path, ignore_errors: bool = False) -> None:
        (Path(path) / LOCK).unlink()  # the removal got to LOCK first
        fd = try_lock(spool.path)  # an adopter that listed the directory before
        seen.append((fd is not None, writer_dirs(tmp_path)))
        if fd is not None:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(spool_module, "shutil", types.SimpleNamespace(rmtree=remove))
    assert spool.close(ops_done=True) is True
    assert seen == [(False, [])] and os.listdir(tmp_path) == []


def test_a_lock_opened_before_its_directory_was_removed_is_not_granted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adopter that opened LOCK just before the owner removed the directory got the lock once the
    owner let go of it, and replayed what it could still read."""
    spool = WriterSpool(tmp_path, "w1", segment_bytes=4096, meta={"mode": "online"})
    spool.release(spool.append_batch(b"x"))
    real = spool_module.fcntl
    raced: list[bool] = []

    def owner_closes_first(fd: int, operation: int) -> None:
        if not raced:
            raced.append(spool.close(ops_done=True))
        real.flock(fd, operation)

    fcntl = types.SimpleNamespace(flock=owner_closes_first, LOCK_EX=real.LOCK_EX, LOCK_NB=real.LOCK_NB)
    monkeypatch.setattr(spool_module, "fcntl", fcntl)
    assert try_lock(spool.path) is None
    assert raced == [True] and os.listdir(tmp_path) == []


def test_a_spool_directory_that_cannot_be_written_is_not_synced_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync records its progress in the directory and removes it: on a read-only mount it cannot."""
    spool = WriterSpool(tmp_path, "w1", segment_bytes=4096, meta={"mode": "offline"})
    spool.append_batch(b"x")
    spool.close(ops_done=False)

    def read_only(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return os.open(path, flags, mode)

    monkeypatch.setattr(spool_module, "os", _Os(open=read_only))
    report = replay_dir(spool.path, cast(Transport, None))  # the server is never reached
    assert not report.complete
    assert f"spool directory {spool.path} is not writable (Read-only file system)" in report.error
    assert "copy it somewhere writable" in report.error
    monkeypatch.undo()
    assert [p.name for p in segments(spool.path)] == ["seg-00000001.spool"]
