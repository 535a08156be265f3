"""Replay under faults: a stream that fails after some acks, stalls or ends early, a spool that
cannot be read.

The transport is the library's ``MemoryTransport`` (server-side dedupe included); a
subclass only makes the server go away once, after one batch was stored. A stream that
stops answering is the fake gRPC server of conftest.py (``Connection(ack=False)``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import struct
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from trackhouse.client import policy
from trackhouse.client import replay as replay_module
from trackhouse.client import spool as spool_module
from trackhouse.client.errors import ServerUnavailable
from trackhouse.client.memory import MemoryTransport
from trackhouse.client.replay import adopt_orphans, replay_dir, sync
from trackhouse.client.settings import Settings
from trackhouse.client.spool import LOCK, OPS, Kind, WriterSpool, encode_record, segments, try_lock
from trackhouse.client.transport import GrpcTransport
from trackhouse.proto.v1 import common_pb2, ingest_pb2

T = TypeVar("T")
_HANG_GUARD = 10.0  # seconds; only a guard against a hang, never reached by a passing test


def _batch(writer: str, seq: int, run_id: str) -> bytes:
    payload: bytes = ingest_pb2.MetricBatch(
        writer_id=writer, seq=seq, run_ids=[run_id], keys=["loss"], key_index=struct.pack("<I", 0),
        steps=struct.pack("<q", seq), timestamps=struct.pack("<q", 1000), values=struct.pack("<d", 0.5),
    ).SerializeToString()  # fmt: skip
    return payload


def _spool(root: Path, writer: str, run_id: str, batches: int) -> Path:
    """A closed writer directory holding ``batches`` one-point batches, one segment each."""
    spool = WriterSpool(root, writer, segment_bytes=1, meta={"mode": "online", "url": Settings().url})
    for seq in range(1, batches + 1):
        spool.append_batch(_batch(writer, seq, run_id))
    assert spool.close(ops_done=True) is False
    assert len(segments(spool.path)) == batches
    return spool.path


def _damage(segment: Path) -> None:
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # in the payload: the checksum no longer matches
    segment.write_bytes(bytes(data))


class _GoesAwayOnce(MemoryTransport):
    """Stores one batch, then goes away once (as a restarting server would): that stream fails."""

    went_away = False

    def _store(self, batch: ingest_pb2.MetricBatch) -> ingest_pb2.BatchAck:
        if not self.went_away and self.batches_stored == 1:
            self.went_away = True
            raise ServerUnavailable("server restarted")
        return super()._store(batch)


def _in_thread(call: Callable[[], T]) -> T:
    """``call()`` on a thread; fails (instead of hanging the suite) if it never returns."""
    out: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # re-raised below, on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(_HANG_GUARD)
    assert not thread.is_alive(), "the replay hung"
    if errors:
        raise errors[0]
    return out[0]


@pytest.mark.parametrize(("batches", "damaged", "stored"), [
    (5, 3, [1, 2, 3, 5]),  # seq 4: only the retry reaches it
    (3, 0, [2, 3]),  # seq 1: both streams read it, it is reported once
])
def test_a_damaged_record_is_reported_once_and_kept_whichever_stream_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batches: int, damaged: int, stored: list[int]
) -> None:
    """The first stream fails after one ack. One batch in flight at a time: its feeder cannot pass
    seq 3 (seq 2 is never acked by it), so a damaged seq 4 is first read by the retry, which used
    to neither report nor keep it."""
    monkeypatch.setattr(policy, "REPLAY_WINDOW", 1)
    transport = _GoesAwayOnce()
    run_id = transport.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    directory = _spool(tmp_path, "w1", run_id, batches=batches)
    segment = segments(directory)[damaged]
    _damage(segment)

    report = replay_dir(directory, transport, backoff=(0.0, 0.0))

    assert transport.went_away and report.complete, report.error
    assert [c.path for c in report.corruptions] == [str(segment)]
    assert [step for step, _, _ in transport.points(run_id, "loss")] == stored
    kept = tmp_path / "w1.corrupt"
    assert report.directory == str(kept) and (kept / segment.name).exists() and not directory.exists()


def _unreadable_segment(segment: Path) -> None:
    segment.unlink()
    segment.mkdir()  # reading it fails as a bad sector or a permission would (EISDIR; tests run as root)


def _undecodable_record(segment: Path) -> None:
    segment.write_bytes(encode_record(Kind.BATCH, b"\xff\xff\xff"))  # checks out, is no MetricBatch


@pytest.mark.parametrize("fault", [_unreadable_segment, _undecodable_record])
def test_a_segment_the_replay_cannot_use_ends_it_with_an_error_instead_of_hanging(
    tmp_path: Path, fault: Callable[[Path], None]
) -> None:
    transport = MemoryTransport()
    run_id = transport.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    directory = _spool(tmp_path, "w1", run_id, batches=3)
    bad = segments(directory)[1]
    fault(bad)

    report = _in_thread(lambda: replay_dir(directory, transport, backoff=(0.0, 0.0)))

    assert not report.complete and str(bad) in report.error
    assert [step for step, _, _ in transport.points(run_id, "loss")] == [1]  # what came before was sent
    assert len(segments(directory)) == 3  # kept for the next sync
    assert replay_dir(directory, transport).error == report.error  # the lock was released


def test_sync_replays_the_other_directories_when_one_cannot_be_opened(tmp_path: Path) -> None:
    transport = MemoryTransport()
    run_id = transport.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    bad = _spool(tmp_path, "w1", run_id, batches=1)
    good = _spool(tmp_path, "w2", run_id, batches=1)
    (bad / "LOCK").unlink()
    (bad / "LOCK").mkdir()  # the lock file cannot be opened (EISDIR)

    first, second = _in_thread(lambda: sync(tmp_path, transport=transport))

    assert not first.complete and str(bad) in first.error
    assert second.complete and not good.exists()
    assert len(transport.points(run_id, "loss")) == 1


def test_adoption_logs_a_directory_it_cannot_replay_and_replays_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    transport = MemoryTransport()
    run_id = transport.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    bad = _spool(tmp_path, "w1", run_id, batches=1)
    good = _spool(tmp_path, "w2", run_id, batches=1)
    (bad / "LOCK").unlink()
    (bad / "LOCK").mkdir()

    with caplog.at_level(logging.WARNING, logger="trackhouse.client"):
        reports = _in_thread(lambda: adopt_orphans(transport, Settings(spool_dir=str(tmp_path)), "w0"))

    assert [r.complete for r in reports] == [False, True] and not good.exists()
    assert len(transport.points(run_id, "loss")) == 1
    assert [r.levelno for r in caplog.records if str(bad) in r.getMessage()] == [logging.WARNING]


def test_an_operation_record_that_is_no_operation_is_reported_and_the_rest_replayed(tmp_path: Path) -> None:
    """A whole record (checksum right) whose payload is not its kind's request used to raise a
    protobuf DecodeError out of the sync."""
    transport = MemoryTransport()
    run_id = transport.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    directory = _spool(tmp_path, "w1", run_id, batches=2)
    tags = ingest_pb2.SetTagsRequest(run_id=run_id, tags=[common_pb2.Tag(key="stage", value="train")])
    (directory / OPS).write_bytes(encode_record(Kind.SET_TAGS, b"\xff\xff\xff")
                                  + encode_record(Kind.SET_TAGS, tags.SerializeToString()))

    report = _in_thread(lambda: replay_dir(directory, transport))

    assert report.complete, report.error
    assert [c.reason for c in report.corruptions] == ["record of kind SET_TAGS is not a run operation"]
    assert transport.tags[run_id] == {"stage": "train"}
    assert [step for step, _, _ in transport.points(run_id, "loss")] == [1, 2]


def _hung(fake: Any) -> Any:
    """conftest's ``Connection(ack=False)``: stores what it reads and never acks (conftest.py cannot be
    imported by name under --import-mode=importlib: built through the fake's module)."""
    return sys.modules[type(fake.ingest).__module__].Connection(ack=False)


