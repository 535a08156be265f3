"""The gRPC metric stream's ack reader: it waits without polling between batches, and still
sees every ack and the end of the call (cancel, server gone) while it waits. And the transport's
at-fork handling: a forked child never waits on a lock a parent thread held at the fork."""

from __future__ import annotations

import os
import queue
import select
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import trackhouse.client as th
from trackhouse.client.errors import TrackhouseError
from trackhouse.client.transport import AckStream, GrpcTransport, queued_requests
from trackhouse.proto.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc


def _batch(seq: int) -> bytes:
    return ingest_pb2.MetricBatch(writer_id="w", seq=seq, run_ids=["r"], keys=["k"], key_index=b"\0" * 4,
                                  steps=b"\0" * 8, timestamps=b"\0" * 8, values=b"\0" * 8).SerializeToString()


class _Reader:
    """Iterates an ack stream on its own thread, as the sender does."""

    def __init__(self, stream: AckStream) -> None:
        self.acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.error: TrackhouseError | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._run, args=(stream,), daemon=True).start()

    def _run(self, stream: AckStream) -> None:
        try:
            for ack in stream:
                self.acks.put(ack.seq)
        except TrackhouseError as exc:
            self.error = exc
        self.ended.set()


@pytest.fixture
def stream(fake: Any) -> Iterator[tuple[queue.SimpleQueue[bytes | None], AckStream, _Reader]]:
    transport = GrpcTransport(fake.address)
    q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    opened = transport.stream_metrics(queued_requests(q))
    yield q, opened, _Reader(opened)
    q.put(None)
    opened.cancel()
    transport.close()


def test_acks_of_batches_sent_after_an_idle_reader_arrive(stream: Any) -> None:
    q, _, reader = stream
    for seq in (1, 2, 3):  # the reader waits idle between them (nothing unanswered)
        q.put(_batch(seq))
        assert reader.acks.get(timeout=10.0) == seq
    assert not reader.ended.is_set()


def test_a_half_closed_stream_ends_the_idle_reader(stream: Any) -> None:
    q, _, reader = stream
    q.put(_batch(1))
    assert reader.acks.get(timeout=10.0) == 1
    q.put(None)  # the server then ends the call normally
    assert reader.ended.wait(10.0) and reader.error is None


def test_cancel_ends_the_idle_reader(stream: Any) -> None:
    q, opened, reader = stream
    q.put(_batch(1))
    assert reader.acks.get(timeout=10.0) == 1
    opened.cancel()
    assert reader.ended.wait(10.0) and reader.error is not None


def test_a_server_gone_while_the_reader_is_idle_ends_it(fake: Any, stream: Any) -> None:
    q, _, reader = stream
    q.put(_batch(1))
    assert reader.acks.get(timeout=10.0) == 1
    fake.stop()
    assert reader.ended.wait(10.0) and reader.error is not None


def _exit_code(pid: int, timeout: float) -> int:
    """The forked child's exit code; fails the test if it has not exited within ``timeout`` s."""
    pidfd = os.pidfd_open(pid)
    try:
        exited = select.select([pidfd], [], [], timeout)[0]
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the forked child was still in its at-fork handling after {timeout} s")
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_child_forked_while_the_parent_holds_the_replicas_locks_still_delivers(fake: Any, tmp_path: Path) -> None:
    # A parent thread holds a _Replicas lock while it opens a channel and while it logs a failover; a fork
    # inside either window leaves the lock held in the child for ever (no thread of the child releases it).
    settings = th.Settings(spool_dir=str(tmp_path / "spool"), flush_interval=0.02, replay_orphans=False)
    client = th.connect(fake.address, settings=settings)
    run = client.start_run()  # the ingest channel is open; the query one is not
    transport = client.transport
    assert isinstance(transport, GrpcTransport)
    with transport._ingest._lock, transport._query._lock:  # a plain Lock: held in the child too
        pid = os.fork()
        if pid == 0:  # the at-fork handler has run if we are here
            code = 1
            try:
                run.log(step=0, child=1.0)
                code = 0 if client.flush(timeout=20.0) and client.stats()["points_acked"] == 1 else 3
            finally:
                os._exit(code)
    assert _exit_code(pid, timeout=60.0) == 0
    assert client.close(timeout=5.0)


class _Replica(ingest_pb2_grpc.IngestServiceServicer):
    """An ingest replica: UpdateRun hangs on `hang` (until `release`) or is recorded; CreateRun answers."""

    def __init__(self, hang: bool) -> None:
        self.hang, self.release = hang, threading.Event()
        self.updates: list[int] = []

    def CreateRun(self, request: Any, context: Any) -> Any:
        return common_pb2.RunInfo(run_id="run1", experiment_id="0", status=common_pb2.RUNNING)

    def UpdateRun(self, request: Any, context: Any) -> Any:
        if self.hang:
            self.release.wait(30)
        self.updates.append(request.status)
        return common_pb2.RunInfo(run_id=request.run_id, status=request.status)


def test_a_call_cut_by_close_does_not_fail_over_to_the_next_replica(
    tmp_path: Path, grpc_servers: Callable[..., list[str]]
) -> None:
    """The close cuts the operations thread's hung call (CANCELLED, retryable): that used to mark the
    replica failed, open a channel to the next one after close() returned, and send the operation there,
    while close() reported it undelivered and the spool kept it (to be sent again by a later sync)."""
    from trackhouse.client.spool import Record, scan_ops

    replicas = [_Replica(hang=True), _Replica(hang=False)]
    addresses = grpc_servers(ingest_pb2_grpc.add_IngestServiceServicer_to_server, *replicas)
    try:
        settings = th.Settings(spool_dir=str(tmp_path), replay_orphans=False, rpc_timeout=20.0)
        client = th.connect(settings=settings, addresses=addresses)
        run = client.start_run()
        assert not run.finish(timeout=0.5)  # the status call hangs on the first replica
        ops = [t for t in threading.enumerate() if t.name == "trackhouse-ops"]
        assert not client.close(timeout=0.5)
        for thread in ops:
            thread.join(30.0)  # the cut call's thread: it would fail over before it ends
        assert replicas[1].updates == []
        assert client.stats()["ops_pending"] == 1
        kept = [r.kind.name for r in scan_ops(Path(client.spool_path) / "ops.spool") if isinstance(r, Record)]
        assert kept == ["UPDATE_RUN"]
    finally:
        replicas[0].release.set()
