"""The caps of the ingest caches over the real embedded server: the settings reach the caches, and
what they let go is read again from the store (a resend is still a duplicate, a deleted run is
still refused)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from trackhouse.ingest.settings import IngestSettings
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc
from trackhouse.store import Store

STORED, DUPLICATE, REJECTED = ingest_pb2.STORED, ingest_pb2.DUPLICATE, ingest_pb2.REJECTED
# One writer's mark and one run's record at most: each new one lets the previous one go.
TINY_CACHES = IngestSettings(flush_interval=0.05, max_cached_writers=1, max_cached_runs=1)


class Calls:
    """Stands in for one store method: records the first argument of each call (made on the store's
    threads), then calls the method."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method
        self._lock = threading.Lock()
        self.args: list[Any] = []

    def __call__(self, first: Any, *rest: Any) -> Any:
        with self._lock:
            self.args.append(first)
        return self._method(first, *rest)

    def clear(self) -> None:
        with self._lock:
            self.args.clear()


@contextmanager
def tiny_server(start_server: Any) -> Iterator[Any]:
    """An ingest stub on a server whose caches hold one entry each."""
    with start_server(ingest=TINY_CACHES) as thread, grpc.insecure_channel(thread.address) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


def new_run(stub: Any) -> str:
    return str(stub.CreateRun(ingest_pb2.CreateRunRequest(run_name="r"), timeout=30).run_id)


def test_a_writer_let_go_is_reloaded_and_its_resend_stays_a_duplicate(
        store: Store, start_server: Any, make_batch: Any, open_stream: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    loads = Calls(store.writer_max_seq)
    monkeypatch.setattr(store, "writer_max_seq", loads)
    with tiny_server(start_server) as stub:
        run_id = new_run(stub)
        stream = open_stream(stub)
        try:
            stream.send(make_batch(writer_id="w", seq=1, run_ids=[run_id]))
            assert stream.ack().status == STORED
            other = stub.LogMetrics(make_batch(writer_id="other", seq=1, run_ids=[run_id]), timeout=30)
            assert other.status == STORED  # its mark takes the only place: w's goes
            loads.clear()
            # The same stream, so no refresh: only the cap makes the server read w's mark again.
            stream.send(make_batch(writer_id="w", seq=1, run_ids=[run_id]))
            assert stream.ack().status == DUPLICATE
            assert loads.args == ["w"]
            stream.send(make_batch(writer_id="w", seq=2, run_ids=[run_id]))
            assert stream.ack().status == STORED
        finally:
            assert stream.close() == []
    rows = store.query_rows(f"SELECT count() FROM {store.database}.metrics", {})
    assert rows[0][0] == 3 * 4  # w's 1 and 2, other's 1: no copy stored twice


def test_a_deleted_run_let_go_is_read_again_and_still_refused(
        store: Store, start_server: Any, make_batch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = Calls(store.get_runs)
    monkeypatch.setattr(store, "get_runs", reads)
    with tiny_server(start_server) as stub:
        deleted = new_run(stub)
        stub.DeleteRun(ingest_pb2.RunRef(run_id=deleted), timeout=30)
        kept = new_run(stub)  # its record takes the only place: the deleted run's goes
        reads.clear()
        ack = stub.LogMetrics(make_batch(writer_id="w", seq=1, run_ids=[deleted]), timeout=30)
        assert (ack.status, ack.code) == (REJECTED, grpc.StatusCode.FAILED_PRECONDITION.value[0])
        assert [deleted] in [list(a) for a in reads.args], "the deleted run was not read again"
        ack = stub.LogMetrics(make_batch(writer_id="w", seq=2, run_ids=[kept]), timeout=30)
        assert ack.status == STORED
