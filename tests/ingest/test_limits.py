"""Limits at the wire: an oversize message is refused with RESOURCE_EXHAUSTED; other streams go on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.ingest.settings import IngestSettings
from trackhouse.proto.rules import MAX_BATCH_RUNS
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc
from trackhouse.store import Store

LIMIT = 256 * 1024


@pytest.fixture
def small_server(store: Store) -> Iterator[ServerThread]:
    settings = IngestSettings(flush_interval=0.05, max_message_bytes=LIMIT, max_batch_points=5_000,
                              buffer_bytes=1 << 20)
    thread = ServerThread(ServerConfig(store="", database=store.database, grpc_port=0, ingest=settings), store=store)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop(grace=1.0)


def test_oversize_message_is_resource_exhausted_and_other_streams_are_unharmed(
        small_server: ServerThread, make_batch: Any) -> None:
    with grpc.insecure_channel(small_server.address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        run_id = stub.CreateRun(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
        huge = make_batch(writer_id="big", run_ids=[run_id], points=12_000)  # 12k × 28 bytes > 256 KiB
        assert huge.ByteSize() > LIMIT
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamMetrics(iter([huge])))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = make_batch(writer_id="small", run_ids=[run_id], points=1_000)
        acks = list(stub.StreamMetrics(iter([ok])))
        assert [(a.status, a.points) for a in acks] == [(ingest_pb2.STORED, 1_000)]


def test_too_many_points_in_one_batch_is_rejected_naming_the_limit(
        small_server: ServerThread, make_batch: Any) -> None:
    with grpc.insecure_channel(small_server.address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        run_id = stub.CreateRun(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
        acks = list(stub.StreamMetrics(iter([make_batch(run_ids=[run_id], points=6_000)])))
        assert acks[0].status == ingest_pb2.REJECTED
        assert acks[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "6000 points" in acks[0].message and "limit 5000" in acks[0].message


def test_too_many_run_ids_in_one_batch_are_rejected_naming_the_limit(
        server: Any, ingest: Any, run_id: str, make_batch: Any) -> None:
    """Names are charged against the buffer's budget: a batch may name MAX_BATCH_RUNS run ids, each
    used by one of its points (repeats count), and the stream goes on after a refusal."""
    too_many = make_batch(seq=1, run_ids=[run_id] * (MAX_BATCH_RUNS + 1), run_index=[0] * 4)
    unused = make_batch(seq=2, run_ids=[run_id] * 3, run_index=[0, 2, 0, 2])
    ok = make_batch(seq=3, run_ids=[run_id] * 2, run_index=[0, 1, 1, 0])
    acks = list(ingest.StreamMetrics(iter([too_many, unused, ok]), timeout=30))
    assert [(a.seq, a.status, a.code) for a in acks] == [
        (1, ingest_pb2.REJECTED, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        (2, ingest_pb2.REJECTED, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        (3, ingest_pb2.STORED, 0)]
    assert f"{MAX_BATCH_RUNS + 1} run ids" in acks[0].message and f"limit {MAX_BATCH_RUNS}" in acks[0].message
    assert "run_ids[1]" in acks[1].message and "no point" in acks[1].message


def test_streams_per_connection_are_limited_naming_the_setting(store: Store, make_batch: Any) -> None:
    import queue

    settings = IngestSettings(flush_interval=0.05, max_streams_per_connection=2)
    thread = ServerThread(ServerConfig(store="", database=store.database, grpc_port=0, ingest=settings), store=store)
    thread.start()
    try:
        with grpc.insecure_channel(thread.address) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            run_id = stub.CreateRun(ingest_pb2.CreateRunRequest(experiment_id="0")).run_id
            feeds: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue(), queue.SimpleQueue()]
            calls = []
            for i, feed in enumerate(feeds):
                feed.put(make_batch(writer_id=f"w{i}", run_ids=[run_id]))
                call = stub.StreamMetrics(iter(feed.get, None))
                assert next(call).status == ingest_pb2.STORED  # the stream is open on the server
                calls.append(call)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.StreamMetrics(iter([make_batch(writer_id="w3", run_ids=[run_id])])))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "TRACKHOUSE_INGEST_MAX_STREAMS_PER_CONNECTION" in (err.value.details() or "")
            feeds[0].put(None)
            assert list(calls[0]) == []  # ended: its slot is free again
            acks = list(stub.StreamMetrics(iter([make_batch(writer_id="w4", run_ids=[run_id])])))
            assert [a.status for a in acks] == [ingest_pb2.STORED]
            feeds[1].put(None)
            list(calls[1])
    finally:
        thread.stop(grace=1.0)
