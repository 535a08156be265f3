"""Exactly-once in effect: which (writer_id, seq) batches are stored or in flight.

A client numbers its batches 1, 2, 3… and resends unacknowledged ones in order,
so per writer the stored batches form a prefix: one high-water mark (`committed`)
says what is durable. It is loaded from the store the first time a writer is
seen (the writer_progress table, kept by a materialized view over metrics), so
dedupe survives restarts and holds across ingest replicas.

A batch that is buffered but not yet flushed is "in flight": a copy of it that
arrives meanwhile (a retry on a new stream) waits for the original's outcome
instead of being stored twice.

The prefix can have holes: when a flush fails, a later batch of the same writer
may already sit in the next flush and be stored. Failed batches are remembered
(until stored) so a resent copy is stored rather than taken for a duplicate of
the mark; after a restart only the mark is known.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import Enum


class Admission(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    IN_FLIGHT = "in_flight"


class WriterProgress:
    def __init__(self, load_committed: Callable[[str], Awaitable[int]]) -> None:
        self._load = load_committed
        self._committed: dict[str, int] = {}
        self._in_flight: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._failed: set[tuple[str, int]] = set()

    async def committed(self, writer_id: str) -> int:
        if writer_id not in self._committed:
            value = await self._load(writer_id)
            # Another coroutine may have loaded and advanced it meanwhile.
            self._committed[writer_id] = max(value, self._committed.get(writer_id, 0))
        return self._committed[writer_id]

    async def admit(self, writer_id: str, seq: int) -> tuple[Admission, asyncio.Future[None] | None]:
        if seq <= await self.committed(writer_id) and (writer_id, seq) not in self._failed:
            return Admission.DUPLICATE, None
        original = self._in_flight.get((writer_id, seq))
        if original is not None:
            return Admission.IN_FLIGHT, original
        return Admission.NEW, None

    def track(self, writer_id: str, seq: int, done: asyncio.Future[None]) -> None:
        self._in_flight[(writer_id, seq)] = done

    def stored(self, writer_id: str, seq: int) -> None:
        self._in_flight.pop((writer_id, seq), None)
        self._failed.discard((writer_id, seq))
        self._committed[writer_id] = max(self._committed.get(writer_id, 0), seq)

    def failed(self, writer_id: str, seq: int) -> None:
        self._in_flight.pop((writer_id, seq), None)
        self._failed.add((writer_id, seq))