def test_a_stream_that_stops_answering_is_dropped_after_the_ack_timeout_and_resent(fake: Any, tmp_path: Path) -> None:
    """The first call stores a batch and never answers (a hung server, a half-open connection): the
    replay used to wait for its acks for ever, holding the directory's lock."""
    fake.ingest.plan = [_hung(fake)]
    directory = _spool(tmp_path, "w1", "r1", batches=3)
    transport = GrpcTransport(fake.address, rpc_timeout=5.0)
    try:
        report = _in_thread(lambda: replay_dir(directory, transport, backoff=(0.0, 0.0), ack_timeout=0.2))
    finally:
        transport.close()

    assert report.complete, report.error
    assert fake.ingest.connections == 2 and sorted(fake.ingest.stored) == [("w1", 1), ("w1", 2), ("w1", 3)]
    assert report.duplicate_batches == 1 and not directory.exists()


def test_a_server_that_never_answers_ends_the_replay_with_an_error_and_the_directory_kept(
    fake: Any, tmp_path: Path
) -> None:
    fake.ingest.plan = [_hung(fake), _hung(fake)]
    directory = _spool(tmp_path, "w1", "r1", batches=2)
    transport = GrpcTransport(fake.address, rpc_timeout=5.0)
    try:
        report = _in_thread(lambda: replay_dir(directory, transport, max_attempts=2, backoff=(0.0, 0.0),
                                               ack_timeout=0.2))
    finally:
        transport.close()

    assert not report.complete and "gave up after 2 attempts" in report.error and "no ack for 0.2 s" in report.error
    assert len(segments(directory)) == 2
    lock = try_lock(directory)  # released: a later sync or adopter can take it
    assert lock is not None
    os.close(lock)


