"""The gRPC face of the query service: thin handlers over search and history.

Owns the translation between wire messages and domain calls and, in
`status_for`, the one mapping from domain and store errors to gRPC codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pyarrow as pa

from trackhouse.proto.v1 import common_pb2, query_pb2, query_pb2_grpc
from trackhouse.query.downsample import BucketRequest, Buckets, ExportRequest, MetricCharts
from trackhouse.query.errors import Busy, InvalidArgument, NotFound, QueryError, ResourceExhausted
from trackhouse.query.filters import FilterError
from trackhouse.query.history import HistoryRequest, MetricHistory
from trackhouse.query.scope import allowed_experiments, check_visible
from trackhouse.query.search import RunSearch, SearchRequest
from trackhouse.query.sql import SqlQueries
from trackhouse.query.sqlformat import IpcChunks, pieces
from trackhouse.store import QueryTimeout, Store, StoreError, ValueRefused
from trackhouse.store.wire import run_to_pb

T = TypeVar("T")


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, (InvalidArgument, FilterError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, QueryTimeout):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"query time limit (TRACKHOUSE_QUERY_MAX_QUERY_SECONDS) exceeded: {exc}")
    if isinstance(exc, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, ValueRefused):  # the request's own value: retrying cannot help
        return grpc.StatusCode.INVALID_ARGUMENT, f"the store refused a value of the request: {exc.reason}"
    if isinstance(exc, StoreError):
        return grpc.StatusCode.UNAVAILABLE, f"store error: {exc}"
    return grpc.StatusCode.INTERNAL, "internal error"


# Sent with a Busy RESOURCE_EXHAUSTED as trailing metadata, as HTTP sends Retry-After: the
# client tells an overloaded server (retry later) from a limit of the query (final) by it.
BUSY_RETRY_DELAY = (("retry-delay", "1s"),)


async def abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End the call with ``exc``'s status (``status_for``); a ``Busy`` carries a retry delay."""
    code, message = status_for(exc)
    await context.abort(code, message, BUSY_RETRY_DELAY if isinstance(exc, Busy) else ())


