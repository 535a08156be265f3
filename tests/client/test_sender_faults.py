"""The sender's worker when the server is away or hung: it waits instead of spinning, and
it spools before it tries the network again at close. Driven through the Sender's own
decisions with a transport that is down, so nothing here waits on a clock."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trackhouse.client as th
from trackhouse.client.batcher import Batcher
from trackhouse.client.errors import ServerUnavailable, SpoolError
from trackhouse.client.outbox import Entry
from trackhouse.client.sender import Sender
from trackhouse.client.spool import Record, scan, segments
from trackhouse.proto.v1 import common_pb2, ingest_pb2


class Down:
    """A server that answers nothing: every call is UNAVAILABLE."""

    url = "down:1"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stream_metrics(self, requests: Iterator[bytes]) -> Any:
        self.calls.append("stream")
        raise ServerUnavailable("down")

    def create_run(self, request: Any) -> common_pb2.RunInfo:
        return common_pb2.RunInfo(run_id="r1", experiment_id="0")

    def _down(self, request: Any) -> None:
        self.calls.append(type(request).__name__)
        raise ServerUnavailable("down")

    update_run = log_params = set_tags = _down

    def reopen(self) -> None: ...

    def close(self) -> None: ...


def _sender(tmp_path: Path, transport: Any, **kw: Any) -> Sender:
    settings = th.Settings(spool_dir=str(tmp_path), replay_orphans=False, **kw)
    return Sender(transport, Batcher(settings.max_batch_points), settings, clock=lambda: 100.0)


def test_an_operation_waiting_while_the_stream_is_away_does_not_make_the_worker_spin(tmp_path: Path) -> None:
    sender = _sender(tmp_path, Down(), spool_grace=1000.0)
    sender._outbox.add(Entry(1, 1, 10, 0, b"x"))  # a batch awaiting its ack
    sender._away_since = 90.0  # the stream failed at 90; reconnect due at 130
    sender._reconnect_at = 130.0
    sender._ops_retry.ops.append(ingest_pb2.SetTagsRequest(run_id="r1"))
    sender._ops_retry.retry_at = 0.0  # due long ago, but operations wait for the stream
    timeout = sender._wait_timeout()
    assert timeout == 30.0  # the reconnect, not 0 (which made the worker loop ~45,000 times a second)


class Back(Down):
    """A server back from an outage: operations go through."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered = threading.Event()

    def set_tags(self, request: Any) -> None:
        self.calls.append(type(request).__name__)
        self.delivered.set()


def test_the_first_ack_after_an_outage_sends_the_waiting_operations(tmp_path: Path) -> None:
    transport = Back()
    sender = _sender(tmp_path, transport)
    sender._outbox.add(Entry(1, 1, 10, 0, b"x"))
    sender._outbox.send_next = 2
    sender._away_since = 90.0
    sender._ops_retry.add([ingest_pb2.SetTagsRequest(run_id="r1")])  # waits: the stream is away
    sender._on_ack(ingest_pb2.BatchAck(seq=1, status=ingest_pb2.STORED, points=1))
    assert sender._away_since is None
    assert transport.delivered.wait(10.0)  # the operations thread was told, and sent it
    assert sender._wait_timeout() is None  # the worker has nothing to do for it


