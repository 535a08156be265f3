"""Accept metric batches: validate, dedupe, wait for room, buffer — and promise an outcome.

Owns the path of one MetricBatch from the wire to the buffer. `accept()` returns
at once with an awaitable `Outcome`, so a stream keeps reading while earlier
batches wait for their flush; a stream that must wait for buffer room stops
reading (that is the backpressure). A writer's batches admitted as new enter the
buffer in the order they were admitted, across streams (`WriterProgress.wait_turn`).
Nothing here imports grpc.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from trackhouse.ingest.buffer import MetricBuffer
from trackhouse.ingest.catalog import Catalog
from trackhouse.ingest.convert import decode_batch
from trackhouse.ingest.errors import IngestError, Unavailable
from trackhouse.ingest.progress import Admission, Turn, WriterProgress
from trackhouse.ingest.settings import IngestSettings


class Verdict(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Outcome:
    seq: int
    verdict: Verdict
    points: int = 0
    error: IngestError | None = None


async def _ready(outcome: Outcome) -> Outcome:
    return outcome


async def _settled(done: asyncio.Future[None]) -> None:
    """Wait for the flush of a batch; raises when the INSERT holding it failed.

    `done` is shared with copies of the batch (a resend on a new stream waits on it),
    so it is shielded: a waiter cancelled with its stream must not cancel it for them.
    """
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        if not done.cancelled():
            raise  # this waiter was cancelled
        raise Unavailable("the batch in flight was abandoned before its outcome was known; resend it") from None


async def _after(done: asyncio.Future[None], seq: int, points: int) -> Outcome:
    await _settled(done)
    return Outcome(seq, Verdict.STORED, points)


async def _after_original(done: asyncio.Future[None], seq: int, points: int) -> Outcome:
    # A copy of a batch still in flight: its fate is the original's.
    await _settled(done)
    return Outcome(seq, Verdict.DUPLICATE, points)


class Intake:
    def __init__(self, catalog: Catalog, buffer: MetricBuffer, progress: WriterProgress,
                 settings: IngestSettings) -> None:
        self._catalog = catalog
        self._buffer = buffer
        self._progress = progress
        self._settings = settings
        self.points_received = 0
        self.rejected: dict[str, int] = {}

    async def accept(self, message: Any, urgent: bool = False, refresh: bool = False,
                     allowed: frozenset[str] | None = None) -> Awaitable[Outcome]:
        """Take one MetricBatch message; return an awaitable of its outcome.

        `urgent`: the caller waits for this batch alone (a unary write), so it is flushed
        as soon as the flusher is free instead of at the buffer's age limit.
        `refresh`: the writer may have written through another replica since this one
        last saw it (the first batch of a writer on a stream, any unary write): its
        committed mark is reloaded from the store before the batch is taken as new.
        `allowed`: the caller's experiments (None: all); a batch naming a run outside
        them is rejected.
        """
        seq = int(message.seq)
        try:
            batch = decode_batch(message, self._settings)
            runs = await self._catalog.find_metric_runs(batch.run_ids, allowed)
        except IngestError as exc:
            return self._reject(seq, exc)
        admission, original = await self._progress.admit(batch.writer_id, seq, refresh)
        # Duplicates before the runs' state: a batch stored (or in flight) before its run was
        # deleted has its points in the store, and the client must count them so.
        if admission is Admission.DUPLICATE:
            return _ready(Outcome(seq, Verdict.DUPLICATE, batch.points))
        if admission is Admission.IN_FLIGHT and original is not None:
            return _after_original(original, seq, batch.points)
        try:
            # Synchronous: an await between admit() and track() would let a copy in as new too.
            self._catalog.check_runs_writable(batch.run_ids, runs)
        except IngestError as exc:
            return self._reject(seq, exc)
        # Tracked before waiting for room, so a copy arriving meanwhile waits for this one.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        turn = self._progress.track(batch.writer_id, seq, done)
        try:
            # After the writer's batches admitted before it (on other streams too): one that fits must
            # not overtake one still waiting for room, or its mark would pass that one's resend.
            await self._progress.wait_turn(turn)
            await self._buffer.wait_for_room(batch.nbytes)
            # A flush that failed while this batch waited may have failed a batch before it: stored now,
            # it would move the mark past the failed batch, whose resend would be a "duplicate".
            self._progress.check_turn(turn)
        except Unavailable as exc:
            self._abandon(turn, done, exc)
            raise
        except BaseException:
            self._abandon(turn, done, Unavailable("the stream closed before the batch was buffered"))
            raise
        self._buffer.add(batch, done, time.monotonic(), urgent)
        self._progress.leave(turn)
        self.points_received += batch.points
        return _after(done, seq, batch.points)

    def _reject(self, seq: int, error: IngestError) -> Awaitable[Outcome]:
        name = type(error).__name__
        self.rejected[name] = self.rejected.get(name, 0) + 1
        return _ready(Outcome(seq, Verdict.REJECTED, 0, error))

    def _abandon(self, turn: Turn, done: asyncio.Future[None], error: Unavailable) -> None:
        """Settle a tracked batch that will not be buffered: copies waiting on it fail with `error`, and
        the writer's batches behind it in the line are refused when their turn comes (it is blocked)."""
        self._progress.leave(turn)
        self._progress.failed(turn.writer_id, turn.seq)
        done.set_exception(error)
        done.exception()  # retrieved: only copies waiting on it care
