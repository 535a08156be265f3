"""The background sender: one worker thread per client that turns buffered points into
acknowledged batches (OpenTelemetry's BatchProcessor model).

The worker sleeps on an Event. It is woken by ``log()`` (buffer turned non-empty or
reached ``max_batch_points``), by ``flush()``/``close()``, by the end of a stream, or
by its own deadline (the oldest point's age reaching ``flush_interval``, or the
reconnect time). Each wake it takes every due point from the ``Batcher`` in chunks of
at most ``max_batch_points``, numbers each chunk with the next ``seq``, keeps it in
``_unacked`` (ordered by seq) and queues it on the open StreamMetrics call.

One thread per open stream reads its acks (a blocking iterator) and does nothing
else: it retires acknowledged batches and, when the stream ends, schedules a
reconnect with jittered exponential backoff. The worker reopens the stream and
resends every unacknowledged batch in seq order; the server dedupes by
(writer_id, seq), so a resend never becomes a duplicate.

Invariants: ``seq`` is strictly increasing from 1; a batch leaves ``_unacked`` only
on its ack; requests are queued in seq order on each stream; every shared field
is guarded by ``_cond``, which is never held across a blocking call.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from trackhouse.client.batcher import Batcher, due_at, encode, is_due
from trackhouse.client.errors import TrackhouseError
from trackhouse.client.settings import Settings
from trackhouse.client.transport import AckStream, Transport
from trackhouse.proto.v1 import ingest_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _InFlight:
    batch: ingest_pb2.MetricBatch
    points: int
    first_point: int  # position of its first point among all points taken, for flush()


def _requests(q: queue.SimpleQueue[ingest_pb2.MetricBatch | None]) -> Iterator[ingest_pb2.MetricBatch]:
    """The request iterator gRPC consumes on its own thread; None half-closes the stream."""
    while (item := q.get()) is not None:
        yield item


class Sender:
    """Delivers the batcher's points over one long-lived StreamMetrics call."""

    def __init__(
        self,
        transport: Transport,
        batcher: Batcher,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer_id = uuid.uuid4().hex
        self._transport = transport
        self._batcher = batcher
        self._settings = settings
        self._clock = clock
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._unacked: OrderedDict[int, _InFlight] = OrderedDict()
        self._seq = 0
        self._taken = 0
        self._forced = False
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._queue: queue.SimpleQueue[ingest_pb2.MetricBatch | None] | None = None
        self._stream: AckStream | None = None
        self._generation = 0
        self._attempt = 0
        self._reconnect_at = 0.0
        self._counts = dict.fromkeys(
            ("points_acked", "points_rejected", "batches_sent", "batches_acked", "batches_duplicate",
             "batches_rejected", "reconnects"), 0,
        )  # fmt: skip

    # -- called from user threads -------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self._worker is None and not self._stopping:
                self._worker = threading.Thread(target=self._run, name="trackhouse-sender", daemon=True)
                self._worker.start()

    @property
    def stopped(self) -> bool:
        """True once ``close`` began: no more points are accepted."""
        return self._stopping

    def wake(self) -> None:
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until every point appended before the call is acknowledged (or rejected)."""
        target = self._batcher.appended
        with self._cond:
            self._forced = True
            self._wake.set()
            return self._cond.wait_for(lambda: self._answered_through(target), timeout)

    def close(self, timeout: float) -> bool:
        """Flush against the deadline, then stop the threads; True when all was delivered."""
        deadline = self._clock() + timeout
        flushed = self.flush(timeout) if self._worker is not None else self._batcher.state().points == 0
        with self._cond:
            self._stopping = True
            worker, reader = self._worker, self._reader
        self._wake.set()
        for thread in (worker, reader):
            if thread is not None:
                thread.join(max(0.0, deadline - self._clock()))
        return flushed

    def stats(self) -> dict[str, int]:
        with self._cond:
            counts = dict(self._counts)
            counts["points_logged"] = self._batcher.appended
            counts["points_sent"] = self._taken
            counts["batches_pending"] = len(self._unacked)
            counts["points_pending"] = self._batcher.appended - counts["points_acked"] - counts["points_rejected"]
        return counts

    def _answered_through(self, target: int) -> bool:
        if self._taken < target:
            return False
        return not self._unacked or next(iter(self._unacked.values())).first_point >= target

    # -- the worker -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(self._wait_timeout())
                self._wake.clear()
                with self._cond:
                    forced, stopping = self._forced or self._stopping, self._stopping
                    self._forced = False
                s = self._settings
                if is_due(self._batcher.state(), self._clock(), max_points=s.max_batch_points,
                          interval=s.flush_interval, forced=forced):  # fmt: skip
                    self._drain()
                if stopping:
                    break
                self._maintain_stream()
        except Exception:  # a bug here must not pass silently: the buffers would grow forever
            logger.exception("trackhouse sender stopped by an unexpected error")
        finally:
            self._end_stream()

    def _wait_timeout(self) -> float | None:
        due = due_at(self._batcher.state(), interval=self._settings.flush_interval)
        with self._cond:
            if self._stream is None and self._unacked:
                due = self._reconnect_at if due is None else min(due, self._reconnect_at)
        return None if due is None else max(0.0, due - self._clock())

    def _drain(self) -> None:
        while (chunk := self._batcher.take(self._settings.max_batch_points)) is not None:
            self._seq += 1  # only this thread numbers batches
            batch = encode(chunk, writer_id=self.writer_id, seq=self._seq)
            with self._cond:
                self._unacked[self._seq] = _InFlight(batch, len(chunk), self._taken)
                self._taken += len(chunk)
                self._counts["batches_sent"] += 1
                if self._queue is not None:
                    self._queue.put(batch)

    def _maintain_stream(self) -> None:
        """Open the stream when batches wait and no stream is open (after the backoff)."""
        with self._cond:
            if self._stream is not None or not self._unacked or self._clock() < self._reconnect_at:
                return
            self._generation += 1
            generation = self._generation
            q: queue.SimpleQueue[ingest_pb2.MetricBatch | None] = queue.SimpleQueue()
            for item in self._unacked.values():  # resend everything unacknowledged, in seq order
                q.put(item.batch)
            self._queue = q
        try:
            stream = self._transport.stream_metrics(_requests(q))
        except TrackhouseError as exc:
            self._on_stream_end(generation, exc)
            return
        with self._cond:
            self._stream = stream
            reader = threading.Thread(
                target=self._read_acks, args=(stream, generation), name="trackhouse-acks", daemon=True
            )
            self._reader = reader
        reader.start()

    def _end_stream(self) -> None:
        """Half-close the open stream so the server can answer what it has, then end."""
        with self._cond:
            if self._queue is not None:
                self._queue.put(None)

    # -- the ack reader ---------------------------------------------------------------

    def _read_acks(self, stream: AckStream, generation: int) -> None:
        error: TrackhouseError | None = None
        try:
            for ack in stream:
                self._on_ack(ack)
        except TrackhouseError as exc:
            error = exc
        except Exception as exc:  # keep the reconnect loop alive whatever the stream raised
            logger.exception("unexpected error reading metric acks")
            error = TrackhouseError(repr(exc))
        self._on_stream_end(generation, error)

    def _on_ack(self, ack: ingest_pb2.BatchAck) -> None:
        with self._cond:
            item = self._unacked.pop(ack.seq, None)
            if item is None:  # an ack of a batch already answered (resend race): nothing to do
                return
            if self._attempt:
                logger.info("metric stream to %s restored", getattr(self._transport, "url", "server"))
            self._attempt = 0
            if ack.status == ingest_pb2.REJECTED:
                self._counts["batches_rejected"] += 1
                self._counts["points_rejected"] += item.points
            else:
                self._counts["batches_acked"] += 1
                self._counts["batches_duplicate"] += ack.status == ingest_pb2.DUPLICATE
                self._counts["points_acked"] += item.points
            self._cond.notify_all()
        if ack.status == ingest_pb2.REJECTED:
            logger.warning(
                "trackhouse rejected metric batch seq=%d (%d points), code %d: %s",
                ack.seq, item.points, ack.code, ack.message,
            )  # fmt: skip

    def _on_stream_end(self, generation: int, error: TrackhouseError | None) -> None:
        with self._cond:
            if generation != self._generation:
                return
            if self._queue is not None:
                self._queue.put(None)  # ends gRPC's request-consumer thread of the dead call
            self._queue = None
            self._stream = None
            if self._stopping and error is None:
                return
            delay = min(self._settings.backoff_max, self._settings.backoff_initial * 2**self._attempt)
            self._reconnect_at = self._clock() + delay * random.uniform(0.5, 1.0)
            first = self._attempt == 0
            self._attempt += 1
            self._counts["reconnects"] += 1
            pending = len(self._unacked)
        if first and not self._stopping:
            logger.warning(
                "metric stream to %s ended (%s); reconnecting with backoff, %d batches awaiting ack",
                getattr(self._transport, "url", "server"), error or "closed by the server", pending,
            )  # fmt: skip
        self._wake.set()
