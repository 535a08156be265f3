"""A fake IngestService (real gRPC, in-process, port 0) for the client's delivery logic.

The real server cannot be told to drop a stream mid-flight, so reconnect, resend,
dedupe, rejection and hold-back are tested against this fake. It stores batches
by (writer_id, seq) exactly as the contract says: a batch seen before is acked
DUPLICATE and not stored again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from trackhouse.proto.points import batch_points
from trackhouse.proto.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc


@dataclass
class Connection:
    """What one StreamMetrics call does: store and ack, or store and abort, or hold."""

    abort_after: int | None = None  # abort (UNAVAILABLE) after storing this many batches, none acked
    ack: bool = True
    retry_delay: str | None = None  # sent as trailing metadata "retry-delay" with the abort


@dataclass
class FakeIngest(ingest_pb2_grpc.IngestServiceServicer):
    plan: list[Connection] = field(default_factory=list)
    reject_key: str = "bad"
    release: threading.Event = field(default_factory=threading.Event)
    stored: dict[tuple[str, int], ingest_pb2.MetricBatch] = field(default_factory=dict)
    received: list[tuple[str, int]] = field(default_factory=list)
    connections: int = 0
    params: dict[tuple[str, str], str] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def GetExperiment(self, request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no experiment named {request.name!r}")

    def CreateExperiment(self, request: Any, context: Any) -> Any:
        return common_pb2.Experiment(experiment_id="1", name=request.name)

    def CreateRun(self, request: Any, context: Any) -> Any:
        run_id = uuid.uuid4().hex
        self.params.update({(run_id, p.key): p.value for p in request.params})
        return common_pb2.RunInfo(run_id=run_id, experiment_id=request.experiment_id, status=common_pb2.RUNNING)

    def UpdateRun(self, request: Any, context: Any) -> Any:
        return common_pb2.RunInfo(run_id=request.run_id, status=request.status)

    def LogParams(self, request: Any, context: Any) -> Any:
        for p in request.params:
            old = self.params.setdefault((request.run_id, p.key), p.value)
            if old != p.value:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"param {p.key!r} already logged as {old!r}")
        return ingest_pb2.LogParamsResponse()

    def StreamMetrics(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        with self.cond:
            conn = self.plan[self.connections] if self.connections < len(self.plan) else Connection()
            self.connections += 1
        for n, batch in enumerate(request_iterator, start=1):
            ack = self._store(batch)
            if conn.abort_after is not None and n >= conn.abort_after:
                if conn.retry_delay is not None:
                    context.set_trailing_metadata((("retry-delay", conn.retry_delay),))
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake: dropping the stream")
            if not conn.ack:
                self.release.wait(30.0)
            yield ack

    def _store(self, batch: Any) -> Any:
        n = batch_points(batch)
        with self.cond:
            ident = (batch.writer_id, batch.seq)
            self.received.append(ident)
            self.cond.notify_all()
            if self.reject_key in batch.keys:
                return ingest_pb2.BatchAck(
                    seq=batch.seq, status=ingest_pb2.REJECTED, points=n, code=3,
                    message=f"key {self.reject_key!r} is not allowed",
                )  # fmt: skip
            if ident in self.stored:
                return ingest_pb2.BatchAck(seq=batch.seq, status=ingest_pb2.DUPLICATE, points=n)
            self.stored[ident] = batch
            return ingest_pb2.BatchAck(seq=batch.seq, status=ingest_pb2.STORED, points=n)


@dataclass
class FakeServer:
    ingest: FakeIngest
    address: str
    server: Any

    def stop(self) -> None:
        self.ingest.release.set()
        self.server.stop(None).wait(5.0)


def start_fake(ingest: FakeIngest, port: int = 0) -> FakeServer:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(ingest, server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return FakeServer(ingest, f"127.0.0.1:{bound}", server)


@pytest.fixture
def grpc_servers() -> Iterator[Callable[..., list[str]]]:
    """``grpc_servers(add_to_server, *servicers)``: one gRPC server per servicer (a replica each) on
    127.0.0.1, port 0; their addresses. All stopped after the test."""
    servers: list[grpc.Server] = []

    def start(add_to_server: Callable[[Any, grpc.Server], None], *servicers: Any) -> list[str]:
        addresses = []
        for servicer in servicers:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            add_to_server(servicer, server)
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            server.start()
            servers.append(server)
        return addresses

    yield start
    for server in servers:
        server.stop(None).wait(5.0)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    running = start_fake(FakeIngest())
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def restart_fake() -> Any:
    """Start another fake on a given port (for server-comes-back tests); stopped at teardown."""
    started: list[FakeServer] = []

    def start(ingest: FakeIngest, port: int) -> FakeServer:
        started.append(start_fake(ingest, port))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture(autouse=True)
def _spool_in_tmp(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative default paths (spool, rendezvous) land in the test's own directory."""
    monkeypatch.chdir(tmp_path)
