"""The background sender: one worker thread per client that turns buffered points into acknowledged batches
(OpenTelemetry's BatchProcessor model), spilling to disk when it must.

The worker sleeps on an Event, woken by ``log()`` (buffer non-empty or full), ``flush()``/``close()``, acks
that free replay room, the end of a stream, or its own deadline (batch age, reconnect, grace period, ack
stall). It cuts the buffered points into batches of at most ``max_batch_points`` numbered by ``seq`` and keeps
each in the ``Outbox`` until acknowledged: in memory or, once spilled, in this writer's spool — when the
server has been away past ``spool_grace`` or memory passes ``memory_budget`` (``policy.py`` decides). Offline,
batches go straight to the spool. The disk side, and what a failing disk does, is ``spilling.py``'s.

One long-lived StreamMetrics call carries the outbox in seq order (one per batch would cost the server a
read of the writer's mark per batch); entries on disk are read back within a bounded window. One thread per
open stream reads its acks and does nothing else. When a stream ends, the worker reconnects after a jittered
backoff (or the server's retry delay) and resends every unacknowledged entry from the oldest: the server
dedupes by (writer_id, seq) with a per-writer high-water mark, which is why entries are always sent in seq
order.

Run operations handed over (offline, when the server is away, behind earlier ones) are recorded in the spool
by the worker and sent by ``PendingOps``'s own thread (``ops.py``): the worker itself makes no unary call, so a
slow server never holds up the points. ``close`` sets a deadline: the worker spools every unacknowledged batch
first, then gives the operations until the deadline; what is left of them stays in the spool, counted in
``ops_pending``.

Invariants: ``seq`` is strictly increasing from 1; an entry leaves the outbox only on its ack; only the worker
touches the spool; ``_cond`` guards shared fields and is never held across I/O.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future

from trackhouse.client import policy
from trackhouse.client.batcher import Batcher, due_at, is_due
from trackhouse.client.errors import ServerUnavailable, SpoolError, TrackhouseError
from trackhouse.client.ops import Op, PendingOps
from trackhouse.client.outbox import Entry, Outbox
from trackhouse.client.settings import Settings
from trackhouse.client.spilling import Spilling
from trackhouse.client.spool import Location, WriterSpool
from trackhouse.client.transport import AckStream, Transport, queued_requests
from trackhouse.client.wire import encode, fit_names
from trackhouse.proto.rules import MAX_BATCH_KEYS, MAX_BATCH_RUNS
from trackhouse.proto.v1 import ingest_pb2

logger = logging.getLogger(__name__)


class Sender(Spilling):
    """Delivers the batcher's points; see the module docstring."""

    def __init__(self, transport: Transport, batcher: Batcher, settings: Settings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._transport = transport
        self._batcher = batcher
        self._settings = settings
        self._clock = clock
        self._reset()

    def _reset(self) -> None:
        s = self._settings
        self.writer_id = uuid.uuid4().hex
        self.spool = WriterSpool(s.spool_dir, self.writer_id, s.spool_segment_bytes, {"mode": s.mode, "url": s.url})
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._outbox = Outbox()
        self._seq = self._taken = 0
        self._forced = self._stopping = self._spill_warned = self._cancelled = False
        self._deadline: float | None = None  # set by close
        self._spool_paused_until = 0.0  # after a failed spool write (``spilling.py``)
        self._worker: threading.Thread | None = None
        self._queue: queue.SimpleQueue[bytes | None] | None = None
        self._stream: AckStream | None = None
        self._last: tuple[AckStream, threading.Thread] | None = None  # the latest stream and its reader
        self._generation = self._attempt = 0
        self._reconnect_at = self._last_progress = 0.0
        self._away_since: float | None = None
        self._released: list[Location] = []
        self._ops_in: list[Op] = []  # from user threads: to spool (offline / away) and retry
        self._ops_retry = PendingOps(self._transport, self._cond, self._clock, delay=self._backoff,
                                     ready=lambda: self._away_since is None, on_answer=self._wake.set)
        self._counts = dict.fromkeys(("points_acked", "points_rejected", "points_offline", "points_lost",
                                      "batches_sent", "batches_acked", "batches_duplicate", "batches_rejected",
                                      "batches_spilled", "reconnects", "spools_replayed"), 0)

    def start(self) -> None:
        """Start the worker thread (idempotent; again after a fork)."""
        with self._cond:
            if self._worker is None and not self._stopping:
                self._worker = threading.Thread(target=self._run, name="trackhouse-sender", daemon=True)
                self._worker.start()

    def wake(self) -> None:
        if self._worker is None:
            self.start()
        if not self._wake.is_set():  # a log call may ask often (a full buffer of mixed key sets)
            self._wake.set()

    def submit_op(self, op: Op, *, outcome: bool = False) -> Future[None] | None:
        """Hand a run operation to the worker: spooled, and sent (online) on the operations thread.
        ``outcome``: a future of its answer (None when delivered, the refusal raised), online only."""
        future: Future[None] | None = Future() if outcome and not self._settings.offline else None
        with self._cond:
            self._ops_in.append(op)
            if future is not None:
                self._ops_retry.outcomes[id(op)] = future
        self.wake()
        return future

    @property
    def queues_ops(self) -> bool:
        """Whether run operations go through the worker: the stream is failing, or an earlier one went there
        (later ones follow it, in order: the spool's record of them is replayed in that order by a sync)."""
        with self._cond:
            return self._away_since is not None or bool(self._ops_in or self._ops_retry.ops or self.spool.ops)

    def flush(self, timeout: float) -> bool:
        """Wait until every point appended before the call is acknowledged (offline: spooled)."""
        target = self._batcher.appended
        if self._worker is None and target > self._taken:
            self.start()
        with self._cond:
            self._forced = True
            self._wake.set()
            return self._cond.wait_for(lambda: self._outbox.answered_through(self._taken, target),
                                       min(timeout, threading.TIMEOUT_MAX))

    def close(self, timeout: float) -> bool:
        """Flush against the deadline, spool what is left, stop; True when every point and run operation
        was delivered (offline: spooled)."""
        timeout = min(timeout, threading.TIMEOUT_MAX)
        deadline = self._clock() + timeout
        reserve = min(1.0, timeout / 4)  # left for spilling what the flush could not deliver
        if self._worker is not None:
            self.flush(max(0.0, timeout - reserve))
        with self._cond:
            self._stopping, self._deadline = True, deadline
            worker = self._worker
        self._wake.set()
        if worker is not None:
            worker.join(max(0.0, deadline - self._clock()))
        stats = self.stats()  # offline, what a timed-out flush left may be spooled by now
        return stats["points_pending"] == 0 and stats["ops_pending"] == 0

    def stats(self) -> dict[str, int]:
        with self._cond:
            counts = dict(self._counts)
            counts.update(points_logged=self._batcher.appended, points_sent=self._taken,
                          batches_pending=len(self._outbox), points_spooled=self._outbox.points_on_disk())
            answered = counts["points_acked"] + counts["points_rejected"] + counts["points_offline"]
            counts["points_pending"] = counts["points_logged"] - answered - counts["points_lost"]
            counts["ops_pending"] = len(self._ops_in) + len(self._ops_retry.ops)
        return counts

    def after_fork(self) -> None:
        """In a forked child: a new writer id, no threads, no inherited batches or files."""
        self.spool.abandon()
        self._reset()

    def _run(self) -> None:
        if self._settings.replay_orphans and not self._settings.offline:
            threading.Thread(target=self._adopt, name="trackhouse-replay", daemon=True).start()
        try:
            while True:
                self._wake.wait(self._wait_timeout())
                self._wake.clear()
                with self._cond:
                    forced, stopping, self._forced = self._forced or self._stopping, self._stopping, False
                s, now = self._settings, self._clock()
                if is_due(self._batcher.state(), now, max_points=s.max_batch_points, interval=s.flush_interval,
                          forced=forced):
                    self._drain()
                self._housekeep(now)
                if stopping:
                    break
                self._maintain_stream(now)
                self._pump()
                self._forget_delivered_ops()
        except Exception:  # a bug here must not pass silently: nothing would be delivered
            logger.exception("trackhouse sender stopped by an unexpected error")
        finally:
            self._finish()

    def _adopt(self) -> None:
        from trackhouse.client.replay import adopt_orphans

        done = sum(r.complete for r in adopt_orphans(self._transport, self._settings, self.writer_id))
        with self._cond:
            self._counts["spools_replayed"] += done
            self._cond.notify_all()

    def _wait_timeout(self) -> float | None:
        s, box, away = self._settings, self._outbox, self._away_since
        with self._cond:
            times = [
                due_at(self._batcher.state(), interval=s.flush_interval),
                (self._reconnect_at if self._stream is None else self._last_progress + s.ack_timeout)
                if box and not s.offline else None,
                max(away + s.spool_grace, self._spool_paused_until) if box.memory_bytes and away is not None else None,
                self._spool_paused_until if (box.memory_bytes or self._ops_in) and s.offline else None,  # a bad disk
            ]
        due = min((t for t in times if t is not None), default=None)
        return None if due is None else max(0.0, due - self._clock())

    def _drain(self) -> None:
        cols = self._batcher.take()
        if cols is None:
            return
        offline = self._settings.offline
        parts = cols.split(min(self._settings.max_batch_points, policy.MAX_MESSAGE_POINTS))
        many = len(self._batcher.keys) > MAX_BATCH_KEYS or len(self._batcher.run_ids) > MAX_BATCH_RUNS
        for part in fit_names(parts) if many else parts:
            self._seq += 1  # only this thread numbers batches
            batch = encode(part, self._batcher.run_ids, self._batcher.keys, writer_id=self.writer_id, seq=self._seq)
            # None: in memory (online; offline behind batches that met a failing disk, to stay in seq order)
            loc = self._spool_batch(batch) if offline and not self._outbox.entries else None
            with self._cond:
                if loc is None:
                    self._outbox.add(Entry(self._seq, len(part), len(batch), self._taken, batch))
                else:
                    self._counts["points_offline"] += len(part)
                self._taken += len(part)
                self._counts["batches_sent"] += 1
        self._batcher.recycle()  # encoded: the arena of vectorized calls may be reused
        if offline:
            self._sync_spool()
            with self._cond:
                self._cond.notify_all()

    def _maintain_stream(self, now: float) -> None:
        """Open the stream when batches wait and none is open (after the backoff); drop a stalled one."""
        with self._cond:
            stream, box = self._stream, self._outbox
            if stream is None and (not box or now < self._reconnect_at or self._settings.offline):
                return
            if stream is not None and not policy.stalled(in_flight=box.in_flight(), last_progress=self._last_progress,
                                                         now=now, timeout=self._settings.ack_timeout):
                return
            self._last_progress = now  # one cancel per stall
            generation, abandon, self._cancelled = self._generation, self._cancelled, True
        if stream is not None:  # a reader that never saw the end of its cancelled call (gRPC, once,
            if abandon:         # after a GOAWAY) is given up on: its late end is of an old generation
                self._on_stream_end(generation, ServerUnavailable("the cancelled metric stream never ended"))
            else:
                logger.warning("trackhouse: no ack for %.0f s; reconnecting", self._settings.ack_timeout)
                stream.cancel()  # the reader sees the end and schedules the reconnect
            return
        with self._cond:
            self._generation += 1
            generation, self._cancelled = self._generation, False
            q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
            self._queue, self._last_progress = q, now
            self._outbox.restart()
        try:
            stream = self._transport.stream_metrics(queued_requests(q))
        except TrackhouseError as exc:
            self._on_stream_end(generation, exc)
            return
        with self._cond:
            self._stream = stream
        reader = threading.Thread(target=self._read_acks, args=(stream, generation), name="trackhouse-acks",
                                  daemon=True)
        reader.start()
        self._last = (stream, reader)

    def _pump(self) -> None:
        """Queue outbox entries in seq order; entries on disk within the replay window."""
        while True:
            with self._cond:
                q, generation, box, idle = self._queue, self._generation, self._outbox, not self._outbox.in_flight()
                entry = None if q is None else box.queue_next(self._seq, q.put, policy.REPLAY_WINDOW)
                if idle and box.in_flight():  # the ack clock starts when something is in flight
                    self._last_progress = self._clock()
                if entry is None or entry.loc is None:
                    return
            try:  # sent as stored: a record's checksum was verified by the read
                batch = self.spool.read(entry.loc)
            except (SpoolError, ValueError) as exc:
                logger.error("trackhouse: spooled batch seq=%d (%d points) is unreadable and lost: %s",
                             entry.seq, entry.points, exc)
                with self._cond:
                    if box.acked(entry.seq) is not None:
                        self._counts["points_lost"] += entry.points
                        self._cond.notify_all()
                continue
            with self._cond:
                if generation != self._generation or self._queue is None:
                    return
                if entry.seq in box.entries and box.send_next == entry.seq:  # still unacked, still next
                    self._queue.put(batch)
                    box.queued_from_disk(entry)
                    box.send_next += 1

    def _backoff(self, retry_after: float | None) -> float:
        return policy.backoff_delay(self._attempt, initial=self._settings.backoff_initial,
                                    maximum=self._settings.backoff_max, retry_after=retry_after, rand=random.uniform)

    def _end_stream(self) -> None:
        """At close: end the open stream (its batches are spooled) and let gRPC be done with it."""
        with self._cond:
            stream, self._stream, self._generation = self._stream, None, self._generation + 1
            if self._queue is not None:
                self._queue.put(None)
            self._queue = None
        if stream is not None:
            stream.cancel()
        self._settle_last()

    def _settle_last(self) -> None:
        """Let gRPC's threads be done with the last call before the interpreter may exit: one stopped at exit
        in the call's lock leaves gRPC's finalizer of the call waiting for ever (a forked child hung so)."""
        if self._last is not None:
            stream, reader = self._last
            if not stream.ended(0.5):
                stream.cancel()
                stream.ended(0.5)
            reader.join(0.5)

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
            item = self._outbox.acked(ack.seq)
            if item is None:  # an ack of a batch already answered (resend race): nothing to do
                return
            if self._away_since is not None:  # the notify below wakes the operations waiting for this
                logger.info("metric stream to %s restored", getattr(self._transport, "url", "server"))
            self._attempt, self._away_since, self._last_progress, self._spill_warned = 0, None, self._clock(), False
            if item.loc is not None:
                self._released.append(item.loc)
            rejected = ack.status == ingest_pb2.REJECTED
            short = 0 if rejected else max(0, item.points - ack.points)  # a server older than the row form
            self._counts["batches_rejected" if rejected else "batches_acked"] += 1
            self._counts["points_rejected" if rejected else "points_acked"] += item.points - short
            self._counts["points_lost"] += short
            self._counts["batches_duplicate"] += ack.status == ingest_pb2.DUPLICATE
            self._cond.notify_all()
        if item.loc is not None:  # replay room
            self._wake.set()
        if rejected:
            logger.warning("trackhouse rejected metric batch seq=%d (%d points), code %d: %s",
                           ack.seq, item.points, ack.code, ack.message)
        if short:
            logger.error("trackhouse server stored %d of %d points of batch seq=%d: it predates the row form "
                         "(ingest.proto fields 10-16); upgrade it", item.points - short, item.points, ack.seq)

    def _on_stream_end(self, generation: int, error: TrackhouseError | None) -> None:
        with self._cond:
            if generation != self._generation:
                return
            self._generation += 1  # this call's end is handled once, by whoever reports it first
            if self._queue is not None:
                self._queue.put(None)  # ends gRPC's request-consumer thread of the dead call
            self._queue = self._stream = None
            if self._stopping and error is None:
                return
            now = self._clock()
            retry_after = error.retry_after if isinstance(error, ServerUnavailable) else None
            self._reconnect_at = now + self._backoff(retry_after)
            first = self._attempt == 0
            self._attempt += 1
            self._counts["reconnects"] += 1
            self._cond.notify_all()
            if not self._outbox:
                self._away_since = None  # nothing at risk
            elif self._away_since is None:
                self._away_since = now
            pending = len(self._outbox)
        if first and not self._stopping:
            logger.warning("metric stream to %s ended (%s); reconnecting with backoff, %d batches awaiting ack",
                           getattr(self._transport, "url", "server"), error or "closed by the server", pending)
        self._wake.set()
