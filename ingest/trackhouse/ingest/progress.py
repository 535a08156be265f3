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

Memory: every client process is a new writer, so the marks are an LRU cache of at most
`max_writers` (MAX_CACHED_WRITERS unless the settings say otherwise). A mark let go is
loaded again on the writer's next batch, as a `refresh` would: the store has every batch
stored here (an ack means the INSERT returned), so the reloaded mark is never below the
cached one. What the store does not have is never let go: a writer with batches in flight
or a mark being loaded (a load that ended after a newer mark was let go would cache an
older one), a blocked writer, and a writer whose mark is held below a batch stored past
its failed one (`_ahead`: the store's mark would take that batch's predecessors for
duplicates).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import Enum

from trackhouse.ingest.errors import Unavailable
from trackhouse.ingest.lru import LRU

# Writers whose marks are cached (IngestSettings.max_cached_writers, the same default).
MAX_CACHED_WRITERS = 100_000


class Admission(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    IN_FLIGHT = "in_flight"


class WriterProgress:
    def __init__(self, load_committed: Callable[[str], Awaitable[int]],
                 max_writers: int = MAX_CACHED_WRITERS) -> None:
        self._load = load_committed
        self._committed: LRU[str, int] = LRU(max_writers, keep=self._held)
        self._in_flight: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._busy: dict[str, int] = {}  # writer -> its batches in flight + loads of its mark under way
        self._blocked: dict[str, int] = {}  # writer -> lowest seq that failed to store
        self._ahead: dict[str, int] = {}  # writer -> greatest seq stored past its failed batch

    def _held(self, writer_id: str) -> bool:
        """True while the writer's cached state is not all in the store: its mark must stay."""
        return writer_id in self._busy or writer_id in self._blocked or writer_id in self._ahead

    def _hold(self, writer_id: str) -> None:
        self._busy[writer_id] = self._busy.get(writer_id, 0) + 1

    def _release(self, writer_id: str) -> None:
        left = self._busy.pop(writer_id) - 1
        if left:
            self._busy[writer_id] = left

    async def _reload(self, writer_id: str) -> int:
        """Load the writer's mark from the store into the cache (it never goes down)."""
        self._hold(writer_id)  # a mark stored meanwhile must still be cached when the load returns
        try:
            value = await self._load(writer_id)
            # Another coroutine may have loaded and advanced it meanwhile.
            mark = max(value, self._committed.get(writer_id, 0))
            self._committed[writer_id] = mark
        finally:
            self._release(writer_id)
        return mark

    async def committed(self, writer_id: str) -> int:
        mark = self._committed.get(writer_id)
        if mark is None:
            mark = await self._reload(writer_id)
        return mark

    async def refresh(self, writer_id: str) -> int:
        """Reload the writer's mark from the store (it never goes down)."""
        return await self._reload(writer_id)

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
        if (writer_id, seq) not in self._in_flight:
            self._hold(writer_id)
        self._in_flight[(writer_id, seq)] = done

    def _settled(self, writer_id: str, seq: int) -> None:
        if self._in_flight.pop((writer_id, seq), None) is not None:
            self._release(writer_id)

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
        self._settled(writer_id, seq)
        blocked_at = self._blocked.get(writer_id)
        if blocked_at == seq:
            del self._blocked[writer_id]
        elif blocked_at is not None and seq > blocked_at:
            # Stored past the failed batch (it should have been refused): a mark past the failed
            # batch would take its resend for a duplicate and lose it. The store's mark is past it
            # now, so this writer's mark must not be reloaded until it catches up (`_ahead`).
            self._ahead[writer_id] = max(self._ahead.get(writer_id, 0), seq)
            seq = blocked_at - 1
        mark = max(self._committed.get(writer_id, 0), seq)
        self._committed[writer_id] = mark
        ahead = self._ahead.get(writer_id)
        if ahead is not None and mark >= ahead:
            del self._ahead[writer_id]  # caught up with the store's mark: a reload is safe again

    def failed(self, writer_id: str, seq: int) -> None:
        self._settled(writer_id, seq)
        self._blocked[writer_id] = min(self._blocked.get(writer_id, seq), seq)


def _refusal(writer_id: str, blocked_at: int) -> Unavailable:
    return Unavailable(f"writer {writer_id}: batch {blocked_at} failed to store; resend from seq {blocked_at} in order")