async def _handle(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (QueryError, FilterError, StoreError) as exc:
        await abort(context, exc)
        raise


def _view(value: int) -> str:
    if value == common_pb2.VIEW_TYPE_UNSPECIFIED:
        return "ACTIVE_ONLY"
    try:
        return str(common_pb2.ViewType.Name(value))
    except ValueError:
        raise InvalidArgument(f"run_view_type: unknown value {value}") from None


# Which experiments a call may read with SQL: None = all (auth wires the principal's set here).
SqlScope = Callable[[grpc.aio.ServicerContext], "frozenset[str] | None"]


class QueryServicer(query_pb2_grpc.QueryServiceServicer):
    def __init__(self, store: Store, search: RunSearch, history: MetricHistory,
                 charts: MetricCharts | None = None, sql: SqlQueries | None = None,
                 sql_scope: SqlScope = lambda _: None) -> None:
        self._store = store
        self._search = search
        self._history = history
        self._charts = charts or MetricCharts(store, search.settings)
        self._sql = sql or SqlQueries(store, search.settings)
        self._sql_scope = sql_scope

    async def Sql(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """One Arrow IPC stream in chunks: schema first, then batches as the engine makes them."""
        try:
            async with self._sql.run(request.query, experiment_ids=self._sql_scope(context)) as answer:
                chunks: IpcChunks | None = None
                if answer.schema is not None:
                    chunks = IpcChunks(answer.schema)
                    yield query_pb2.SqlChunk(arrow=chunks.take())
                async for batch in answer:
                    if chunks is None:
                        chunks = IpcChunks(batch.schema)
                    for piece in pieces(batch):
                        yield query_pb2.SqlChunk(arrow=chunks.write(piece), rows=piece.num_rows)
                if chunks is None:
                    chunks = IpcChunks(pa.schema([]))
                yield query_pb2.SqlChunk(arrow=chunks.close())
        except (QueryError, FilterError, StoreError) as exc:
            await abort(context, exc)

    async def _check_visible(self, run_ids: tuple[str, ...]) -> None:
        allowed = allowed_experiments()
        if allowed is not None:
            check_visible(await self._store.arun(self._store.runs_steps(list(run_ids))), run_ids, allowed)

    async def SearchRuns(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> Any:
            req = SearchRequest(
                experiment_ids=tuple(request.experiment_ids), filter=request.filter,
                order_by=tuple(request.order_by), max_results=request.max_results,
                page_token=request.page_token, view=_view(request.run_view_type),
                include_total=request.include_total, allowed_experiments=allowed_experiments(),
            )
            return await self._search.asearch(req)

        page = await _handle(context, call)
        response = query_pb2.SearchRunsResponse(runs=[run_to_pb(r) for r in page.runs],
                                                next_page_token=page.next_page_token)
        if page.total is not None:
            response.total = page.total
        return response

    async def GetRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> Any:
            if not request.run_id:
                raise InvalidArgument("run_id: required")
            runs = await self._store.arun(self._store.run_details_steps([request.run_id]))
            allowed = allowed_experiments()
            if not runs or (allowed is not None and runs[0].info.experiment_id not in allowed):
                raise NotFound(f"run_id: no run {request.run_id!r}")
            return runs[0]

        return run_to_pb(await _handle(context, call))

    async def GetMetricHistory(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = HistoryRequest(
            run_id=request.run_id, key=request.key,
            min_step=request.min_step if request.HasField("min_step") else None,
            max_step=request.max_step if request.HasField("max_step") else None,
            max_results=request.max_results, page_token=request.page_token,
            allowed_experiments=allowed_experiments(),
        )
        page = await _handle(context, lambda: self._history.apage(req))
        return query_pb2.MetricHistory(
            run_id=req.run_id, key=req.key, steps=page.steps.astype("<i8").tobytes(),
            timestamps=page.timestamps.astype("<i8").tobytes(), values=page.values.astype("<f8").tobytes(),
            next_page_token=page.next_page_token,
        )

    async def GetMetricBuckets(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = BucketRequest(
            run_ids=tuple(request.run_ids), key=request.key, buckets=request.buckets or 1000,
            min_step=request.min_step if request.HasField("min_step") else None,
            max_step=request.max_step if request.HasField("max_step") else None,
        )
        await _handle(context, lambda: self._check_visible(req.run_ids))
        result: Buckets = await _handle(context, lambda: self._charts.abuckets(req))
        return query_pb2.MetricBuckets(
            key=req.key, min_step=result.lo, max_step=result.hi, buckets=req.buckets,
            series=[
                query_pb2.MetricBucketSeries(
                    run_id=s.run_id, bucket=s.bucket.astype("<i8").tobytes(),
                    min_steps=s.min_step.astype("<i8").tobytes(), min_values=s.min_value.astype("<f8").tobytes(),
                    max_steps=s.max_step.astype("<i8").tobytes(), max_values=s.max_value.astype("<f8").tobytes(),
                    counts=s.count.astype("<i8").tobytes(),
                )
                for s in result.series
            ],
        )

    async def ExportMetrics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = ExportRequest(
            run_ids=tuple(request.run_ids), keys=tuple(request.keys),
            min_step=request.min_step if request.HasField("min_step") else None,
            max_step=request.max_step if request.HasField("max_step") else None,
        )
        await _handle(context, lambda: self._check_visible(req.run_ids))
        table = await _handle(context, lambda: self._charts.aexport(req))
        return query_pb2.ExportMetricsResponse(arrow_stream=arrow_stream(table), rows=table.num_rows)


def arrow_stream(table: Any) -> bytes:
    """One Arrow IPC stream (schema, record batches, end marker) holding `table`."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())
