"""Run operations (params, tags, status) never hold up the points nor the exit, and are never lost: they
are sent on a thread of their own, ``finish`` and ``close`` wait for them at most their timeout, and one
the server did not answer (a call cut short at close included: CANCELLED) is kept in the spool."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import trackhouse.client as th
from trackhouse.client.errors import ServerUnavailable, error_for_code
from trackhouse.client.ops import PendingOps
from trackhouse.client.spool import Kind, Record, scan_ops
from trackhouse.proto.points import batch_points
from trackhouse.proto.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

SLACK = 5.0  # generous: a bounded exit, not a timing


def _settings(tmp_path: Path, **kw: Any) -> th.Settings:
    return th.Settings(spool_dir=str(tmp_path / "spool"), replay_orphans=False, flush_interval=0.02,
                       backoff_initial=0.01, backoff_max=0.05, **kw)


def _recorded(spool: Path) -> list[Kind]:
    return [r.kind for r in scan_ops(spool / "ops.spool") if isinstance(r, Record)]


class StalledStore(ingest_pb2_grpc.IngestServiceServicer):
    """Real gRPC: metric batches are stored and acked, but a run update hangs (a store that stalls)."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.updates: list[ingest_pb2.UpdateRunRequest] = []

    def CreateRun(self, request: Any, context: Any) -> Any:
        return common_pb2.RunInfo(run_id="run1", experiment_id="0", status=common_pb2.RUNNING)

    def UpdateRun(self, request: Any, context: Any) -> Any:
        self.entered.set()
        self.release.wait(30.0)
        self.updates.append(request)
        return common_pb2.RunInfo(run_id=request.run_id, status=request.status)

    def StreamMetrics(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        for batch in request_iterator:
            yield ingest_pb2.BatchAck(seq=batch.seq, status=ingest_pb2.STORED, points=batch_points(batch))


@pytest.fixture
def stalled() -> Iterator[tuple[StalledStore, str]]:
    store = StalledStore()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(store, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield store, f"127.0.0.1:{port}"
    finally:
        store.release.set()
        server.stop(None).wait(5.0)


def test_finish_and_close_return_in_time_on_a_stalled_store_and_keep_the_status(
    stalled: tuple[StalledStore, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, address = stalled
    client = th.connect(address, settings=_settings(tmp_path, rpc_timeout=20.0))
    run = client.start_run()
    run.log(step=0, loss=1.0)
    started = time.monotonic()
    assert run.finish(timeout=1.0) is False  # the status was not answered in time
    assert time.monotonic() - started < 1.0 + SLACK  # it used to wait for the call: rpc_timeout, 20 s
    assert store.entered.wait(10.0)  # the update reached the server, which hangs on it
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trackhouse.client"):
        assert client.close(timeout=1.0) is False  # an operation is undelivered: not True
    assert time.monotonic() - started < 1.0 + SLACK
    spool = Path(client.spool_path)
    assert _recorded(spool) == [Kind.UPDATE_RUN]  # kept for a sync
    assert any("1 run operations" in r.getMessage() and str(spool) in r.getMessage() for r in caplog.records)
    # Closing the channel cut the hung call (CANCELLED): no answer, so the status stays pending.
    assert client._sender._ops_retry.join(10.0)
    assert client.stats()["ops_pending"] == 1 and client.stats()["points_acked"] == 1
    assert not any("dropping" in r.getMessage() for r in caplog.records)
    assert _recorded(spool) == [Kind.UPDATE_RUN]


class HangingTags(th.MemoryTransport):
    """``set_tags`` is unavailable while ``down``, then hangs until ``release`` (a store that stalls)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.entered, self.release = threading.Event(), threading.Event()

    def set_tags(self, request: ingest_pb2.SetTagsRequest) -> None:
        if self.down:
            raise ServerUnavailable("restarting")
        self.entered.set()
        self.release.wait(30.0)
        super().set_tags(request)


@pytest.fixture
def hanging() -> Iterator[HangingTags]:
    transport = HangingTags()
    try:
        yield transport
    finally:
        transport.release.set()


def _hang_an_operation(transport: HangingTags, client: th.Client) -> th.Run:
    run = client.start_run()
    run.set_tags({"stage": "warmup"})  # unavailable: handed to the sender, retried...
    transport.down = False
    assert transport.entered.wait(10.0)  # ...and the retry now hangs in the server
    return run


def test_points_are_delivered_while_an_operation_hangs(hanging: HangingTags, tmp_path: Path) -> None:
    client = th.Client(hanging, _settings(tmp_path))
    run = _hang_an_operation(hanging, client)
    for step in range(1000):
        run.log(step=step, loss=1.0)
    assert client.flush(timeout=10.0)  # the worker used to be inside the call: nothing was sent
    assert hanging.point_count() == 1000
    started = time.monotonic()
    assert client.close(timeout=1.0) is False
    assert time.monotonic() - started < 1.0 + SLACK
    assert _recorded(Path(client.spool_path)) == [Kind.SET_TAGS]


def test_points_are_spooled_at_close_while_an_operation_hangs(hanging: HangingTags, tmp_path: Path) -> None:
    client = th.Client(hanging, _settings(tmp_path, spool_grace=60.0))
    run = _hang_an_operation(hanging, client)
    hanging.available = False  # the stream fails too: the points wait in memory
    for step in range(1000):
        run.log(step=step, loss=1.0)
    assert client.close(timeout=2.0) is False
    stats = client.stats()
    assert stats["points_pending"] == stats["points_spooled"] == 1000  # used to be lost: never even drained
    assert stats["ops_pending"] == 1
    assert _recorded(Path(client.spool_path)) == [Kind.SET_TAGS]


class CutOnce:
    """The first call is cut short by the client's channel closing (gRPC's CANCELLED); then it works."""

    def __init__(self) -> None:
        self.calls = 0

    def set_tags(self, request: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            raise error_for_code("CANCELLED", "Channel closed!")


def test_a_cancelled_call_is_no_refusal_the_operation_is_sent_again(caplog: pytest.LogCaptureFixture) -> None:
    transport, cond, answered = CutOnce(), threading.Condition(), threading.Event()
    pending = PendingOps(transport, cond, time.monotonic, delay=lambda _: 0.0,  # type: ignore[arg-type]
                         ready=lambda: True, on_answer=answered.set)
    with caplog.at_level(logging.WARNING, logger="trackhouse.client"):
        pending.add([ingest_pb2.SetTagsRequest(run_id="r1")])
        assert answered.wait(10.0)
    assert transport.calls == 2 and not pending.ops  # it used to be dropped as refused after the first
    assert not any("dropping" in r.getMessage() for r in caplog.records)
    pending.stop(0.0)
    assert pending.join(10.0)


def test_a_refused_status_raises_from_finish_when_it_was_waited_for(tmp_path: Path) -> None:
    """Sent through the sender (``timeout`` shorter than ``rpc_timeout``), the server's refusal still
    reaches the caller, as a direct call's does."""
    transport = th.MemoryTransport()
    client = th.Client(transport, _settings(tmp_path))
    run = client.start_run()
    del transport.runs[run.run_id]  # the server no longer knows it
    with pytest.raises(th.NotFound):
        run.finish(timeout=5.0)
    assert client.close(timeout=5.0)