class Hung(Down):
    """A server that takes operations and never answers: ``set_tags`` blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def set_tags(self, request: Any) -> None:
        self.entered.set()
        self.release.wait()
        raise ServerUnavailable("deadline exceeded")


def test_at_close_batches_are_spooled_while_an_operation_hangs_and_both_are_kept(tmp_path: Path) -> None:
    transport = Hung()
    sender = _sender(tmp_path, transport)
    sender._outbox.add(Entry(1, 5, 10, 0, b"batch"))  # unacknowledged
    sender._ops_in.append(ingest_pb2.SetTagsRequest(run_id="r1"))
    sender._housekeep(100.0)  # recorded, then handed to the operations thread...
    try:
        assert transport.entered.wait(10)  # ...which is blocked in the network
        sender._deadline = 100.5  # close's; the clock stays at 100: the thread is waited for 0.5 s
        sender._finish()  # returns with the call still hung
        assert sender.spool.records == 1 and sender.stats()["points_spooled"] == 5
        assert sender.stats()["ops_pending"] == 1
        assert list(sender.spool.path.glob("seg-*.spool")) and (sender.spool.path / "ops.spool").stat().st_size > 0
    finally:
        transport.release.set()
    assert sender._ops_retry.join(10.0)  # unanswered (the call failed): kept, and no more tries
    assert sender.stats()["ops_pending"] == 1


def test_an_offline_run_that_logged_no_metrics_keeps_its_spool_and_syncs(tmp_path: Path) -> None:
    client = th.Client(Down(), th.Settings(mode="offline", spool_dir=str(tmp_path), replay_orphans=False))
    run = client.start_run(experiment="offline", params={"lr": "0.1"})
    run.set_tags({"stage": "warmup"})
    run.finish()
    assert client.close()
    server = th.MemoryTransport()
    reports = th.sync(tmp_path, transport=server)
    assert [r.complete for r in reports] == [True]
    (info,) = server.runs.values()
    assert server.params[info.run_id] == {"lr": "0.1"}
    assert info.status == common_pb2.FINISHED


def test_operations_apply_in_the_order_they_were_made_across_an_outage(tmp_path: Path) -> None:
    """An operation that met an absent server waits in the worker; a later one made when the server
    is back must not overtake it (the older tag value used to win)."""
    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(spool_dir=str(tmp_path), replay_orphans=False))
    run = client.start_run(experiment="e")
    transport.available = False
    run.set_tags({"stage": "warmup"})  # not delivered: spooled, retried by the worker
    transport.available = True
    run.set_tags({"stage": "train"})
    run.log_params({"lr": "0.1"})
    client.close(timeout=10.0)
    assert transport.tags[run.run_id]["stage"] == "train"
    assert transport.params[run.run_id] == {"lr": "0.1"}


class FailingDisk:
    """Stands in for a spool whose writes fail (disk full) until ``healed``."""

    def __init__(self, spool: Any) -> None:
        self.spool, self.write, self.healed, self.tries = spool, spool.append_batch, False, 0

    def append_batch(self, payload: bytes) -> Any:
        self.tries += 1
        if not self.healed:
            raise SpoolError(f"cannot write spool segment in {self.spool.path}: [Errno 28] No space left on device")
        return self.write(payload)


def _fail_disk(sender: Sender) -> FailingDisk:
    disk = FailingDisk(sender.spool)
    sender.spool.append_batch = disk.append_batch  # type: ignore[method-assign]
    return disk


def test_a_disk_that_fails_while_spilling_loses_nothing_and_pauses_spooling(tmp_path: Path) -> None:
    sender = _sender(tmp_path, Down(), spool_grace=1.0)
    disk = _fail_disk(sender)
    sender._outbox.add(Entry(1, 5, 10, 0, b"batch"))
    sender._away_since = 50.0  # away past the grace period at 100: spill everything
    sender._reconnect_at = 200.0
    sender._housekeep(100.0)  # used to raise out of the worker, which then never ran again
    assert disk.tries == 1
    assert sender._outbox.in_memory()  # still there, still to be sent
    assert sender._wait_timeout() == 5.0  # the retry of the disk, not 0: no spinning on it
    sender._housekeep(103.0)
    assert disk.tries == 1  # paused
    disk.healed = True
    sender._housekeep(106.0)
    assert sender.spool.records == 1 and sender.stats()["points_spooled"] == 5


def test_offline_batches_that_meet_a_failing_disk_wait_in_memory_until_it_works(tmp_path: Path) -> None:
    sender = _sender(tmp_path, Down(), mode="offline")
    disk = _fail_disk(sender)
    block = sender._batcher.intern_keys(["loss"])
    run = sender._batcher.intern_run("r1")
    for step in range(3):
        sender._batcher.append_row(run, step, 1_700_000_000_000, block, [0.5])
    sender._drain()  # used to raise: the taken points were lost and the worker stopped
    stats = sender.stats()
    assert (stats["points_offline"], stats["points_pending"], stats["batches_pending"]) == (0, 3, 1)
    assert sender._wait_timeout() == 5.0
    sender._maintain_stream(100.0)
    assert "stream" not in sender._transport.calls  # offline: never a connection
    disk.healed = True
    sender._housekeep(106.0)
    stats = sender.stats()
    assert (stats["points_offline"], stats["points_pending"], stats["batches_pending"]) == (3, 0, 0)
    assert sender.spool.records == 1


def _log_rows(sender: Sender, steps: range) -> None:
    block, run = sender._batcher.intern_keys(["loss"]), sender._batcher.intern_run("r1")
    for step in steps:
        sender._batcher.append_row(run, step, 1_700_000_000_000, block, [0.5])


def test_offline_batches_reach_the_spool_in_seq_order_after_a_disk_failure(tmp_path: Path) -> None:
    """A sync replays in file order and the server keeps a high-water mark per writer: a batch
    written after a later one would be answered DUPLICATE and its points dropped."""
    sender = _sender(tmp_path, Down(), mode="offline")
    disk = _fail_disk(sender)
    _log_rows(sender, range(3))
    sender._drain()  # seq 1 meets the failing disk: in memory
    disk.healed = True
    _log_rows(sender, range(3, 6))
    sender._spool_paused_until = 0.0  # the pause is over when the next batch is due
    sender._drain()  # seq 2 must not go to disk before seq 1
    sender._housekeep(106.0)
    (segment,) = segments(sender.spool.path)
    seqs = [ingest_pb2.MetricBatch.FromString(r.payload).seq for r in scan(segment) if isinstance(r, Record)]
    assert seqs == [1, 2]
    assert sender.stats()["points_offline"] == 6


def test_offline_operations_that_met_a_failing_disk_get_a_last_try_at_close(tmp_path: Path) -> None:
    sender = _sender(tmp_path, Down(), mode="offline")
    write, failures = sender.spool.append_op, [1]

    def append_op(kind: Any, payload: bytes) -> None:
        if failures:
            failures.pop()
            raise SpoolError("cannot write ops.spool: [Errno 5] Input/output error")
        write(kind, payload)

    sender.spool.append_op = append_op  # type: ignore[method-assign]
    sender._ops_in.append(ingest_pb2.UpdateRunRequest(run_id="r1", status=common_pb2.FINISHED))
    sender._housekeep(100.0)  # fails: kept in the queue, spooling paused for 5 s
    assert sender.spool.ops == 0 and len(sender._ops_in) == 1
    sender._finish()  # closing within the pause: the status used to be dropped without a word
    assert sender.spool.ops == 1 and not sender._ops_in


def test_operations_go_direct_again_once_those_queued_are_delivered(tmp_path: Path) -> None:
    transport = th.MemoryTransport()
    run_id = transport.create_run(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
    sender = _sender(tmp_path, transport)
    op = ingest_pb2.SetTagsRequest(run_id=run_id, tags=[common_pb2.Tag(key="stage", value="warmup")])
    sender._ops_in.append(op)
    sender._housekeep(100.0)
    assert sender.queues_ops  # spooled, sent on the operations thread: later ones must follow it
    with sender._cond:
        assert sender._cond.wait_for(lambda: not sender._ops_retry.ops, 10.0)
    assert transport.tags[run_id] == {"stage": "warmup"}
    sender._forget_delivered_ops()
    assert not sender.queues_ops  # delivered, nothing on disk to replay it for: raises at the call again
    assert sender.spool.ops == 0


def test_the_closing_report_offline_names_points_the_disk_could_not_take(caplog: Any) -> None:
    from trackhouse.client.client import _report

    stats = {"points_offline": 100, "points_spooled": 0, "points_pending": 200, "points_logged": 300, "ops_pending": 0}
    with caplog.at_level(logging.WARNING, logger="trackhouse.client"):
        _report(stats, th.Settings(mode="offline"), "/spool/w1", delivered=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any("100 points spooled" in m for m in messages)
    assert any("200 of 300 logged points undelivered" in m and "200 could not be spooled" in m for m in messages)
