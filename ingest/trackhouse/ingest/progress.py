"""Exactly-once in effect: which (writer_id, seq) batches are stored or in flight.

A client numbers its batches 1, 2, 3… and resends unacknowledged ones in order,
so per writer the stored batches form a prefix: one high-water mark (`committed`)
says what is durable. It is loaded from the store the first time a writer is
seen (the writer_progress table, kept by a materialized view over metrics), so
dedupe survives restarts and holds across ingest replicas.

A mark cached here goes stale when the client moves to another replica and
back (the other replica stored more of the writer meanwhile). So the first
batch of a writer on each new stream (and every unary write) is admitted with
`refresh=True`: the mark is reloaded from the store before a batch above it is
taken as new. Within one stream the client cannot have gone elsewhere, so the
hot path makes no store call. What is not covered: a replica that is still
alive and still holds the batch in flight when the client gives up on it and
resends elsewhere (docs/deploy.md, "Exactly once across replicas").

A batch that is buffered but not yet flushed is "in flight": a copy of it that
arrives meanwhile (a retry on a new stream) waits for the original's outcome
instead of being stored twice.

The prefix must stay a prefix, or a restart (which knows only the mark) would
take a resent batch below the mark for a duplicate and lose it. So when a batch
fails to store, its writer is blocked at that seq: later batches of the writer
are refused (Unavailable, "resend from seq N"), at admission and again when one
admitted earlier leaves its wait for buffer room, and the flusher drops those
already buffered, until the failed batch itself is resent (the buffer keeps
arrival order and flushes take its oldest batches first, so it lands first). Clients resend
unacknowledged batches in order, so the failed one comes first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import Enum

from trackhouse.ingest.errors import Unavailable


class Admission(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    IN_FLIGHT = "in_flight"


class WriterProgress:
    def __init__(self, load_committed: Callable[[str], Awaitable[int]]) -> None:
        self._load = load_committed
        self._committed: dict[str, int] = {}
        self._in_flight: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._blocked: dict[str, int] = {}  # writer -> lowest seq that failed to store

    async def committed(self, writer_id: str) -> int:
        if writer_id not in self._committed:
            value = await self._load(writer_id)
            # Another coroutine may have loaded and advanced it meanwhile.
            self._committed[writer_id] = max(value, self._committed.get(writer_id, 0))
        return self._committed[writer_id]

    async def refresh(self, writer_id: str) -> int:
        """Reload the writer's mark from the store (it never goes down)."""
        value = await self._load(writer_id)
        self._committed[writer_id] = max(value, self._committed.get(writer_id, 0))
        return self._committed[writer_id]

    async def admit(self, writer_id: str, seq: int, refresh: bool = False
                    ) -> tuple[Admission, asyncio.Future[None] | None]:
        """Raises Unavailable for a batch past its writer's failed one.

        `refresh`: the batch may follow writes made through another replica (first
        batch of the writer on a stream): reload a cached mark before trusting it.
        """
        known = writer_id in self._committed
        committed = await self.committed(writer_id)
        if seq > committed and refresh and known and (writer_id, seq) not in self._in_flight:
            committed = await self.refresh(writer_id)
        if seq <= committed:
            return Admission.DUPLICATE, None
        blocked_at = self._blocked.get(writer_id)
        if blocked_at is not None and seq <= blocked_at:
            # The failed batch is resent: buffered in order again, later seqs may follow it.
            del self._blocked[writer_id]
        elif blocked_at is not None:
            raise _refusal(writer_id, blocked_at)
        original = self._in_flight.get((writer_id, seq))
        if original is not None:
            return Admission.IN_FLIGHT, original
        return Admission.NEW, None

    def track(self, writer_id: str, seq: int, done: asyncio.Future[None]) -> None:
        self._in_flight[(writer_id, seq)] = done

    def is_blocked(self, writer_id: str, seq: int) -> bool:
        """True when an earlier batch of this writer failed and was not stored since."""
        return seq > self._blocked.get(writer_id, seq)

    def check_unblocked(self, writer_id: str, seq: int) -> None:
        """Raise Unavailable when the writer is blocked at or before `seq`.

        For a batch admitted earlier that is about to be buffered: a batch at or before it
        may have failed since admit().
        """
        blocked_at = self._blocked.get(writer_id)
        if blocked_at is not None and seq >= blocked_at:
            raise _refusal(writer_id, blocked_at)

    def stored(self, writer_id: str, seq: int) -> None:
        self._in_flight.pop((writer_id, seq), None)
        blocked_at = self._blocked.get(writer_id)
        if blocked_at == seq:
            del self._blocked[writer_id]
        elif blocked_at is not None and seq > blocked_at:
            # Stored past the failed batch (it should have been refused): a mark past the failed
            # batch would take its resend for a duplicate and lose it.
            seq = blocked_at - 1
        self._committed[writer_id] = max(self._committed.get(writer_id, 0), seq)

    def failed(self, writer_id: str, seq: int) -> None:
        self._in_flight.pop((writer_id, seq), None)
        self._blocked[writer_id] = min(self._blocked.get(writer_id, seq), seq)


def _refusal(writer_id: str, blocked_at: int) -> Unavailable:
    return Unavailable(f"writer {writer_id}: batch {blocked_at} failed to store; resend from seq {blocked_at} in order")
