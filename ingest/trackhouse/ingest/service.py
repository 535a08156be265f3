"""The gRPC face of ingest: thin handlers over the catalog and the intake.

Owns the translation between wire messages and domain calls, and — in
`status_for` — the one mapping from domain and store errors to gRPC codes.

Experiment-scoped callers (the principal bound by the auth interceptor): a run or
experiment outside their experiments is NOT_FOUND, as if it did not exist;
creating an experiment is PERMISSION_DENIED. Open metric streams are counted per
client connection (gRPC peer) against `max_streams_per_connection`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from trackhouse.ingest import errors
from trackhouse.ingest.catalog import DEFAULT_EXPERIMENT_ID, Catalog
from trackhouse.ingest.intake import Intake, Outcome, Verdict
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc
from trackhouse.store import ACTIVE, DELETED, StoreError, StoreUnavailable
from trackhouse.store.auth import current_principal
from trackhouse.store.wire import experiment_to_pb, run_info_to_pb, status_name

log = logging.getLogger(__name__)
T = TypeVar("T")

# Sent with UNAVAILABLE as trailing metadata (`retry-delay`, seconds; the client honours it):
# long enough that a fleet of clients does not hammer a store that is down, short enough to
# resume quickly once it is back.
RETRY_DELAY_SECONDS = 0.5

_CODES: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for a domain or store error (INTERNAL for anything else)."""
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, StoreError):
        return grpc.StatusCode.UNAVAILABLE, f"store error: {exc}"
    return grpc.StatusCode.INTERNAL, "internal error"


