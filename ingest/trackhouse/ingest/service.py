"""The gRPC face of ingest: thin handlers over the catalog and the intake.

Owns the translation between wire messages and domain calls, and — in
`status_for` — the one mapping from domain and store errors to gRPC codes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from trackhouse.ingest import errors
from trackhouse.ingest.catalog import Catalog
from trackhouse.ingest.intake import Intake, Outcome, Verdict
from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc
from trackhouse.store import ACTIVE, DELETED, StoreError, StoreUnavailable
from trackhouse.store.wire import experiment_to_pb, run_info_to_pb, status_name

log = logging.getLogger(__name__)
T = TypeVar("T")

_CODES: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
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


async def _handle(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (errors.IngestError, StoreError) as exc:
        code, message = status_for(exc)
        await context.abort(code, message)
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


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, catalog: Catalog, intake: Intake) -> None:
        self._catalog = catalog
        self._intake = intake
        self.open_streams = 0

    async def CreateExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._catalog.create_experiment(
            request.name, request.artifact_location))
        return experiment_to_pb(rec)

    async def GetExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._catalog.get_experiment(
            experiment_id=request.experiment_id, name=request.name))
        return experiment_to_pb(rec)

    async def CreateRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._catalog.create_run(
            request.experiment_id, request.run_name, request.user_id, request.start_time,
            _items(request.params), _items(request.tags)))
        return run_info_to_pb(rec)

    async def UpdateRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._catalog.update_run(
            request.run_id, _status_name(request.status), request.end_time, request.run_name))
        return run_info_to_pb(rec)

    async def LogParams(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _handle(context, lambda: self._catalog.log_params(request.run_id, _items(request.params)))
        return ingest_pb2.LogParamsResponse()

    async def SetTags(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _handle(context, lambda: self._catalog.set_tags(request.run_id, _items(request.tags)))
        return ingest_pb2.SetTagsResponse()

    async def DeleteRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._catalog.set_run_stage(request.run_id, DELETED))
        return run_info_to_pb(rec)

    async def RestoreRun(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._catalog.set_run_stage(request.run_id, ACTIVE))
        return run_info_to_pb(rec)

    async def DeleteTag(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _handle(context, lambda: self._catalog.delete_tag(request.run_id, request.key))
        return ingest_pb2.DeleteTagResponse()

    async def UpdateExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._catalog.update_experiment(
            request.experiment_id, request.new_name))
        return experiment_to_pb(rec)

    async def DeleteExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._catalog.set_experiment_stage(request.experiment_id, DELETED))
        return experiment_to_pb(rec)

    async def RestoreExperiment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rec = await _handle(context, lambda: self._catalog.set_experiment_stage(request.experiment_id, ACTIVE))
        return experiment_to_pb(rec)

    async def SetExperimentTags(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _handle(context, lambda: self._catalog.set_experiment_tags(
            request.experiment_id, _items(request.tags)))
        return ingest_pb2.SetTagsResponse()

    async def DeleteExperimentTag(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _handle(context, lambda: self._catalog.delete_experiment_tag(request.experiment_id, request.key))
        return ingest_pb2.DeleteTagResponse()

    async def LogMetrics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            # Urgent: flushed as soon as the flusher is free; concurrent callers still share INSERTs.
            outcome = await (await self._intake.accept(request, urgent=True, refresh=True))
        except (errors.IngestError, StoreError) as exc:
            code, message = status_for(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises
        return _ack(outcome)

    async def StreamMetrics(self, request_iterator: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        outcomes: asyncio.Queue[Awaitable[Outcome] | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, outcomes))
        self.open_streams += 1
        try:
            while (pending := await outcomes.get()) is not None:
                try:
                    outcome = await pending
                except (errors.IngestError, StoreError) as exc:
                    # Not durable: end the stream so the client resends what is unacknowledged.
                    code, message = status_for(exc)
                    await context.abort(code, message)
                yield _ack(outcome)
            await reader
        finally:
            self.open_streams -= 1
            reader.cancel()

    async def _read(self, request_iterator: AsyncIterator[Any],
                    outcomes: asyncio.Queue[Awaitable[Outcome] | None]) -> None:
        writers: set[str] = set()  # seen on this stream: their marks are fresh here
        try:
            async for message in request_iterator:
                first = message.writer_id not in writers
                writers.add(message.writer_id)
                try:
                    pending = await self._intake.accept(message, refresh=first)
                except (errors.IngestError, StoreError) as exc:
                    pending = _failed(exc)
                # A task, not a bare coroutine: it settles even if the stream ends first.
                await outcomes.put(asyncio.ensure_future(pending))
        finally:
            await outcomes.put(None)
