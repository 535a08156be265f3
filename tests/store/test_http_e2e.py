"""End to end over ClickHouse's HTTP interface: gRPC ingest → store over HTTP → gRPC queries.

The real embedded server (conftest's `server`) on a store opened from the HTTP
endpoint (the chDB fixture, or the server named by TRACKHOUSE_TEST_CLICKHOUSE_URL):
what the ingest and query suites check on chDB, in miniature, over the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from trackhouse.proto.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, query_pb2, query_pb2_grpc

pytestmark = pytest.mark.parametrize("store_url", ["http"], indirect=True)

POINTS = 2_000


@pytest.fixture
def stubs(server: Any) -> Iterator[tuple[Any, Any]]:
    channel = grpc.insecure_channel(server.address)
    try:
        yield ingest_pb2_grpc.IngestServiceStub(channel), query_pb2_grpc.QueryServiceStub(channel)
    finally:
        channel.close()


def batch(seq: int, run_ids: list[str], final_loss: list[float]) -> Any:
    """POINTS steps of `loss` for every run; run i ends at final_loss[i]."""
    n = len(run_ids) * POINTS
    run_index = np.repeat(np.arange(len(run_ids), dtype="<u4"), POINTS)
    steps = np.tile(np.arange(POINTS, dtype="<i8"), len(run_ids))
    values = np.concatenate([np.linspace(1.0, end, POINTS) for end in final_loss]).astype("<f8")
    return ingest_pb2.MetricBatch(
        writer_id="w-http", seq=seq, run_ids=run_ids, keys=["loss"], run_index=run_index.tobytes(),
        key_index=np.zeros(n, "<u4").tobytes(), steps=steps.tobytes(),
        timestamps=np.full(n, 1_700_000_000_000, "<i8").tobytes(), values=values.tobytes(),
    )


def test_ingest_then_search_and_history_over_http(server: Any, stubs: tuple[Any, Any]) -> None:
    ingest, query = stubs
    runs = [
        ingest.CreateRun(ingest_pb2.CreateRunRequest(
            run_name=f"r{i}", params=[common_pb2.Param(key="lr", value=lr)])).run_id
        for i, lr in enumerate(["0.1", "0.1", "0.01"])
    ]
    final = [0.3, 0.05, 0.01]
    first = batch(1, runs, final)
    acks = list(ingest.StreamMetrics(iter([first, batch(2, runs[:1], [0.2]), first]), timeout=30))
    assert [(a.seq, a.status) for a in acks] == [
        (1, ingest_pb2.STORED), (2, ingest_pb2.STORED), (1, ingest_pb2.DUPLICATE)]

    # Every point once: the replayed batch 1 is not stored again.
    store = server.store
    rows = store.query_rows(f"SELECT run_id, count() FROM {store.t('metrics')} GROUP BY run_id ORDER BY run_id")
    assert dict(rows) == {runs[0]: 2 * POINTS, runs[1]: POINTS, runs[2]: POINTS}

    found = query.SearchRuns(query_pb2.SearchRunsRequest(
        filter="metrics.loss < 0.35 and params.lr = '0.1'", order_by=["metrics.loss ASC"]))
    assert [r.info.run_id for r in found.runs] == [runs[1], runs[0]]
    latest = {m.key: m.value for m in found.runs[0].metrics}
    assert latest["loss"] == pytest.approx(0.05)

    history = query.GetMetricHistory(query_pb2.GetMetricHistoryRequest(run_id=runs[1], key="loss"))
    steps = np.frombuffer(history.steps, "<i8")
    values = np.frombuffer(history.values, "<f8")
    assert steps.tolist() == list(range(POINTS))
    assert values == pytest.approx(np.linspace(1.0, 0.05, POINTS))
