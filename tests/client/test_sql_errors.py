"""`Client.sql` errors: a limit of the query itself is final, an overloaded server is retryable.

The query service answers both with RESOURCE_EXHAUSTED; only overload ("busy": no
SQL slot freed in time) carries a retry delay. A limit (rows, bytes, memory, time)
fails again on any replica, so it must not move the client off a healthy one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import grpc
import pyarrow as pa
import pytest

import trackhouse.client as th
from trackhouse.client.errors import InvalidArgument, ServerUnavailable, error_for_code
from trackhouse.proto.v1 import query_pb2, query_pb2_grpc
from trackhouse.query.settings import QuerySettings


def _answer(value: int) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.table({"v": [value]})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


class FakeQuery(query_pb2_grpc.QueryServiceServicer):
    """Answers Sql with `value`, or fails every call with RESOURCE_EXHAUSTED (`retry_delay`: sent or not)."""

    def __init__(self, value: int, exhausted: bool = False, retry_delay: str | None = None) -> None:
        self.value, self.exhausted, self.retry_delay = value, exhausted, retry_delay
        self.calls = 0

    def Sql(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.calls += 1
        if self.exhausted:
            if self.retry_delay is not None:
                context.set_trailing_metadata((("retry-delay", self.retry_delay),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server said no")
        yield query_pb2.SqlChunk(arrow=_answer(self.value), rows=1)


@pytest.fixture
def replicas(grpc_servers: Callable[..., list[str]]) -> Callable[..., str]:
    """`replicas(FakeQuery(...), ...)`: start one fake query service per servicer; their addresses, joined."""
    return lambda *servicers: ",".join(grpc_servers(query_pb2_grpc.add_QueryServiceServicer_to_server, *servicers))


def test_a_limit_is_final_and_keeps_the_replica(replicas: Callable[..., str]) -> None:
    limited, other = FakeQuery(1, exhausted=True), FakeQuery(2)
    client = th.connect(query_url=replicas(limited, other))
    try:
        with pytest.raises(InvalidArgument, match="the server said no") as info:
            client.sql("SELECT 1")
        assert info.value.code == "RESOURCE_EXHAUSTED" and not isinstance(info.value, ServerUnavailable)
        limited.exhausted = False
        assert client.sql("SELECT 1").column("v").to_pylist() == [1]  # still the first replica
        assert (limited.calls, other.calls) == (2, 0)
    finally:
        client.close(timeout=1.0)


def test_overload_is_retryable_with_the_servers_delay_and_moves_on(replicas: Callable[..., str]) -> None:
    busy, other = FakeQuery(1, exhausted=True, retry_delay="1s"), FakeQuery(2)
    client = th.connect(query_url=replicas(busy, other))
    try:
        with pytest.raises(ServerUnavailable) as info:
            client.sql("SELECT 1")
        assert (info.value.code, info.value.retry_after) == ("RESOURCE_EXHAUSTED", 1.0)
        assert client.sql("SELECT 1").column("v").to_pylist() == [2]  # the next replica
    finally:
        client.close(timeout=1.0)


def test_other_calls_keep_resource_exhausted_retryable() -> None:
    # Ingest's RESOURCE_EXHAUSTED (a buffer over budget) means "retry later", delay or not.
    assert isinstance(error_for_code("RESOURCE_EXHAUSTED", "buffer full"), ServerUnavailable)


def test_the_servers_result_limit_is_invalid_argument_naming_it(
        start_server: Callable[..., AbstractContextManager[Any]]) -> None:
    with start_server(query=QuerySettings(sql_max_result_rows=1)) as thread:
        client = th.connect(thread.address)
        try:
            with pytest.raises(InvalidArgument, match="result limit: max_result_rows = 1") as info:
                client.sql("SELECT arrayJoin([1, 2, 3]) AS n")
            assert info.value.code == "RESOURCE_EXHAUSTED"
        finally:
            client.close(timeout=1.0)
