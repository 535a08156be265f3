"""Fault tests: the store goes away, its disk fills up, a client stream stalls.

The real embedded server runs in-process (port 0) over a chDB store whose writer
is wrapped: while a fault is on, every INSERT fails as the real failure would
(clickhouse-connect's OperationalError for an unreachable server, ClickHouse's
NOT_ENOUGH_SPACE error for a full disk), through the store's own error
translation. The real client library keeps logging throughout; afterwards every
point is stored exactly once. kill -9 under load is tests/ingest/test_crash.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import grpc
import numpy as np
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

import trackhouse.client as th
from trackhouse.cli.server import ServerThread
from trackhouse.ingest.settings import IngestSettings
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc
from trackhouse.store import Store

BUDGET = 256 * 1024
FAULTS = {
    "unreachable": lambda: OperationalError("HTTPDriver for http://ch:8123 received error: Connection refused"),
    "disk full": lambda: DatabaseError("Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space. "
                                       "(NOT_ENOUGH_SPACE)"),
}


class FaultyWriter:
    """Wraps the store's writer client: INSERTs raise `error()` while `on`; counts the failures."""

    def __init__(self, store: Store, error: Any) -> None:
        self._real = store._writer
        self._error = error
        self.on = False
        self.failures = 0
        self.failed = threading.Condition()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def insert_arrow(self, *args: Any, **kwargs: Any) -> Any:
        if self.on:
            with self.failed:
                self.failures += 1
                self.failed.notify_all()
            raise self._error()
        return self._real.insert_arrow(*args, **kwargs)

    def wait_failures(self, count: int) -> None:
        with self.failed:
            assert self.failed.wait_for(lambda: self.failures >= count, 60), self.failures


@pytest.fixture
def small_server(start_server: Callable[..., AbstractContextManager[ServerThread]]) -> Iterator[ServerThread]:
    ingest = IngestSettings(flush_interval=0.05, buffer_bytes=BUDGET, max_batch_points=BUDGET // 40)
    with start_server(ingest=ingest) as thread:
        yield thread


@pytest.mark.parametrize("fault", FAULTS)
def test_store_fault_unavailable_with_retry_delay_bounded_memory_and_recovery(
        small_server: ServerThread, store: Store, fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = FaultyWriter(store, FAULTS[fault])
    monkeypatch.setattr(store, "_writer", writer)
    # 1. A raw stream sees the status itself: UNAVAILABLE naming the cause, with a retry delay.
    stub = ingest_pb2_grpc.IngestServiceStub(grpc.insecure_channel(small_server.address))
    run_id = stub.CreateRun(ingest_pb2.CreateRunRequest(run_name="faulty")).run_id
    batch = ingest_pb2.MetricBatch(writer_id="raw", seq=1, run_ids=[run_id], keys=["k"],
                                   key_index=bytes(4), steps=bytes(8), timestamps=bytes(8), values=bytes(8))
    writer.on = True
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamMetrics(iter([batch]), timeout=60))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ("disk space" if fault == "disk full" else "Connection refused") in (info.value.details() or "")
    assert ("retry-delay", "0.5s") in tuple(info.value.trailing_metadata() or ())
    # 2. The client keeps logging through the fault; memory stays within the budget.
    client = th.connect(settings=th.Settings(url=small_server.address, flush_interval=0.02, max_batch_points=500,
                                             backoff_initial=0.05, backoff_max=0.5, rpc_timeout=60.0))
    run = client.start_run(experiment="faults", name=fault.replace(" ", "-"))
    steps = 6000
    for step in range(steps // 2):
        run.log_metrics({"loss": step * 0.5}, step=step)
    failures = writer.failures
    writer.wait_failures(failures + 3)          # the client came back and failed again, more than once
    for step in range(steps // 2, steps):
        run.log_metrics({"loss": step * 0.5}, step=step)
    writer.on = False                           # the store is back: recovery needs no one's help
    assert client.flush(timeout=120), client.stats()
    buffer = small_server.server.ingest.buffer
    assert buffer.peak_bytes <= BUDGET, (buffer.peak_bytes, BUDGET)
    stored = client.metric_history(run.run_id, "loss").column("step").to_pylist()
    assert stored == list(range(steps)), "lost or duplicated steps"
    client.close(timeout=30)


def _tiny(run_id: str, writer: str, seq: int) -> Any:
    return ingest_pb2.MetricBatch(writer_id=writer, seq=seq, run_ids=[run_id], keys=["k"],
                                  key_index=bytes(4), steps=np.array([seq], "<i8").tobytes(),
                                  timestamps=np.array([1], "<i8").tobytes(), values=bytes(8))


def test_a_stalled_stream_does_not_slow_the_others(server: Any) -> None:
    """Two stalled streams stay open, one never reading its acks (after filling the flow-control window
    with them), one that stopped sending; a healthy stream alongside completes all its batches."""
    options = [("grpc.http2.bdp_probe", 0)]
    channels = [grpc.insecure_channel(server.address, options=options) for _ in range(3)]
    stubs = [ingest_pb2_grpc.IngestServiceStub(ch) for ch in channels]
    run_id = stubs[0].CreateRun(ingest_pb2.CreateRunRequest(run_name="stall")).run_id
    silent = threading.Event()
    unread = stubs[0].StreamMetrics(_until(silent, [_tiny(run_id, "unread", s) for s in range(1, 3001)]),
                                    timeout=120)
    quiet = stubs[1].StreamMetrics(_until(silent, [_tiny(run_id, "quiet", 1)]), timeout=120)
    healthy = stubs[2].StreamMetrics(iter([_tiny(run_id, "healthy", s) for s in range(1, 101)]), timeout=120)
    acks = list(healthy)
    assert [(a.seq, a.status) for a in acks] == [(s, ingest_pb2.STORED) for s in range(1, 101)]
    assert not unread.done() and not quiet.done()   # the stalled streams are still open meanwhile
    silent.set()
    unread_acks = list(unread)
    assert [a.seq for a in unread_acks] == list(range(1, 3001))
    assert [a.seq for a in quiet] == [1]
    for ch in channels:
        ch.close()


def _until(gate: threading.Event, batches: list[Any]) -> Iterator[Any]:
    """Send `batches`, then stall (neither sending nor half-closing) until the gate opens."""
    yield from batches
    gate.wait(120)