def _settle_unread(outcomes: asyncio.Queue[Awaitable[Outcome] | None]) -> None:
    """Outcomes a stream ended before reading (it aborted on an earlier failure): their
    batches are not acknowledged, so the client resends them; retrieve their errors so
    that none is logged as "Task exception was never retrieved" when it settles."""
    while not outcomes.empty():
        item = outcomes.get_nowait()
        if isinstance(item, asyncio.Future):
            item.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End the call with the status for `exc`; UNAVAILABLE carries a retry delay."""
    code, message = status_for(exc)
    trailing = (("retry-delay", f"{RETRY_DELAY_SECONDS}s"),) if code == grpc.StatusCode.UNAVAILABLE else ()
    await context.abort(code, message, trailing_metadata=trailing)


async def _handle(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (errors.IngestError, StoreError) as exc:
        await _abort(context, exc)
        raise  # unreachable: abort raises


async def _failed(exc: Exception) -> Outcome:
    raise exc


def _status_name(number: int) -> str:
    # proto3 enums are open: a number this server does not know arrives as is.
    try:
        return status_name(number)
    except ValueError:
        raise errors.InvalidArgument(f"status: {number} is not a RunStatus") from None


def _items(pairs: Any) -> list[tuple[str, str]]:
    return [(p.key, p.value) for p in pairs]


def _ack(outcome: Outcome) -> Any:
    status = {
        Verdict.STORED: ingest_pb2.STORED,
        Verdict.DUPLICATE: ingest_pb2.DUPLICATE,
        Verdict.REJECTED: ingest_pb2.REJECTED,
    }[outcome.verdict]
    ack = ingest_pb2.BatchAck(seq=outcome.seq, status=status, points=outcome.points)
    if outcome.error is not None:
        code, message = status_for(outcome.error)
        ack.code, ack.message = code.value[0], message
    return ack


def _allowed() -> frozenset[str] | None:
    return current_principal().experiments


async def _then(check: Awaitable[None], call: Callable[[], Awaitable[T]]) -> T:
    await check
    return await call()


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, catalog: Catalog, intake: Intake, max_streams_per_connection: int = 64) -> None:
        self._catalog = catalog
        self._intake = intake
        self._max_streams = max_streams_per_connection
        self._streams_by_peer: dict[str, int] = {}
        self.open_streams = 0

    async def _run(self, run_id: str) -> None:
        """NotFound unless the caller may write to the run (its experiment is one of theirs)."""
        allowed = _allowed()
        if allowed is not None:
            run = (await self._catalog.get_runs([run_id])).get(run_id)
            if run is None or run.experiment_id not in allowed:
                raise errors.NotFound(f"run_id: no run {run_id!r}")

    async def _experiment(self, experiment_id: str) -> None:
        allowed = _allowed()
        if allowed is not None and experiment_id not in allowed:
            raise errors.NotFound(f"no experiment with id {experiment_id!r}")

    async def _create_experiment(self, name: str, location: str) -> Any:
        if _allowed() is not None:
            raise errors.PermissionDenied("an experiment-scoped token cannot create experiments")
        return await self._catalog.create_experiment(name, location)

    async def _get_experiment(self, experiment_id: str, name: str) -> Any:
        rec = await self._catalog.get_experiment(experiment_id=experiment_id, name=name)
        allowed = _allowed()
        if allowed is not None and rec.experiment_id not in allowed:
            raise errors.NotFound(f"no experiment {'with id ' + repr(experiment_id) if experiment_id else repr(name)}")
        return rec

    async def CreateExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._create_experiment(request.name, request.artifact_location))
        return experiment_to_pb(rec)

    async def GetExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._get_experiment(request.experiment_id, request.name))
        return experiment_to_pb(rec)

    async def CreateRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        eid = request.experiment_id or DEFAULT_EXPERIMENT_ID
        rec = await _handle(context, lambda: _then(self._experiment(eid), lambda: self._catalog.create_run(
            request.experiment_id, request.run_name, request.user_id, request.start_time,
            _items(request.params), _items(request.tags))))
        return run_info_to_pb(rec)

    async def UpdateRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid = request.run_id
        rec = await _handle(context, lambda: _then(self._run(rid), lambda: self._catalog.update_run(
            rid, _status_name(request.status), request.end_time, request.run_name)))
        return run_info_to_pb(rec)

    async def LogParams(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid = request.run_id
        await _handle(context, lambda: _then(self._run(rid), lambda: self._catalog.log_params(
            rid, _items(request.params))))
        return ingest_pb2.LogParamsResponse()

    async def SetTags(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid = request.run_id
        await _handle(context, lambda: _then(self._run(rid), lambda: self._catalog.set_tags(
            rid, _items(request.tags))))
        return ingest_pb2.SetTagsResponse()

    async def DeleteRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid = request.run_id
        rec = await _handle(context, lambda: _then(self._run(rid), lambda: self._catalog.set_run_stage(
            rid, DELETED)))
        return run_info_to_pb(rec)

    async def RestoreRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid = request.run_id
        rec = await _handle(context, lambda: _then(self._run(rid), lambda: self._catalog.set_run_stage(
            rid, ACTIVE)))
        return run_info_to_pb(rec)

    async def DeleteTag(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rid = request.run_id
        await _handle(context, lambda: _then(self._run(rid), lambda: self._catalog.delete_tag(rid, request.key)))
        return ingest_pb2.DeleteTagResponse()

    async def UpdateExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        eid = request.experiment_id
        rec = await _handle(context, lambda: _then(self._experiment(eid), lambda: self._catalog.update_experiment(
            eid, request.new_name)))
        return experiment_to_pb(rec)

    async def DeleteExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        eid = request.experiment_id
        rec = await _handle(context, lambda: _then(self._experiment(eid), lambda: self._catalog.set_experiment_stage(
            eid, DELETED)))
        return experiment_to_pb(rec)

    async def RestoreExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        eid = request.experiment_id
        rec = await _handle(context, lambda: _then(self._experiment(eid), lambda: self._catalog.set_experiment_stage(
            eid, ACTIVE)))
        return experiment_to_pb(rec)

    async def SetExperimentTags(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        eid = request.experiment_id
        await _handle(context, lambda: _then(self._experiment(eid), lambda: self._catalog.set_experiment_tags(
            eid, _items(request.tags))))
        return ingest_pb2.SetTagsResponse()

    async def DeleteExperimentTag(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        eid = request.experiment_id
        await _handle(context, lambda: _then(self._experiment(eid), lambda: self._catalog.delete_experiment_tag(
            eid, request.key)))
        return ingest_pb2.DeleteTagResponse()

    async def LogMetrics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            # Urgent: flushed as soon as the flusher is free; concurrent callers still share INSERTs.
            outcome = await (await self._intake.accept(request, urgent=True, refresh=True, allowed=_allowed()))
        except (errors.IngestError, StoreError) as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises
        return _ack(outcome)

    async def StreamMetrics(self, request_iterator: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        peer = context.peer()
        if self._streams_by_peer.get(peer, 0) >= self._max_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"too many metric streams on one connection: limit {self._max_streams} "
                "(TRACKHOUSE_INGEST_MAX_STREAMS_PER_CONNECTION); send more runs on one stream"))
        self._streams_by_peer[peer] = self._streams_by_peer.get(peer, 0) + 1
        outcomes: asyncio.Queue[Awaitable[Outcome] | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, outcomes, _allowed()))
        self.open_streams += 1
        try:
            while (pending := await outcomes.get()) is not None:
                try:
                    outcome = await pending
                except (errors.IngestError, StoreError) as exc:
                    # Not durable: end the stream so the client resends what is unacknowledged.
                    await _abort(context, exc)
                yield _ack(outcome)
            await reader
        finally:
            self.open_streams -= 1
            left = self._streams_by_peer.pop(peer) - 1
            if left:
                self._streams_by_peer[peer] = left
            reader.cancel()
            _settle_unread(outcomes)

    async def _read(self, request_iterator: AsyncIterator[Any],
                    outcomes: asyncio.Queue[Awaitable[Outcome] | None], allowed: frozenset[str] | None) -> None:
        writers: set[str] = set()  # seen on this stream: their marks are fresh here
        try:
            async for message in request_iterator:
                first = message.writer_id not in writers
                writers.add(message.writer_id)
                try:
                    pending = await self._intake.accept(message, refresh=first, allowed=allowed)
                except (errors.IngestError, StoreError) as exc:
                    pending = _failed(exc)
                # A task, not a bare coroutine: it settles even if the stream ends first.
                await outcomes.put(asyncio.ensure_future(pending))
        finally:
            await outcomes.put(None)
