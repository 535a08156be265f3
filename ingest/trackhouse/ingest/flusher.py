"""Group commit: decide when to flush the buffer, and flush it as one INSERT.

Deciding is separate from doing: `flush_due` is a pure function of the buffer's
state and a clock. `Flusher.run` is the one task that does the I/O: it takes
every pending batch, builds one Arrow table, inserts it on the store's thread,
and resolves each batch's future only after the INSERT returned (an ack means
durable). One flush at a time, so inserts per second stay low however many
streams are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from trackhouse.ingest.buffer import MetricBuffer, Pending
from trackhouse.ingest.convert import to_arrow
from trackhouse.ingest.errors import Unavailable
from trackhouse.ingest.progress import WriterProgress
from trackhouse.ingest.settings import IngestSettings

log = logging.getLogger(__name__)


def flush_due(rows: int, oldest: float | None, nbytes: int, now: float, settings: IngestSettings,
              room_wanted: bool = False) -> bool:
    """True when the buffer should be flushed now.

    `oldest` is None exactly when no batch is pending. A pending batch is flushed by its age
    even when it holds no rows (``convert`` refuses such batches; were one buffered, its caller
    would otherwise wait for ever), so whenever this is False, `seconds_until_due` is None or
    more than 0: the flusher waits instead of spinning.
    `room_wanted`: a stream waits for room, or a unary caller waits for its batch.
    """
    if oldest is None:
        return False
    return (
        room_wanted
        or rows >= settings.flush_rows
        or now >= oldest + settings.flush_interval  # the expression seconds_until_due() uses
        or nbytes >= settings.buffer_bytes // 2
    )


def seconds_until_due(oldest: float | None, now: float, settings: IngestSettings) -> float | None:
    """How long the flusher may sleep before the age limit makes a flush due (0 only when it is due)."""
    if oldest is None:
        return None
    return max(0.0, oldest + settings.flush_interval - now)


@dataclass
class FlushStats:
    flushes: int = 0
    rows: int = 0
    failures: int = 0


class Flusher:
    def __init__(
        self,
        buffer: MetricBuffer,
        progress: WriterProgress,
        insert: Callable[[Any], Awaitable[None]],
        settings: IngestSettings,
        clock: Callable[[], float] = time.monotonic,
        on_flush: Callable[[int, float], None] | None = None,
    ) -> None:
        self._buffer = buffer
        self._progress = progress
        self._insert = insert
        self._settings = settings
        self._clock = clock
        self._on_flush = on_flush
        self.stats = FlushStats()
        self._stopping = False

    async def run(self) -> None:
        """Flush whenever due, until `stop()`; then flush what is left."""
        buf = self._buffer
        while not self._stopping:
            if flush_due(buf.rows, buf.oldest, buf.nbytes, self._clock(), self._settings,
                         buf.room_wanted or buf.urgent > 0):
                await self.flush_once()
                continue
            timeout = seconds_until_due(buf.oldest, self._clock(), self._settings)
            buf.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(buf.changed.wait(), timeout)
        while len(buf):
            await self.flush_once()

    def stop(self) -> None:
        self._stopping = True
        self._buffer.changed.set()

    async def flush_once(self) -> None:
        taken = self._buffer.take(self._settings.flush_rows)
        if not taken:
            return
        nbytes = sum(p.batch.nbytes for p in taken)
        rows = sum(p.batch.points for p in taken)
        if rows == 0:  # nothing to insert (batches without points are refused before the buffer)
            self._settle(taken, None)
            await self._buffer.release(nbytes)
            return
        started = time.perf_counter()
        try:
            await self._insert(to_arrow([p.batch for p in taken]))
        except Exception as exc:
            self.stats.failures += 1
            log.warning("flush of %d rows in %d batches failed: %s", rows, len(taken), exc)
            self._settle(taken, exc)
            # Later batches of the same writers must not be stored before these are.
            blocked = self._buffer.remove(lambda b: self._progress.is_blocked(b.writer_id, b.seq))
            if blocked:
                self._settle(blocked, Unavailable(f"an earlier batch of the writer failed to store: {exc}"))
                nbytes += sum(p.batch.nbytes for p in blocked)
        else:
            self.stats.flushes += 1
            self.stats.rows += rows
            if self._on_flush is not None:
                self._on_flush(rows, time.perf_counter() - started)
            log.info("flushed %d rows, %d bytes, %d batches in %.1f ms",
                     rows, nbytes, len(taken), (time.perf_counter() - started) * 1000)
            self._settle(taken, None)
        finally:
            await self._buffer.release(nbytes)

    def _settle(self, taken: list[Pending], error: Exception | None) -> None:
        for p in taken:
            if error is None:
                self._progress.stored(p.batch.writer_id, p.batch.seq)
                if not p.done.done():
                    p.done.set_result(None)
            else:
                self._progress.failed(p.batch.writer_id, p.batch.seq)
                if not p.done.done():
                    p.done.set_exception(error)