class _OneAck:
    """An ack stream that answers one batch, then ends without an error (a server closing it early)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[ingest_pb2.BatchAck]:
        return itertools.islice(iter(self._stream), 1)

    def cancel(self) -> None:
        self._stream.cancel()

    def ended(self, timeout: float) -> bool:
        return True


class _EndsEarly(MemoryTransport):
    calls = 0

    def stream_metrics(self, requests: Iterator[bytes]) -> Any:
        self.calls += 1
        stream = super().stream_metrics(requests)
        return _OneAck(stream) if self.calls == 1 else stream


def test_a_stream_that_ends_before_every_batch_is_answered_is_retried(tmp_path: Path) -> None:
    """It used to count as done: the directory was deleted with two batches never sent."""
    transport = _EndsEarly()
    run_id = transport.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    directory = _spool(tmp_path, "w1", run_id, batches=3)

    report = _in_thread(lambda: replay_dir(directory, transport, backoff=(0.0, 0.0)))

    assert report.complete and transport.calls == 2
    assert [step for step, _, _ in transport.points(run_id, "loss")] == [1, 2, 3]


class _CountsParams(MemoryTransport):
    params_sent = 0

    def log_params(self, request: ingest_pb2.LogParamsRequest) -> Any:
        self.params_sent += 1
        return super().log_params(request)


@pytest.mark.parametrize("damaged", [False, True])
def test_a_second_syncer_arriving_while_a_replayed_directory_is_removed_replays_nothing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damaged: bool
) -> None:
    """The directory was deleted in place (LOCK among its files): a second syncer that listed it and
    opened LOCK after it was deleted created a new one, locked it and replayed what was left."""
    server = _CountsParams()
    run_id = server.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    spool = WriterSpool(tmp_path, "dead", 1 << 20, {"mode": "online", "url": Settings().url})
    spool.append_batch(_batch("dead", 1, run_id))
    spool.append_batch(_batch("dead", 2, run_id))
    spool.append_op(Kind.LOG_PARAMS, ingest_pb2.LogParamsRequest(
        run_id=run_id, params=[common_pb2.Param(key="a", value="1")]).SerializeToString())
    spool.close(ops_done=False)
    if damaged:
        _damage(segments(spool.path)[-1])  # the second batch: the segment is kept in dead.corrupt
    second: list[tuple[bool, str]] = []

    def second_syncer() -> None:  # listed the directory before, opens LOCK now
        if not second:
            second.append((False, ""))
            report = replay_dir(spool.path, server)
            second[0] = (report.complete, report.error)

    real_rmtree, real_unlink = replay_module.shutil.rmtree, Path.unlink

    def rmtree(path: Any, ignore_errors: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            real_unlink(Path(path) / LOCK)  # the deletion reached LOCK first
        second_syncer()
        real_rmtree(path, ignore_errors=ignore_errors)

    def unlink(path: Path, missing_ok: bool = False) -> None:
        real_unlink(path, missing_ok)
        if path.name == LOCK:
            second_syncer()

    fake = types.SimpleNamespace(rmtree=rmtree)
    monkeypatch.setattr(replay_module, "shutil", fake)
    monkeypatch.setattr(spool_module, "shutil", fake)
    monkeypatch.setattr(Path, "unlink", unlink)

    report = replay_dir(spool.path, server)

    assert report.complete and report.points == 1 + (not damaged), report.error
    assert second == [(False, "locked by a live process (its writer is still running)")]
    assert server.params_sent == 1 and server.batches_stored == 1 + (not damaged)
    assert not spool.path.exists() and os.path.isdir(tmp_path / "dead.corrupt") is damaged


def test_a_damaged_directory_that_cannot_be_renamed_is_kept_in_place_without_its_replayed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renaming it ``.corrupt`` by hand raised when its parent was not writable (``remove_dir`` fell back):
    the replay, every point stored, ended in an error. The rename is refused as a read-only parent
    refuses it (a chmod proves nothing to root, which the tests may run as)."""
    transport = MemoryTransport()
    run_id = transport.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    root = tmp_path / "root"
    directory = _spool(root, "w1", run_id, batches=3)
    damaged = segments(directory)[1]
    _damage(damaged)
    rename = Path.rename

    def refused(self: Path, target: Any) -> Path:
        if self == directory:
            raise PermissionError(13, "Permission denied", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refused)
    report = replay_dir(directory, transport, backoff=(0.0, 0.0))

    assert report.complete and not report.error, report.error
    assert [c.path for c in report.corruptions] == [str(damaged)] and report.directory == str(directory)
    assert [step for step, _, _ in transport.points(run_id, "loss")] == [1, 3]
    assert sorted(p.name for p in directory.iterdir()) == sorted([LOCK, "meta.json", damaged.name])
    assert sorted(p.name for p in root.iterdir()) == ["w1"]
