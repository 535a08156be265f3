"""The SQL endpoint under concurrency, over the real embedded store.

A running query keeps one sandbox connection between its steps; the store's
readers (search, history, GetRun) share one small thread pool. Queries past the
sandbox's connections must wait without taking any of the store's threads, give
up as RESOURCE_EXHAUSTED when no connection frees in time, and give their slot
back on every way out (an answer, an error, a cancellation).
"""

from __future__ import annotations

import asyncio

import orjson
import pyarrow as pa
import pytest

from trackhouse.query.errors import Busy, InvalidArgument, ResourceExhausted
from trackhouse.query.http.sql import error_response
from trackhouse.query.settings import QuerySettings
from trackhouse.query.sql import SqlQueries
from trackhouse.store import Store
from trackhouse.store.schema import latest_version

SIZE = 2  # the sandbox's connections: the store's readers (open_store's default)
HELD = "SELECT 1 AS x"


async def answer(sql: SqlQueries, query: str = HELD) -> pa.Table:
    async with sql.run(query) as running:
        return pa.Table.from_batches([b async for b in running], schema=running.schema)


async def hold(sql: SqlQueries, entered: asyncio.Event, leave: asyncio.Event) -> pa.Table:
    """A query that started (it holds a sandbox connection) and stays open until `leave`."""
    async with sql.run(HELD) as running:
        entered.set()
        await leave.wait()
        return pa.Table.from_batches([b async for b in running], schema=running.schema)


class Holders:
    """SIZE queries that hold every sandbox connection until `release()`."""

    def __init__(self, sql: SqlQueries) -> None:
        self.leave = asyncio.Event()
        self._entered = [asyncio.Event() for _ in range(SIZE)]
        self.tasks = [asyncio.create_task(hold(sql, e, self.leave)) for e in self._entered]

    async def entered(self) -> None:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._entered)), 10)

    async def release(self) -> list[pa.Table]:
        self.leave.set()
        return await asyncio.wait_for(asyncio.gather(*self.tasks), 10)


def _unstick(store: Store, threads: int) -> None:
    """On a regression the store's threads wait for sandbox connections forever, and the process
    could not exit (it joins them): hand them stand-ins, so their queries fail and the test fails
    instead of hanging."""
    for _ in range(threads):
        store.sandbox._idle.put(object())


def test_queries_past_the_sandbox_connections_leave_the_stores_threads_to_reads(store: Store) -> None:
    sql = SqlQueries(store)

    async def scenario() -> None:
        holders = Holders(sql)
        await holders.entered()
        waiting = [asyncio.create_task(answer(sql)) for _ in range(2 * SIZE)]
        try:
            # The reads of search, history and GetRun run on the same store: they still answer.
            version = await asyncio.wait_for(store.call(store.schema_version), 5)
        except TimeoutError:
            _unstick(store, len(waiting))
            holders.leave.set()
            await asyncio.gather(*holders.tasks, *waiting, return_exceptions=True)
            pytest.fail("every store thread waits for a sandbox connection: reads hang behind SQL queries")
        assert version == latest_version()
        assert all(not t.done() for t in waiting)  # they wait for a connection, asynchronously
        for table in await holders.release():
            assert table.column("x").to_pylist() == [1]
        for table in await asyncio.wait_for(asyncio.gather(*waiting), 10):
            assert table.column("x").to_pylist() == [1]

    asyncio.run(scenario())


def test_a_query_that_cannot_start_in_time_is_resource_exhausted(store: Store) -> None:
    sql = SqlQueries(store, QuerySettings(sql_max_execution_time=1))

    async def scenario() -> None:
        holders = Holders(sql)
        await holders.entered()
        try:
            with pytest.raises(Busy, match=r"busy: .*2 SQL queries.*1 s"):
                await asyncio.wait_for(answer(sql), 5)
        finally:
            await holders.release()
        assert (await asyncio.wait_for(answer(sql), 5)).column("x").to_pylist() == [1]

    asyncio.run(scenario())


def test_every_way_out_gives_the_slot_back(store: Store) -> None:
    sql = SqlQueries(store)

    async def scenario() -> None:
        holders = Holders(sql)
        await holders.entered()
        waiting = asyncio.create_task(answer(sql))
        await asyncio.sleep(0)  # let it start waiting; not a synchronisation by time
        waiting.cancel()  # cancelled while it waits for a slot
        with pytest.raises(asyncio.CancelledError):
            await waiting
        holders.tasks[0].cancel()  # cancelled while it holds one
        with pytest.raises(asyncio.CancelledError):
            await holders.tasks[0]
        holders.tasks = holders.tasks[1:]
        await holders.release()
        for bad in ("SELEC 1", "SELECT no_such_column FROM runs"):  # refused, and failed on opening
            with pytest.raises(InvalidArgument, match=r"cannot parse|query failed"):
                await asyncio.wait_for(answer(sql, bad), 5)
        # Every slot is free again: SIZE queries hold at once, and one more still runs after them.
        again = Holders(sql)
        await again.entered()
        await again.release()
        assert (await asyncio.wait_for(answer(sql), 5)).column("x").to_pylist() == [1]

    asyncio.run(scenario())


def test_over_http_busy_is_429_with_retry_after_and_a_limit_stays_413() -> None:
    busy = error_response(Busy("busy: 2 SQL queries run at once"))
    assert (busy.status_code, busy.headers.get("retry-after")) == (429, "1")
    assert orjson.loads(busy.body) == {"error_code": "RESOURCE_EXHAUSTED", "message": "busy: 2 SQL queries run at once"}
    limit = error_response(ResourceExhausted("memory limit: max_memory_usage = 1 bytes"))
    assert (limit.status_code, limit.headers.get("retry-after")) == (413, None)


class _Aborted(Exception):
    pass


class _Context:
    """What `context.abort` of grpc.aio was asked for (it raises, as the real one does)."""

    def __init__(self) -> None:
        self.aborted: tuple[object, str, tuple[tuple[str, str], ...]] | None = None

    async def abort(self, code: object, details: str = "", trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.aborted = (code, details, tuple(trailing_metadata))
        raise _Aborted


class _Refusing:
    """A `SqlQueries` stand-in whose every query fails with `error` as it opens."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def run(self, query: str, experiment_ids: object = None) -> object:
        raise self.error


def test_over_grpc_busy_carries_a_retry_delay_and_a_limit_none() -> None:
    import grpc

    from trackhouse.proto.v1 import query_pb2
    from trackhouse.query.service import QueryServicer

    async def status(error: Exception) -> tuple[object, str, tuple[tuple[str, str], ...]] | None:
        servicer = QueryServicer(None, None, None, charts=object(), sql=_Refusing(error))  # type: ignore[arg-type]
        context = _Context()
        with pytest.raises(_Aborted):
            async for _ in servicer.Sql(query_pb2.SqlRequest(query="SELECT 1"), context):  # type: ignore[arg-type]
                pass
        return context.aborted

    busy = asyncio.run(status(Busy("busy: 2 SQL queries run at once")))
    assert busy == (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy: 2 SQL queries run at once", (("retry-delay", "1s"),))
    limit = asyncio.run(status(ResourceExhausted("memory limit: max_memory_usage = 1 bytes")))
    assert limit == (grpc.StatusCode.RESOURCE_EXHAUSTED, "memory limit: max_memory_usage = 1 bytes", ())
