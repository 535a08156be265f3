"""StreamMetrics over the real embedded server: durable acks, dedupe, rejections, coalescing, restarts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.ingest.settings import IngestSettings
from trackhouse.proto.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from trackhouse.store import Store, StoreUnavailable

STORED, DUPLICATE, REJECTED = ingest_pb2.STORED, ingest_pb2.DUPLICATE, ingest_pb2.REJECTED


def stream_all(stub: Any, batches: list[Any]) -> list[Any]:
    return list(stub.StreamMetrics(iter(batches), timeout=30))


def count(store: Store, where: str = "1", **params: Any) -> int:
    rows = store.query_rows(f"SELECT count() FROM {store.database}.metrics WHERE {where}", params)
    return int(rows[0][0])


def statuses(acks: list[Any]) -> list[tuple[int, int]]:
    return [(a.seq, a.status) for a in acks]


def test_stored_ack_means_the_points_are_queryable(server: Any, ingest: Any, run_id: str,
                                                    make_batch: Any, open_stream: Any) -> None:
    stream = open_stream(ingest)
    try:
        for seq in (1, 2, 3):
            stream.send(make_batch(seq=seq, run_ids=[run_id], points=100, steps=range(seq * 100, seq * 100 + 100)))
            ack = stream.ack()
            assert (ack.seq, ack.status, ack.points, ack.code, ack.message) == (seq, STORED, 100, 0, "")
            assert count(server.store) == 100 * seq  # durable and visible when the ack arrives
    finally:
        assert stream.close() == []


def test_a_copy_in_the_same_stream_is_a_duplicate(server: Any, ingest: Any, run_id: str,
                                                   make_batch: Any) -> None:
    batch = make_batch(seq=1, run_ids=[run_id], points=10)
    acks = stream_all(ingest, [batch, batch])
    assert statuses(acks) == [(1, STORED), (1, DUPLICATE)]
    assert acks[1].points == 10
    assert count(server.store) == 10


def test_a_batch_retried_on_a_new_stream_is_a_duplicate(server: Any, ingest: Any, run_id: str,
                                                         make_batch: Any) -> None:
    batches = [make_batch(seq=seq, run_ids=[run_id], points=10) for seq in (1, 2)]
    assert statuses(stream_all(ingest, batches)) == [(1, STORED), (2, STORED)]
    retried = stream_all(ingest, [*batches, make_batch(seq=3, run_ids=[run_id], points=10)])
    assert statuses(retried) == [(1, DUPLICATE), (2, DUPLICATE), (3, STORED)]
    assert count(server.store) == 30


def test_a_rejected_batch_does_not_disturb_the_others(server: Any, ingest: Any, run_id: str,
                                                      make_batch: Any) -> None:
    acks = stream_all(ingest, [
        make_batch(seq=1, run_ids=[run_id], points=5),
        make_batch(seq=2, run_ids=[run_id], keys=["a", "b"], key_index=[0, 1, 2], steps=[1, 2, 3]),
        make_batch(seq=3, run_ids=["0" * 32], points=5),
        make_batch(seq=4, run_ids=[run_id], points=7),
        make_batch(seq=5, run_ids=[run_id], timestamps=[-1], steps=[1]),
        make_batch(seq=6, run_ids=[run_id], points=3),
    ])
    assert statuses(acks) == [(1, STORED), (2, REJECTED), (3, REJECTED), (4, STORED), (5, REJECTED),
                              (6, STORED)]
    assert (acks[1].code, acks[2].code, acks[4].code) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.NOT_FOUND.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "key_index" in acks[1].message and "run_ids[0]" in acks[2].message
    assert "timestamps" in acks[4].message
    assert all(acks[i].code == 0 and acks[i].message == "" for i in (0, 3, 5))
    assert count(server.store) == 15


def test_concurrent_streams_from_different_writers_are_all_stored(server: Any, ingest: Any,
                                                                  make_batch: Any) -> None:
    runs = [ingest.CreateRun(ingest_pb2.CreateRunRequest()).run_id for _ in range(2)]

    def writer(i: int) -> list[Any]:
        batches = [make_batch(writer_id=f"w{i}", seq=seq, run_ids=[runs[i]], points=50,
                              steps=range(seq * 50, seq * 50 + 50)) for seq in range(1, 21)]
        return stream_all(ingest, batches)

    with ThreadPoolExecutor(2) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(writer, i) for i in range(2)]]
    for acks in results:
        assert statuses(acks) == [(seq, STORED) for seq in range(1, 21)]
    for i in range(2):
        assert count(server.store, "run_id = {r:String} AND writer_id = {w:String}", r=runs[i], w=f"w{i}") == 1000


def test_nan_and_infinities_are_stored_as_such(server: Any, ingest: Any, run_id: str,
                                               make_batch: Any) -> None:
    values = [math.nan, math.inf, -math.inf, 1.5, -0.0, 5e-324]
    acks = stream_all(ingest, [make_batch(seq=1, run_ids=[run_id], values=values, steps=range(6))])
    assert statuses(acks) == [(1, STORED)]
    rows = server.store.query_rows(
        f"SELECT step, value FROM {server.store.database}.metrics WHERE run_id = {{r:String}} ORDER BY step",
        {"r": run_id})
    stored = [v for _, v in rows]
    assert math.isnan(stored[0])
    assert stored[1:] == [math.inf, -math.inf, 1.5, -0.0, 5e-324]
    assert math.copysign(1.0, stored[4]) == -1.0


def test_a_batch_of_several_runs_and_keys_lands_row_by_row(server: Any, ingest: Any, make_batch: Any) -> None:
    a, b = (ingest.CreateRun(ingest_pb2.CreateRunRequest()).run_id for _ in range(2))
    acks = stream_all(ingest, [make_batch(
        seq=1, run_ids=[a, b], keys=["loss", "acc"], run_index=[0, 1, 1, 0], key_index=[0, 0, 1, 1],
        steps=[1, 2, 3, 4], timestamps=[10, 20, 30, 40], values=[0.1, 0.2, 0.3, 0.4])])
    assert statuses(acks) == [(1, STORED)]
    rows = server.store.query_rows(
        f"SELECT run_id, toString(key), step, timestamp, value, toString(writer_id), seq "
        f"FROM {server.store.database}.metrics ORDER BY step")
    assert [tuple(r) for r in rows] == [
        (a, "loss", 1, 10, 0.1, "w", 1), (b, "loss", 2, 20, 0.2, "w", 1),
        (b, "acc", 3, 30, 0.3, "w", 1), (a, "acc", 4, 40, 0.4, "w", 1),
    ]


def test_a_failed_insert_ends_the_stream_and_the_resent_batches_are_stored(
        server: Any, ingest: Any, run_id: str, make_batch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = server.store
    real_insert = store.insert_arrow
    failures = [StoreUnavailable("connection refused")]

    def insert_arrow(table: str, data: Any) -> None:
        if failures:
            raise failures.pop()
        real_insert(table, data)

    monkeypatch.setattr(store, "insert_arrow", insert_arrow)
    batches = [make_batch(seq=seq, run_ids=[run_id], points=10) for seq in (1, 2)]
    with pytest.raises(grpc.RpcError) as info:
        stream_all(ingest, batches)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "connection refused" in info.value.details()
    acks = stream_all(ingest, batches)  # the client resends what was not acknowledged
    assert {a.seq for a in acks} == {1, 2} and {a.status for a in acks} <= {STORED, DUPLICATE}
    assert acks[0].status == STORED
    assert count(store) == 20


def test_many_batches_are_coalesced_into_few_inserts(server: Any, ingest: Any, make_batch: Any) -> None:
    """50 batches sent at once land in far fewer INSERTs; merged batches with different key and
    run lists still put every point under its own run and key."""
    runs = [ingest.CreateRun(ingest_pb2.CreateRunRequest()).run_id for _ in range(3)]
    key_sets = [["loss", "acc"], ["acc", "lr", "loss"], ["lr"]]
    batches, expected = [], {}
    for seq in range(1, 51):
        keys = key_sets[seq % 3]
        order = [runs[(seq + j) % 3] for j in range(2)]
        n = 20
        key_index, run_index = np.arange(n) % len(keys), np.arange(n) % 2
        values = np.full(n, float(seq))
        for k, r, v in zip(key_index, run_index, values, strict=True):
            expected[(order[r], keys[k])] = expected.get((order[r], keys[k]), 0.0) + v
        batches.append(make_batch(seq=seq, run_ids=order, keys=keys, key_index=key_index.tolist(),
                                  run_index=run_index.tolist(), steps=range(seq * n, seq * n + n),
                                  values=values.tolist()))
    flushes_before = server.thread.server.ingest.flusher.stats.flushes
    acks = stream_all(ingest, batches)
    assert statuses(acks) == [(seq, STORED) for seq in range(1, 51)]
    flushes = server.thread.server.ingest.flusher.stats.flushes - flushes_before
    assert 1 <= flushes < 50 // 2, flushes
    rows = server.store.query_rows(
        f"SELECT run_id, toString(key), sum(value), count() FROM {server.store.database}.metrics "
        "GROUP BY run_id, key")
    assert {(r, k): s for r, k, s, _ in rows} == pytest.approx(expected)
    assert sum(c for *_, c in rows) == 1000


@pytest.fixture
def servers(store: Store) -> Iterator[list[ServerThread]]:
    """Servers over one store, started by the test; those still running are stopped at the end."""
    running: list[ServerThread] = []
    try:
        yield running
    finally:
        for thread in running:
            thread.stop(grace=1.0)


def start_server(store: Store, running: list[ServerThread]) -> ServerThread:
    config = ServerConfig(store="", database=store.database, grpc_port=0,
                          ingest=IngestSettings(flush_interval=0.05))
    thread = ServerThread(config, store=store)
    thread.start()
    running.append(thread)
    return thread


def stop_server(thread: ServerThread, running: list[ServerThread]) -> None:
    running.remove(thread)
    thread.stop(grace=1.0)


def test_dedupe_survives_a_restart(store: Store, servers: list[ServerThread], make_batch: Any) -> None:
    first = start_server(store, servers)
    with grpc.insecure_channel(first.address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        run_id = stub.CreateRun(ingest_pb2.CreateRunRequest()).run_id
        batches = [make_batch(writer_id="trainer-7", seq=seq, run_ids=[run_id], points=10) for seq in (1, 2, 3)]
        assert statuses(stream_all(stub, batches)) == [(1, STORED), (2, STORED), (3, STORED)]
    stop_server(first, servers)

    second = start_server(store, servers)
    with grpc.insecure_channel(second.address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        replay = [*batches[1:], make_batch(writer_id="trainer-7", seq=4, run_ids=[run_id], points=10)]
        assert statuses(stream_all(stub, replay)) == [(2, DUPLICATE), (3, DUPLICATE), (4, STORED)]
        # The default experiment and the run are still there.
        stub.GetExperiment(ingest_pb2.GetExperimentRequest(experiment_id="0"))
        stub.SetTags(ingest_pb2.SetTagsRequest(run_id=run_id, tags=[common_pb2.Tag(key="k", value="v")]))
    assert count(store, "run_id = {r:String}", r=run_id) == 40
