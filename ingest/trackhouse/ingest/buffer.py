"""The in-memory buffer of accepted metric batches, with a byte budget.

Owns the batches waiting for a flush and the bytes they hold. Invariants:
- `nbytes` counts a batch from `add()` until its flush has finished (success or
  failure) and `release()` was called, so batches being inserted still count
  against the budget;
- `wait_for_room()` is how a stream is slowed down: it returns only when the
  batch fits, so a full buffer stops the server reading streams (gRPC flow
  control) instead of growing; while a stream waits, `room_wanted` asks the
  flusher to flush now rather than at the age limit;
- every batch has a future that the flusher resolves: None when the INSERT that
  holds it returned, an exception otherwise.

Single event loop; no locks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from trackhouse.ingest.convert import DecodedBatch


@dataclass
class Pending:
    batch: DecodedBatch
    done: asyncio.Future[None]
    arrived: float
    # A caller waits on this batch alone (a unary write): flush as soon as the flusher is free.
    urgent: bool = False


class MetricBuffer:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._pending: list[Pending] = []
        self.rows = 0
        self.nbytes = 0
        self.peak_bytes = 0  # the most `nbytes` has been: the fault tests check it against the budget
        self.oldest: float | None = None
        self.room_wanted = False
        self.urgent = 0  # pending batches whose caller waits for them alone
        self.changed = asyncio.Event()
        self._room = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, batch: DecodedBatch, done: asyncio.Future[None], now: float, urgent: bool = False) -> None:
        self._pending.append(Pending(batch, done, now, urgent))
        self.urgent += urgent
        self.rows += batch.points
        self.nbytes += batch.nbytes
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        if self.oldest is None:
            self.oldest = now
        self.changed.set()

    def take(self, max_rows: int) -> list[Pending]:
        """Hand the oldest batches, about `max_rows` rows (at least one batch), to the flusher.

        Their bytes stay counted until `release()`. Capping a flush keeps each INSERT
        near its efficient size and acks flowing, however far the buffer ran ahead.
        """
        rows, count = 0, 0
        for pending in self._pending:
            if count and rows + pending.batch.points > max_rows:
                break
            rows += pending.batch.points
            count += 1
        taken, self._pending = self._pending[:count], self._pending[count:]
        self.rows -= rows
        self.urgent -= sum(p.urgent for p in taken)
        self.oldest = self._pending[0].arrived if self._pending else None
        self.room_wanted = False
        if not self._pending:
            self.changed.clear()
        return taken

    def remove(self, drop: Callable[[DecodedBatch], bool]) -> list[Pending]:
        """Take out the pending batches `drop` selects (they stay counted until released)."""
        kept = [p for p in self._pending if not drop(p.batch)]
        removed = [p for p in self._pending if drop(p.batch)]
        if removed:
            self._pending = kept
            self.rows -= sum(p.batch.points for p in removed)
            self.urgent -= sum(p.urgent for p in removed)
            self.oldest = kept[0].arrived if kept else None
            if not kept:
                self.changed.clear()
        return removed

    async def release(self, nbytes: int) -> None:
        self.nbytes -= nbytes
        self.room_wanted = False  # waiters that still do not fit ask again
        async with self._room:
            self._room.notify_all()

    def fits(self, nbytes: int) -> bool:
        # An empty buffer always takes a batch, so one large batch cannot stall forever.
        return self.nbytes == 0 or self.nbytes + nbytes <= self.budget_bytes

    async def wait_for_room(self, nbytes: int) -> None:
        if self.fits(nbytes):
            return
        async with self._room:
            while not self.fits(nbytes):
                # Ask for a flush now (again after each release): room comes only from flushing.
                self.room_wanted = True
                self.changed.set()
                await self._room.wait()
