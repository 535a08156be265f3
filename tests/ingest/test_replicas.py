"""Two ingest replicas over one store: writer/sequence dedupe holds when a client moves between them.

Each replica keeps its own cache of writer marks (WriterProgress); the store is the
only shared state. A client that streams to A, then B, then A again must not get a
batch that B stored counted twice by A.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.ingest.settings import IngestSettings
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc
from trackhouse.store import Store, open_store

pytestmark = pytest.mark.parametrize("store_url", ["chdb", "http"], indirect=True)


@pytest.fixture
def replicas(store: Store, store_url: str) -> Iterator[list[Any]]:
    """Two ingest servers, each with its own Store on the same database, and a stub for each."""
    stores = [store, open_store(store_url, store.database, migrate=False)]
    threads = [ServerThread(ServerConfig(store="", database=store.database, grpc_port=0,
                                         ingest=IngestSettings(flush_interval=0.02)), store=s) for s in stores]
    channels: list[grpc.Channel] = []
    try:
        for thread in threads:
            channels.append(grpc.insecure_channel(thread.start()))
        yield [ingest_pb2_grpc.IngestServiceStub(ch) for ch in channels]  # type: ignore[no-untyped-call]
    finally:
        for ch in channels:
            ch.close()
        for thread in threads:
            if thread.server.port:
                thread.stop(grace=1.0)
        stores[1].close()


def _stream(stub: Any, batches: list[Any]) -> list[int]:
    acks = list(stub.StreamMetrics(iter(batches), timeout=30))
    return [a.status for a in acks]


def test_a_batch_stored_through_another_replica_is_a_duplicate_back_on_the_first(
        replicas: list[Any], store: Store, make_batch: Any) -> None:
    a, b = replicas
    run = a.CreateRun(ingest_pb2.CreateRunRequest(run_name="r"))
    batch = lambda seq: make_batch("w1", seq, [run.run_id], ["loss"],  # noqa: E731
                                   steps=[seq * 10 + i for i in range(5)])
    stored, dup = ingest_pb2.AckStatus.Value("STORED"), ingest_pb2.AckStatus.Value("DUPLICATE")

    assert _stream(a, [batch(1), batch(2)]) == [stored, stored]  # A caches mark 2
    assert _stream(b, [batch(3), batch(4)]) == [stored, stored]  # B loads 2 from the store, stores 3, 4
    # The client lost B's acks and reconnects to A, resending 3 and 4, then goes on with 5.
    assert _stream(a, [batch(3), batch(4), batch(5)]) == [dup, dup, stored]

    rows = store.query_rows(f"SELECT count(), uniqExact(step) FROM {store.t('metrics')} "
                            "WHERE run_id = {r:String}", {"r": run.run_id})
    assert rows == [(25, 25)]
