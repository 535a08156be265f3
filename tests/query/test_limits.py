"""Query limits: filter length, page size and query time, each refused with a clear error naming the limit."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from trackhouse.cli.server import ServerConfig, ServerThread
from trackhouse.proto.v1 import query_pb2, query_pb2_grpc
from trackhouse.query.service import status_for
from trackhouse.query.settings import QuerySettings
from trackhouse.store import QueryTimeout, Store


@pytest.fixture
def small_query_server(store: Store) -> Iterator[ServerThread]:
    settings = QuerySettings(default_max_results=5, max_results=10, max_filter_length=40, max_history_page=100,
                             history_page=50)
    thread = ServerThread(ServerConfig(store="", database=store.database, grpc_port=0, query=settings), store=store)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop(grace=1.0)


def _error(thread: ServerThread, request: query_pb2.SearchRunsRequest) -> grpc.RpcError:
    with grpc.insecure_channel(thread.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            query_pb2_grpc.QueryServiceStub(channel).SearchRuns(request)
        return err.value


def test_filter_length_and_page_size_are_invalid_argument_naming_the_limit(small_query_server: ServerThread) -> None:
    err = _error(small_query_server, query_pb2.SearchRunsRequest(filter="params.a = '" + "x" * 60 + "'"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit 40" in (err.details() or "")
    err = _error(small_query_server, query_pb2.SearchRunsRequest(max_results=11))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "1..10" in (err.details() or "")


def test_a_read_past_the_time_limit_fails_with_query_timeout(store: Store) -> None:
    store.limit_reads(0.000001)
    with pytest.raises(QueryTimeout):
        store.query_rows("SELECT count() FROM numbers(200000000) WHERE sipHash64(number) % 7 = 1")
    code, message = status_for(QueryTimeout("Timeout exceeded"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "TRACKHOUSE_QUERY_MAX_QUERY_SECONDS" in message
    with pytest.raises(ValueError):
        store.limit_reads(0)


def test_query_seconds_setting_reads_a_float_from_the_environment() -> None:
    assert QuerySettings.from_env({"TRACKHOUSE_QUERY_MAX_QUERY_SECONDS": "2.5"}).max_query_seconds == 2.5
    with pytest.raises(ValueError, match="must be > 0"):
        QuerySettings(max_query_seconds=0)
    with pytest.raises(ValueError, match="not a number"):
        QuerySettings.from_env({"TRACKHOUSE_QUERY_MAX_QUERY_SECONDS": "soon"})
